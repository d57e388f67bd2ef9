"""benchmarks/gpu_weights.py: split into checked pieces, join, and loud failures on bad pieces."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_weights.py"


def _load():
  spec = importlib.util.spec_from_file_location("gpu_weights", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


gw = _load()


@pytest.fixture
def blob(tmp_path):
  path = tmp_path / "model.gguf"
  path.write_bytes(np.random.default_rng(0).bytes(2_500_123))
  return path


def test_piece_names_are_letters():
  assert gw.piece_names(3) == ["a", "b", "c"]
  names = gw.piece_names(30)
  assert names[25] == "z" and names[26] == "ba" and len(set(names)) == 30


def test_split_join_roundtrip_with_uneven_last_piece(tmp_path, blob):
  m = gw.split(blob, tmp_path / "wts", piece_bytes=1_000_000)
  assert [p["name"] for p in m["pieces"]] == ["a", "b", "c"]
  assert [p["size"] for p in m["pieces"]] == [1_000_000, 1_000_000, 500_123]
  assert m["sha256"] == gw.sha256_file(blob) and m["name"] == "model.gguf"
  on_disk = json.loads((tmp_path / "wts" / "manifest.json").read_text())
  assert on_disk == m
  out = gw.join(tmp_path / "wts", tmp_path / "joined")
  assert out == tmp_path / "joined" / "model.gguf"
  assert out.read_bytes() == blob.read_bytes()
  assert gw.join(tmp_path / "wts", tmp_path / "joined") == out  # idempotent
  # A re-split with bigger pieces removes the stale third piece.
  gw.split(blob, tmp_path / "wts", piece_bytes=2_000_000)
  assert not (tmp_path / "wts" / "c").exists()


def test_corrupted_piece_is_named(tmp_path, blob):
  gw.split(blob, tmp_path / "wts", piece_bytes=1_000_000)
  piece = tmp_path / "wts" / "b"
  data = bytearray(piece.read_bytes())
  data[1234] ^= 0xFF
  piece.write_bytes(bytes(data))
  with pytest.raises(gw.PieceError, match=r"piece b .*sha256"):
    gw.join(tmp_path / "wts", tmp_path / "joined")
  assert not (tmp_path / "joined" / "model.gguf").exists()
  # The command line fails loudly with the same message and exit status 1.
  proc = subprocess.run([sys.executable, str(SCRIPT), "join", f"--src={tmp_path / 'wts'}",
                         f"--out={tmp_path / 'joined'}"], capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 1
  assert "piece b" in proc.stderr and "sha256" in proc.stderr


def test_missing_and_truncated_pieces_are_named(tmp_path, blob):
  gw.split(blob, tmp_path / "wts", piece_bytes=1_000_000)
  (tmp_path / "wts" / "c").write_bytes(b"short")
  with pytest.raises(gw.PieceError, match=r"piece c .*5 bytes"):
    gw.check_pieces(tmp_path / "wts")
  (tmp_path / "wts" / "a").unlink()
  with pytest.raises(gw.PieceError, match=r"piece\(s\) a missing"):
    gw.check_pieces(tmp_path / "wts")
  (tmp_path / "wts" / "manifest.json").unlink()
  with pytest.raises(gw.PieceError, match="no manifest"):
    gw.check_pieces(tmp_path / "wts")


def test_cli_split_prints_pieces(tmp_path, blob):
  proc = subprocess.run([sys.executable, str(SCRIPT), "split", f"--src={blob}",
                         f"--out={tmp_path / 'wts'}", "--piece_mib=1"], capture_output=True,
                        text=True, check=True)
  assert proc.stdout.count("MiB") == 3 and "manifest.json" in proc.stdout


def test_check_reports_ok_missing_and_bad(tmp_path, blob):
  gw.split(blob, tmp_path / "wts", piece_bytes=1_000_000)
  (tmp_path / "wts" / "a").unlink()
  assert gw.status(tmp_path / "wts") == {"a": "missing", "b": "ok", "c": "ok"}
  proc = subprocess.run([sys.executable, str(SCRIPT), "check", f"--src={tmp_path / 'wts'}"],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0 and "2 of 3 pieces ok" in proc.stdout
  (tmp_path / "wts" / "c").write_bytes(b"x" * 500_123)
  assert gw.status(tmp_path / "wts")["c"].startswith("bad: sha256")
  proc = subprocess.run([sys.executable, str(SCRIPT), "check", f"--src={tmp_path / 'wts'}"],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 1
