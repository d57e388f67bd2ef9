"""The same tiny training run on 1 device, on an 8-device (data=2, fsdp=4) mesh, and on
2 processes x 4 devices (jax.distributed on 127.0.0.1) gives the same losses; params
above a size threshold are sharded; the 8-device checkpoint restores on 1 device.

Fake CPU devices need XLA_FLAGS before JAX starts, so the multi-device runs are
subprocesses (tests/_train_worker.py); the 1-device reference runs in this process.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from userllm_jax.train import loop
from userllm_jax.train import mesh as mesh_lib

import _train_worker as tw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_train_worker.py")
STEPS = 6


def _spawn(devices, args):
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, WORKER, f"--steps={STEPS}"] + args, cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=240):
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f"worker timed out:\n{out[-4000:]}")
  assert proc.returncode == 0, out[-4000:]
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Start the 8-device and the 2x4-device runs concurrently; run 1 device here meanwhile."""
  tmp = tmp_path_factory.mktemp("dist")
  port = portpicker.pick_unused_port()
  min_shard = 1000          # the three 1024-element matrices must be sharded
  procs = {
      "mesh8": [_spawn(8, [f"--workdir={tmp}/mesh8", f"--out={tmp}/mesh8.json",
                           "--mesh=2,4,1", f"--min_shard={min_shard}"])],
      "proc2": [_spawn(4, [f"--workdir={tmp}/proc2", f"--out={tmp}/proc2.json",
                           "--mesh=2,4,1", f"--min_shard={min_shard}", "--num_processes=2",
                           f"--process_id={i}", f"--port={port}"]) for i in range(2)],
  }
  cfg = tw.make_config(steps=STEPS)
  one = loop.run_training(cfg, str(tmp / "one"), build_model=tw.build_model,
                          loss_fn=tw.tiny_loss, train_iter=tw.make_iterator(8),
                          mesh=mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  results = {"one": {"losses": [m["loss"] for _, m in one.history],
                     "params": one.state["params"]}}
  for name, ps in procs.items():
    for p in ps:
      _wait(p)
    with open(tmp / f"{name}.json") as f:
      out = json.load(f)
    out["losses"] = [out["losses"][str(s)] for s in range(STEPS)]
    results[name] = out
  results["tmp"] = tmp
  return results


def test_8_device_mesh_matches_1_device(runs):
  r = runs["mesh8"]
  assert r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  np.testing.assert_allclose(r["losses"], runs["one"]["losses"], rtol=1e-5)
  # fsdp=4 shards the 'embed' dimension of every matrix (assert_sharded ran in the worker too)
  assert r["specs"]["['w_in']"] == "P('fsdp',)"
  assert r["specs"]["['embed']"] == "P(None, 'fsdp')"
  assert r["specs"]["['b_in']"] == "P()"


def test_two_processes_match_one_process(runs):
  r = runs["proc2"]
  assert r["processes"] == 2 and r["devices"] == 8
  np.testing.assert_allclose(r["losses"], runs["mesh8"]["losses"], rtol=1e-5)
  # each process wrote its own data-iterator state into the checkpoint
  data_dir = runs["tmp"] / "proc2" / "checkpoints" / str(STEPS) / "data"
  assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


def test_checkpoint_from_8_devices_restores_on_1_device(runs):
  work = runs["tmp"] / "restore1"
  shutil.copytree(runs["tmp"] / "mesh8", work)
  cfg = tw.make_config(steps=STEPS)
  res = loop.run_training(cfg, str(work), build_model=tw.build_model, loss_fn=tw.tiny_loss,
                          train_iter=tw.make_iterator(8),
                          mesh=mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  assert res.start_step == STEPS and res.history == []
  for leaf in jax.tree.leaves(res.state["params"]):
    assert len(leaf.sharding.device_set) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               res.state["params"], runs["one"]["params"])


def test_maybe_initialize_arguments(monkeypatch):
  from userllm_jax.train import distributed
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert distributed.maybe_initialize() is False          # single process: nothing to do
  with pytest.raises(ValueError, match="without coordinator_address"):
    distributed.maybe_initialize(num_processes=2, process_id=0)
  with pytest.raises(ValueError, match="expected 'host:port'"):
    distributed.maybe_initialize("127.0.0.1", 2, 0)
  with pytest.raises(ValueError, match=r"process_id=2 not in \[0, 2\)"):
    distributed.maybe_initialize("127.0.0.1:1234", 2, 2)
  with pytest.raises(ValueError, match="give both num_processes and process_id"):
    distributed.maybe_initialize("127.0.0.1:1234", 2, None)
