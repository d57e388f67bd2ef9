"""train/sharding_report.py: the 4B-width User-LLM train step on 8 fake CPU devices
(data=2, fsdp=2, tensor=2), compiled AOT on abstract shapes; reduced depth (1 LLM layer) to
keep the compile short.  The full 34-layer report is `python -m userllm_jax.train.sharding_report`."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(tmp_path, *args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
                       " --xla_force_host_platform_device_count=8")
  out = tmp_path / "report.json"
  proc = subprocess.run(
      [sys.executable, "-m", "userllm_jax.train.sharding_report", "--layers=1", "--seq=32",
       "--target=8", "--hist=8", "--batch=8", "--num_items=1000", f"--json={out}",
       "--mesh=2,2,2", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_4b_width_step_is_sharded_and_fits_16gib(tmp_path):
  proc, r = _report(tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert r["replicated_large"] == [] and r["fits"]
  # The 262144 x 2560 embedding is split over tensor x fsdp: 1/4 of 2.5 GiB per device.
  name, shape, spec, nbytes = r["largest"][0]
  assert shape == [262144, 2560] and nbytes == 262144 * 2560 * 4 // 4, r["largest"][0]
  total = r["num_params"] * 4
  assert r["param_bytes_per_device"] < 0.3 * total       # ~1/4: replicated over 'data' only
  assert abs(r["opt_bytes_per_device"] - 2 * r["param_bytes_per_device"]) < 1e6  # Adam mu, nu
  args = r["memory"]["argument_size_in_bytes"]
  assert abs(args - r["param_bytes_per_device"] - r["opt_bytes_per_device"]) < 0.02 * args
  assert r["memory"]["temp_size_in_bytes"] > 0 and r["flops_per_device"] > 0
  for line in ("optimizer state", "XLA temp", "peak = args + out - alias + temp",
               "fully replicated: 0"):
    assert line in proc.stdout


def test_replicated_large_param_fails_before_compiling(tmp_path):
  proc, r = _report(tmp_path, "--mesh=8,1,1")       # pure data parallelism: all replicated
  assert proc.returncode != 0 and r is None
  assert "fully replicated on mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in proc.stderr
  assert "input_embedding" in proc.stderr
