"""benchmarks/sweep_encoder.py drives the real encoder job (no second pipeline)."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
  spec = importlib.util.spec_from_file_location("sweep_encoder",
                                                ROOT / "benchmarks" / "sweep_encoder.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


sw = _load()


@pytest.mark.parametrize("name", ["encoder_sweep.txt", "encoder_sweep_short.txt"])
def test_sweep_files_parse(name):
  runs = sw.read_sweep(str(ROOT / "benchmarks" / name))
  assert runs and len({n for n, _ in runs}) == len(runs)


def test_sweep_lines_must_be_config_overrides(tmp_path):
  bad = tmp_path / "s.txt"
  bad.write_text("ok | --config.train.steps=3\nold | --steps 3\n")
  with pytest.raises(ValueError, match=r"s.txt:2: old: overrides must be --config"):
    sw.read_sweep(str(bad))


def test_command_is_the_job_entry_point():
  cmd = sw.command("configs/encoder_movielens_100k.py", "/tmp/w",
                   "--config.model.features=\"('item',)\" --config.train.lr=2e-3")
  assert cmd[0] == sys.executable and cmd[1:3] == ["-m", "userllm_jax.main"]
  assert cmd[-2:] == ["--config.model.features=('item',)", "--config.train.lr=2e-3"]
  assert "--workdir=/tmp/w" in cmd


@pytest.mark.slow   # a whole (tiny) encoder job per sweep line; the sweep plumbing is tested above
def test_one_tiny_run_through_the_job(tmp_path):
  sweep = tmp_path / "s.txt"
  sweep.write_text("tiny_sas | --config.model.features=\"('item',)\" --config.train.steps=4 "
                   "--config.train.eval_every=2\n")
  out = tmp_path / "sweep.json"
  rc = sw.main([f"--sweep={sweep}", f"--config={ROOT}/configs/encoder_movielens_100k.py:tiny",
                f"--workdir={tmp_path / 'runs'}", f"--out={out}", "--timeout=600"])
  res = json.loads(out.read_text())
  assert rc == 0, res
  (r,) = res
  job = json.loads((tmp_path / "runs" / "tiny_sas" / "results.json").read_text())
  assert job["model"]["config"]["features"] == ["item"] and r["steps"] == 4
  assert r["test"]["hr@10"] == job["test"]["model"]["hr@10"]
  assert r["best_valid_step"] in (2, 4)
