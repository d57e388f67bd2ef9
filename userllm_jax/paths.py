"""One path layer for every file the system writes or reads.

Every workdir, checkpoint directory, metrics/TensorBoard file, ``results.json``,
generations file, prepared dataset and cache goes through :func:`path`, an
``etils.epath.Path`` (the abstraction Orbax itself uses): a local path, or an
object-store URI (``gs://bucket/dir``; also ``s3://``, ``az://`` where the
matching fsspec backend is installed -- ``gcsfs`` for ``gs://``). So
``--workdir=gs://bucket/run`` works wherever ``--workdir=/tmp/run`` does.

Write semantics (:func:`write_atomic`, :func:`replace_dir`):

* local paths: write a temp file in the same directory, ``fsync``, then
  ``os.replace`` -- a crash leaves the old file or none, never a half-written
  one; directories are built under a temp name and swapped in with two renames.
* object stores: a single-object write (one PUT) is already all-or-nothing, so a
  file is written in place; a directory is uploaded file by file with the
  *marker* file (e.g. ``metadata.json``) written last, so a reader that checks the
  marker never sees a partial directory. There is no rename on an object store.

Multi-process runs: only process 0 writes shared files (callers check
``jax.process_index() == 0``; this module does not import JAX). Orbax and Grain
coordinate their own checkpoint writes.

Emulators: the gs:// backend honours ``STORAGE_EMULATOR_HOST`` (gcsfs and
google-cloud-storage); TensorStore (Orbax's array writer) reads
``TENSORSTORE_GCS_HTTP_URL`` and, without credentials, ``GOOGLE_AUTH_TOKEN_FOR_TESTING``.
:func:`use_gcs_emulator` sets these (and the few switches that keep the clients from
probing for cloud credentials); call it before gcsfs is imported. tests/test_paths_gcs.py
uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import re
import shutil
import tempfile
from typing import Callable, Iterator, Optional, Union

from etils import epath

Path = epath.Path
PathLike = Union[str, os.PathLike]

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def path(p: PathLike) -> epath.Path:
  """``p`` as an ``epath.Path`` (local paths made absolute; URIs kept as they are)."""
  if isinstance(p, epath.Path) and is_remote(p):
    return p
  s = os.fspath(p)
  if is_remote(s):
    return epath.Path(s)
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def is_remote(p: PathLike) -> bool:
  """True for an object-store URI (``gs://...``), False for a local path (``file://`` is local)."""
  m = _SCHEME.match(os.fspath(p))
  return bool(m) and m.group(1).lower() != "file"


def local_path(p: PathLike) -> pathlib.Path:
  """``p`` as a ``pathlib.Path``; raises ``ValueError`` for an object-store URI (for code that
  can only work on a local file system: memory-mapped caches, C++ readers)."""
  if is_remote(p):
    raise ValueError(f"{os.fspath(p)}: a local path is needed here, got an object-store URI")
  s = os.fspath(p)
  return pathlib.Path(s[len("file://"):] if s.startswith("file://") else s)


def join(base: PathLike, *parts: str) -> str:
  """``base/part/...`` as a string (``os.path.join`` mangles nothing, but this also keeps
  ``gs://`` URIs intact for callers that pass strings on)."""
  return os.fspath(path(base).joinpath(*parts))


def makedirs(p: PathLike) -> epath.Path:
  """Creates directory ``p`` (and parents); on object stores directories are implicit."""
  d = path(p)
  d.mkdir(parents=True, exist_ok=True)
  return d


def cache_dir() -> pathlib.Path:
  """The host-local asset cache: $USERLLM_CACHE, else ~/.cache/userllm_jax (created on use).

  Caches hold memory-mapped arrays and files read by C++ code, so they are local by design.
  """
  root = os.environ.get("USERLLM_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "userllm_jax")
  d = local_path(root)
  d.mkdir(parents=True, exist_ok=True)
  return d


def write_atomic(p: PathLike, data: Union[str, bytes]) -> None:
  """Writes ``data`` (text as UTF-8, or bytes) to ``p`` all-or-nothing (see module doc)."""
  raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
  if is_remote(p):
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(raw)       # one object PUT: atomic on the store
    return
  target = local_path(p).absolute()
  target.parent.mkdir(parents=True, exist_ok=True)
  # A plain open() (not mkstemp, which makes the file 0600) keeps the usual permissions.
  tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(raw)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def read_text(p: PathLike) -> str:
  return path(p).read_text(encoding="utf-8")


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def sha256_file(p: PathLike, chunk: int = 1 << 22) -> str:
  """The hex sha256 of a file (local or remote), read in ``chunk``-byte pieces."""
  h = hashlib.sha256()
  with path(p).open("rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def sha256_bytes(data: Union[str, bytes]) -> str:
  return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def make_temp_dir(near: PathLike, prefix: str = "") -> pathlib.Path:
  """A fresh local staging directory: a hidden sibling of ``near`` when that is local (so
  :func:`replace_dir` renames within one file system), else under the system temp dir."""
  if is_remote(near):
    return pathlib.Path(tempfile.mkdtemp(prefix=prefix or ".userllm-stage-"))
  target = local_path(near).absolute()
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent,
                                      prefix=prefix or f".{target.name}.tmp-"))
  os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; datasets and caches are shared data.
  return tmp


def replace_dir(src: PathLike, dst: PathLike, *, marker: Optional[str] = None,
                accept_existing: Optional[Callable[[epath.Path], bool]] = None) -> None:
  """Moves the finished local directory ``src`` to ``dst``, replacing any old ``dst``.

  Local ``dst``: ``dst`` is renamed aside and ``src`` renamed into place (a reader sees the
  old tree or the new one; a crash between the two renames leaves no ``dst`` and a hidden
  ``.old`` sibling, never a mixed tree). Remote ``dst``: the old tree is deleted and ``src``
  uploaded file by file with ``marker`` (a file name relative to ``src``) uploaded last,
  so readers that require the marker never open a partial upload. ``src`` is consumed.

  Two local builders racing: the loser's final rename fails (``dst`` reappeared); when
  ``accept_existing(dst)`` says the winner's tree is valid, the loser's copy is dropped.
  """
  src_p = local_path(src)
  if not src_p.is_dir():
    raise NotADirectoryError(f"{src_p}: not a directory")
  if is_remote(dst):
    target = path(dst)
    if target.exists():
      if marker is not None and (target / marker).exists():
        (target / marker).unlink()   # invalidate first: a crash mid-upload is then visible
      target.rmtree()
    upload_tree(src_p, target, marker=marker)
    shutil.rmtree(src_p, ignore_errors=True)
    return
  target = local_path(dst).absolute()
  if target.exists():
    if not target.is_dir():
      raise FileExistsError(f"{target}: exists and is not a directory")
    trash = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    try:
      os.replace(target, trash / "old")
    except FileNotFoundError:
      pass                                  # another builder moved it first
    _rename_into_place(src_p, target, accept_existing)
    shutil.rmtree(trash, ignore_errors=True)
  else:
    target.parent.mkdir(parents=True, exist_ok=True)
    _rename_into_place(src_p, target, accept_existing)


def _rename_into_place(src: pathlib.Path, target: pathlib.Path, accept_existing) -> None:
  try:
    os.replace(src, target)
  except OSError:
    if accept_existing is None or not accept_existing(path(target)):
      raise
    shutil.rmtree(src, ignore_errors=True)


def upload_tree(src: PathLike, dst: PathLike, *, marker: Optional[str] = None) -> None:
  """Copies the local tree ``src`` under ``dst`` (any store); ``marker`` goes last."""
  src_p = local_path(src)
  target = path(dst)
  files = sorted(f for f in src_p.rglob("*") if f.is_file())
  last = [f for f in files if marker is not None and f.relative_to(src_p).as_posix() == marker]
  for f in [f for f in files if f not in last] + last:
    out = target / f.relative_to(src_p).as_posix()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(f.read_bytes())


def _files_under(root: epath.Path, rel: str = "") -> Iterator[tuple[str, epath.Path]]:
  # iterdir, not walk(): epath's walk() on gcsfs yields dirpaths without the gs:// scheme.
  for child in root.iterdir():
    name = f"{rel}/{child.name}" if rel else child.name
    if child.is_dir():
      yield from _files_under(child, name)
    else:
      yield name, child


def download_tree(src: PathLike, dst: PathLike) -> pathlib.Path:
  """Copies the tree ``src`` (any store) to the local directory ``dst``; returns ``dst``."""
  out = local_path(dst)
  for rel, f in _files_under(path(src)):
    target = out / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(f.read_bytes())
  return out


@contextlib.contextmanager
def local_staging(dst: PathLike) -> Iterator[pathlib.Path]:
  """A local directory for writers that need a real file system (e.g. C++ writers).

  Local ``dst``: ``dst`` itself (created). Remote ``dst``: a temp dir whose files are
  uploaded to ``dst`` when the block ends without an exception.
  """
  if not is_remote(dst):
    d = local_path(dst)
    d.mkdir(parents=True, exist_ok=True)
    yield d
    return
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="userllm-stage-"))
  try:
    yield tmp
    upload_tree(tmp, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def use_gcs_emulator(endpoint: str) -> None:
  """Points every gs:// client of this process (and its children) at ``endpoint``
  (``http://127.0.0.1:PORT``): gcsfs/google-cloud-storage and TensorStore."""
  os.environ["STORAGE_EMULATOR_HOST"] = endpoint
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = endpoint
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  # No credentials exist or are needed: gcsfs anonymous (fsspec reads FSSPEC_<PROTO>_<KWARG>),
  # and google-auth must not probe the (absent) GCE metadata server, which takes seconds.
  os.environ.setdefault("FSSPEC_GCS_TOKEN", "anon")
  os.environ.setdefault("NO_GCE_CHECK", "true")
  # gcsfs >= 2026 probes each bucket's type (zonal / hierarchical) over the gRPC control
  # plane, which emulators lack; read when gcsfs is imported, so set this before that.
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
