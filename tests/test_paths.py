"""userllm_jax/paths.py on local paths (gs:// is covered by tests/test_paths_gcs.py)."""

import hashlib
import os

import pytest

from userllm_jax import paths


def test_path_kinds():
  assert paths.is_remote("gs://b/x") and paths.is_remote("s3://b/x")
  assert not paths.is_remote("/tmp/x") and not paths.is_remote("file:///tmp/x")
  assert not paths.is_remote("relative/dir")
  assert paths.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
  assert paths.join("rel", "x") == os.path.join(os.path.abspath("rel"), "x")
  with pytest.raises(ValueError, match="local path is needed"):
    paths.local_path("gs://b/x")


def test_write_atomic_local(tmp_path):
  target = tmp_path / "a" / "results.json"
  paths.write_atomic(target, "one")
  paths.write_atomic(str(target), b"two")
  assert target.read_bytes() == b"two"
  assert sorted(os.listdir(target.parent)) == ["results.json"]        # no temp file left
  assert paths.sha256_file(target) == hashlib.sha256(b"two").hexdigest() == paths.sha256_bytes(
      "two")


def test_write_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
  target = tmp_path / "r.json"
  target.write_text("old")

  def boom(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError, match="disk full"):
    paths.write_atomic(target, "new")
  assert target.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_replace_dir_local(tmp_path):
  dst = tmp_path / "ds"
  for version in (1, 2):
    src = paths.make_temp_dir(dst)
    assert src.parent == tmp_path and src.name.startswith(".ds.tmp-")
    (src / "v.txt").write_text(str(version))
    paths.replace_dir(src, dst)
    assert (dst / "v.txt").read_text() == str(version) and not src.exists()
  assert sorted(os.listdir(tmp_path)) == ["ds"]                  # no .old / .tmp left behind


def test_replace_dir_race_keeps_valid_winner(tmp_path, monkeypatch):
  dst = tmp_path / "cache"
  src = paths.make_temp_dir(dst)
  (src / "mine").write_text("x")
  real_replace = os.replace

  def racing_replace(a, b):
    if os.fspath(b) == os.fspath(dst):           # another builder finished in between
      (dst / "theirs").parent.mkdir(exist_ok=True)
      (dst / "theirs").write_text("y")
    return real_replace(a, b)
  monkeypatch.setattr(os, "replace", racing_replace)
  paths.replace_dir(src, dst, accept_existing=lambda d: (d / "theirs").exists())
  assert os.listdir(dst) == ["theirs"] and not src.exists()


def test_local_staging_is_the_directory_itself(tmp_path):
  with paths.local_staging(tmp_path / "tb") as d:
    (d / "f").write_text("x")
  assert (tmp_path / "tb" / "f").read_text() == "x"
