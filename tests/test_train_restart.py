"""Kill-and-restart: SIGTERM -> checkpoint + exit 0; SIGKILL after a checkpoint -> the restart
in the same workdir resumes (step, params, optimizer state, data iterator) and the loss
curve equals the uninterrupted run's step for step."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np

from userllm_jax.train import loop
from userllm_jax.train import mesh as mesh_lib
from userllm_jax.train.metrics_writer import read_metrics

import _train_worker as tw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_train_worker.py")
STEPS = 12


def _worker(workdir, *extra):
  # one CPU device: the run's own flags (tests/conftest.py), without a fake-device count
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                if "device_count" not in f))
  return subprocess.run(
      [sys.executable, WORKER, f"--workdir={workdir}", f"--out={workdir}/out.json",
       f"--steps={STEPS}", "--ckpt_every=3", *extra],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _ckpt_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def test_sigterm_then_sigkill_then_resume_matches_uninterrupted(tmp_path):
  work = str(tmp_path / "run")

  # 1) SIGTERM arrives after step 4 -> checkpoint at the next boundary (5), exit 0.
  p1 = _worker(work, "--sigterm_at=4")
  assert p1.returncode == 0, p1.stderr[-4000:]
  assert "preempted: checkpoint of step 5 written" in p1.stderr
  assert _ckpt_steps(work) == [3, 5]
  assert not os.path.exists(f"{work}/out.json")       # it stopped early

  # 2) resumes at 5, checkpoints 6, then is SIGKILLed after step 8 (no clean-up at all).
  p2 = _worker(work, "--kill_at=8")
  assert p2.returncode == -signal.SIGKILL, p2.stderr[-4000:]
  assert "resumed from step 5" in p2.stderr
  assert 6 in _ckpt_steps(work)
  logged = read_metrics(work)
  assert max(logged) >= 6           # steps after the last checkpoint were run (and are redone)

  # 3) resumes at 6 and finishes.
  p3 = _worker(work)
  assert p3.returncode == 0, p3.stderr[-4000:]
  assert "resumed from step 6" in p3.stderr

  # the uninterrupted run, in this process
  ref = loop.run_training(tw.make_config(steps=STEPS), str(tmp_path / "ref"),
                          build_model=tw.build_model, loss_fn=tw.tiny_loss,
                          train_iter=tw.make_iterator(8),
                          mesh=mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  want = [m["loss"] for _, m in ref.history]
  logged = read_metrics(work)
  got = [logged[s]["train/loss"] for s in range(STEPS)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert want[-1] < want[0]
