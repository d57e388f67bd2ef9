"""Where downloaded or assembled assets are cached; atomic writes of result files."""

import os
import pathlib


def cache_dir() -> pathlib.Path:
  """The asset cache: $USERLLM_CACHE, else ~/.cache/userllm_jax (created on use)."""
  root = os.environ.get("USERLLM_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "userllm_jax")
  path = pathlib.Path(root)
  path.mkdir(parents=True, exist_ok=True)
  return path


def write_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` via a temp file in the same directory and ``os.replace``:
  a crash leaves the old file or none, never a half-written one."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # A plain open() (not mkstemp, which makes the file 0600) keeps the usual permissions.
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
