"""The embedded default dataset: MovieLens-100k from the ``recbole==1.2.1`` wheel.

The RecBole wheel on PyPI ships ml-100k in RecBole atomic format
(``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}``; 943 users,
1,682 items, 100,000 ratings).  PyPI is reachable where dataset hubs are not,
so this is the one dataset the project can fetch by itself:

1. ``python -m pip download --no-deps recbole==1.2.1 -d <tmp>`` into
   ``cache_dir()/downloads`` (skipped when a verified wheel is already there),
2. the wheel's sha256 is checked against :data:`WHEEL_SHA256`,
3. the three files are read out of the zip with :mod:`zipfile` (RecBole is
   never imported or installed), checked against :data:`FILE_SHA256`, and
   moved atomically (temp dir + ``os.replace``) to
   ``cache_dir()/datasets/ml-100k-recbole/``,
4. later calls reuse that directory after re-checking the file hashes.

Offline: set ``USERLLM_OFFLINE=1`` to forbid the download (a clear error
instead), and supply the data yourself with ``--source``: a directory holding
``ml-100k.inter``/``ml-100k.item`` or GroupLens' ``u.data``/``u.item``/
``u.genre``; or put the wheel at ``cache_dir()/downloads/<WHEEL_NAME>``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from userllm_jax import paths
from userllm_jax.data.schema import DataError

RECBOLE_VERSION = "1.2.1"
WHEEL_NAME = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
# Observed on 2026-11-27 for the wheel served by PyPI (2,130,151 bytes).
WHEEL_SHA256 = (
    "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407")
MEMBER_DIR = "recbole/dataset_example/ml-100k/"
FILE_SHA256 = {
    "ml-100k.inter":
        "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item":
        "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user":
        "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
DATASET_DIRNAME = "ml-100k-recbole"
OFFLINE_ENV = "USERLLM_OFFLINE"
PIP_TIMEOUT_S = 600

MANUAL_HINT = (
    "To supply the data manually, pass --source=DIR where DIR holds "
    "ml-100k.inter and ml-100k.item (RecBole atomic files) or u.data, u.item "
    "and u.genre (the GroupLens ml-100k zip, unpacked); or download "
    f"{WHEEL_NAME} yourself and put it at {{wheel}}.")


class EmbeddedDataError(DataError):
  """The embedded dataset could not be fetched or failed verification."""


sha256_file = paths.sha256_file   # the one sha256 helper (kept under this name for callers)


def dataset_dir() -> pathlib.Path:
  return paths.cache_dir() / "datasets" / DATASET_DIRNAME


def wheel_path() -> pathlib.Path:
  return paths.cache_dir() / "downloads" / WHEEL_NAME


def _dir_is_valid(d: pathlib.Path) -> bool:
  return all((d / name).is_file() and sha256_file(d / name) == digest
             for name, digest in FILE_SHA256.items())


def _pip_download(dest: pathlib.Path) -> None:
  """Runs ``pip download`` for the pinned wheel into ``dest``."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
         f"recbole=={RECBOLE_VERSION}", "-d", str(dest)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=PIP_TIMEOUT_S, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise EmbeddedDataError(
        f"command failed: {' '.join(cmd)}: {type(e).__name__}: {e}. "
        + MANUAL_HINT.format(wheel=wheel_path())) from e
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout or "").strip()[-1500:]
    raise EmbeddedDataError(
        f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}\n"
        + MANUAL_HINT.format(wheel=wheel_path()))


def _fetch_wheel() -> pathlib.Path:
  """The verified wheel in the download cache, downloading it if needed."""
  target = wheel_path()
  if target.is_file():
    if sha256_file(target) == WHEEL_SHA256:
      return target
    target.unlink()  # A partial or foreign file: fetch again.
  if os.environ.get(OFFLINE_ENV) == "1":
    raise EmbeddedDataError(
        f"{OFFLINE_ENV}=1 forbids downloading {WHEEL_NAME}. "
        + MANUAL_HINT.format(wheel=target))
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent,
                                   prefix=".pip-") as tmp:
    _pip_download(pathlib.Path(tmp))
    got = pathlib.Path(tmp) / WHEEL_NAME
    if not got.is_file():
      raise EmbeddedDataError(
          f"pip download finished but {WHEEL_NAME} is not in {tmp} (found "
          f"{sorted(os.listdir(tmp))}). " + MANUAL_HINT.format(wheel=target))
    digest = sha256_file(got)
    if digest != WHEEL_SHA256:
      raise EmbeddedDataError(
          f"{WHEEL_NAME}: sha256 mismatch: expected {WHEEL_SHA256}, got "
          f"{digest}. The file served is not the pinned release; refusing "
          "to use it. " + MANUAL_HINT.format(wheel=target))
    os.replace(got, target)
  return target


def _extract(wheel: pathlib.Path, target: pathlib.Path) -> None:
  tmp = paths.make_temp_dir(target)
  try:
    with zipfile.ZipFile(wheel) as zf:
      for name, digest in FILE_SHA256.items():
        member = MEMBER_DIR + name
        try:
          data = zf.read(member)
        except KeyError:
          raise EmbeddedDataError(f"{wheel}: member {member} not found") \
              from None
        got = paths.sha256_bytes(data)
        if got != digest:
          raise EmbeddedDataError(f"{wheel}!{member}: sha256 mismatch: "
                                  f"expected {digest}, got {got}")
        (tmp / name).write_bytes(data)
    # Stale or corrupt copies are swapped out; a concurrent extractor's valid copy is kept.
    paths.replace_dir(tmp, target,
                      accept_existing=lambda d: _dir_is_valid(pathlib.Path(os.fspath(d))))
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def ml100k_dir() -> pathlib.Path:
  """The verified RecBole ml-100k directory, fetching it on first use."""
  target = dataset_dir()
  if _dir_is_valid(target):
    return target
  _extract(_fetch_wheel(), target)
  if not _dir_is_valid(target):
    raise EmbeddedDataError(f"{target}: files failed verification after "
                            "extraction")
  return target
