"""benchmarks/full_scale.sh on the CPU: the GPU one-shot's code path with a tiny config.

The script joins and checks weight pieces, runs the job under its time guard and copies the
results into $OUT; here the pieces are a small random file (passed as a GGUF path that the
tiny config's own ``--config.llm.name=tiny`` override then replaces), and no wheels are
installed (``--no-install``).
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "full_scale.sh"
CONFIG = ROOT / "configs" / "userllm_movielens_100k.py"


def _gpu_weights():
  spec = importlib.util.spec_from_file_location("gpu_weights",
                                                ROOT / "benchmarks" / "gpu_weights.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _pieces(tmp_path, corrupt=None):
  blob = tmp_path / "weights.gguf"
  blob.write_bytes(np.random.default_rng(0).bytes(300_000))
  _gpu_weights().split(blob, tmp_path / "wts", piece_bytes=128 * 1024)
  if corrupt:
    p = tmp_path / "wts" / corrupt
    p.write_bytes(b"\0" + p.read_bytes()[1:])
  return tmp_path / "wts"


def _run(tmp_path, *args, timeout=600):
  env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"),
             PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  env.setdefault("USERLLM_CACHE", str(tmp_path / "cache"))
  return subprocess.run(["bash", str(SCRIPT), "--no-install", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def test_bad_piece_stops_before_the_job(tmp_path):
  wts = _pieces(tmp_path, corrupt="b")
  proc = _run(tmp_path, f"--config={CONFIG}", f"--wts={wts}", "--gguf_use=path")
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "piece b" in proc.stdout + proc.stderr
  env_txt = (tmp_path / "out" / "env.txt").read_text()
  assert "commit:" in env_txt and "job:" not in env_txt
  assert not (tmp_path / "work" / "job.log").exists()


@pytest.mark.slow   # ~1 min: the same job path runs by default in tests/test_userllm_job.py
def test_tiny_config_end_to_end(tmp_path):
  spec = importlib.util.spec_from_file_location("cfg", CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if "tiny" not in getattr(mod, "VARIANTS", ()):
    pytest.skip("configs/userllm_movielens_100k.py has no :tiny variant")
  wts = _pieces(tmp_path)
  proc = _run(tmp_path, f"--config={CONFIG}:tiny", f"--wts={wts}", "--gguf_use=path",
              "--total_s=400", "--", "--config.llm.name=tiny", "--config.train.steps=6",
              "--config.encoder.train.steps=10",
              # the script's path, not the job's breadth (tests/test_userllm_job.py has that)
              "--config.tasks.names=('fav_genre',)", "--config.tasks.history_lengths=(12,)",
              "--config.tasks.num_test_users=8", "--config.eval.batch_size=8")
  out = tmp_path / "out"
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  env_txt = (out / "env.txt").read_text()
  assert re.search(r"^commit: [0-9a-f]{40}", env_txt, re.M), env_txt
  assert "weights.gguf (sha256 checked)" in env_txt and "job rc 0" in env_txt
  # The command line's llm.name wins over the joined file.
  job_line = next(l for l in env_txt.splitlines() if l.startswith("job:"))
  assert "weights.gguf" not in job_line and "--config.llm.name=tiny" in job_line
  names = sorted(p.name for p in out.iterdir())
  assert {"env.txt", "results.json", "table.txt", "job.log"} <= set(names)
  assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
  assert (out / "table.txt").read_text().strip()
