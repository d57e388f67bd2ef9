"""Preemption everywhere (train/preemption.py): SIGTERM is a stop request for the whole job.

In-process: the scope turns SIGTERM into a flag for its whole block (not only while a model
trains), nested scopes share it, and the train loop stops at its next step boundary with a
checkpoint and exit status 0.  Two processes (the toy model of tests/_train_worker.py): a
SIGTERM to one of them stops both at the same step (JAX's preemption sync point).

SIGTERM during the evaluation of the tiny User-LLM job through ``python -m userllm_jax.main``
is tested in tests/test_main_distributed.py (it reuses that module's uninterrupted run).
"""

import os
import signal
import subprocess
import sys
import time

import jax
import portpicker
import pytest

from userllm_jax.train import loop
from userllm_jax.train import mesh as mesh_lib
from userllm_jax.train import preemption

import _train_worker as tw
import test_main_distributed as tmd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scope_turns_sigterm_into_a_stop_request_for_its_whole_block():
  before = signal.getsignal(signal.SIGTERM)
  assert not preemption.requested()                 # no scope: never
  with preemption.scope() as outer:
    with preemption.scope() as inner:
      assert inner is outer                         # the loop's scope inside a job's
    assert not preemption.requested()
    os.kill(os.getpid(), signal.SIGTERM)            # handled: this process lives on
    time.sleep(0.05)
    assert preemption.requested()
    with pytest.raises(SystemExit) as e:
      preemption.exit_if_requested("in a test")
    assert e.value.code == 0
  assert signal.getsignal(signal.SIGTERM) == before
  assert not preemption.requested()


def test_train_loop_stops_at_the_next_step_with_a_checkpoint(tmp_path):
  cfg = tw.make_config(steps=6)
  mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  kw = dict(build_model=tw.build_model, loss_fn=tw.tiny_loss, mesh=mesh)
  with preemption.scope() as p:
    p.request()                                     # as if SIGTERM came before step 0
    with pytest.raises(SystemExit) as e:
      loop.run_training(cfg, str(tmp_path), train_iter=tw.make_iterator(8), **kw)
    assert e.value.code == 0
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
  res = loop.run_training(cfg, str(tmp_path), train_iter=tw.make_iterator(8), **kw)
  assert res.start_step == 1 and res.step == 6


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
  """Multi-process: JAX's preemption sync point (train/preemption.py) -- SIGTERM to process 0
  only; both processes checkpoint the same step and exit 0, and the checkpoint resumes."""
  port = portpicker.pick_unused_port()
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)

  def worker(i, extra=()):
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "_train_worker.py"),
         f"--workdir={tmp_path}/w", f"--out={tmp_path}/out.json", "--mesh=2,4,1", "--steps=40",
         "--num_processes=2", f"--process_id={i}", f"--port={port}", *extra],
        cwd=REPO, env=env, stdout=open(tmp_path / f"p{i}.log", "w"), stderr=subprocess.STDOUT)

  procs = [worker(0, ["--sigterm_at=3"]), worker(1)]
  assert tmd.wait(procs, timeout=600) == [0, 0], _log(tmp_path / "p0.log")[-3000:]
  steps = os.listdir(tmp_path / "w" / "checkpoints")
  assert len(steps) == 1 and 3 < int(steps[0]) < 40, steps
  for i in range(2):
    assert f"preempted: checkpoint of step {steps[0]} written" in _log(tmp_path / f"p{i}.log")


def _log(path):
  with open(path) as f:
    return f.read()
