"""Preemption everywhere (train/preemption.py): SIGTERM is a stop request for the whole job.

In-process: the scope turns SIGTERM into a flag for its whole block (not only while a model
trains), nested scopes share it, and the train loop stops at its next step boundary with a
checkpoint and exit status 0.

Through the real entry point (``python -m userllm_jax.main``, the tiny User-LLM job, 1 CPU
device; ~3 minutes here): SIGTERM while the first method is being evaluated -> exit status 0,
no results written; the re-run reuses stage 1 and the method's training (nothing trained or
evaluated twice but the interrupted evaluation) and writes the results.json of an
uninterrupted run, which runs beside it.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from userllm_jax.train import loop
from userllm_jax.train import mesh as mesh_lib
from userllm_jax.train import preemption

import _train_worker as tw
import test_main_distributed as tmd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = "userllm_soft_prompt"
ARGS = ["--config=configs/userllm_movielens_100k.py:tiny", "--config.encoder.train.steps=20",
        "--config.train.steps=20", "--config.tasks.num_test_users=40"]


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


def _spawn(workdir, log):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, "-m", "userllm_jax.main", f"--workdir={workdir}",
                           *ARGS], cwd=REPO, env=env, stdout=open(log, "w"),
                          stderr=subprocess.STDOUT)


def _log(path):
  with open(path) as f:
    return f.read()


def test_sigterm_during_evaluation_then_rerun_gives_the_uninterrupted_results(tmp_path):
  work, ref = tmp_path / "work", tmp_path / "ref"
  reference = _spawn(ref, tmp_path / "ref.log")
  job = _spawn(work, tmp_path / "run1.log")
  deadline = time.time() + 900
  # The evaluation's progress bar for the method: it is being evaluated (the first batch
  # compiles for seconds; the stop comes at the next batch).
  while f"{METHOD}/" not in _log(tmp_path / "run1.log"):
    assert job.poll() is None, f"ended before its evaluation:\n{_log(tmp_path / 'run1.log')[-3000:]}"
    assert time.time() < deadline
    time.sleep(0.1)
  job.send_signal(signal.SIGTERM)
  assert job.wait(timeout=300) == 0, _log(tmp_path / "run1.log")[-3000:]
  log1 = _log(tmp_path / "run1.log")
  assert f"preempted evaluating {METHOD}" in log1
  assert not (work / METHOD / "results.json").exists() and not (work / "results.json").exists()
  assert (work / METHOD / "train_info.json").exists()

  rerun = _spawn(work, tmp_path / "run2.log")
  assert tmd.wait([rerun, reference]) == [0, 0], _log(tmp_path / "run2.log")[-3000:]
  log2 = _log(tmp_path / "run2.log")
  assert "results are there; not evaluating again" in log2           # stage 1 reused
  assert "resumed from step 20" in log2 and "step 0/20" not in log2   # nothing retrained
  assert f"{METHOD}: trained before (step 20)" in log2
  a, b = tmd.eval_metrics(work), tmd.eval_metrics(ref)
  assert a.keys() == b.keys() and any("genre_accuracy" in k for k in a)
  diff = {k: (a[k], b[k]) for k in a if not np.isclose(a[k], b[k], rtol=1e-6, atol=0)}
  assert not diff, diff
  with open(work / "results.json") as f, open(ref / "results.json") as g:
    assert json.load(f)["stage1"]["test"] == json.load(g)["stage1"]["test"]
