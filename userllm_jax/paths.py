"""Where downloaded or assembled assets are cached."""

import os
import pathlib


def cache_dir() -> pathlib.Path:
  """The asset cache: $USERLLM_CACHE, else ~/.cache/userllm_jax (created on use)."""
  root = os.environ.get("USERLLM_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "userllm_jax")
  path = pathlib.Path(root)
  path.mkdir(parents=True, exist_ok=True)
  return path
