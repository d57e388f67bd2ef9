"""The real entry point on every layout: ``python -m userllm_jax.main`` with the tiny User-LLM
config (stage 1 = encoder pretraining on the real Grain pipeline, stage 2 = User-LLM soft
prompt on the real task streams, evaluation with beam search and the genre trie) as
2 processes x 4 CPU devices (``jax.distributed`` on 127.0.0.1) and as 1 process x 8 devices,
both on the mesh data=2, fsdp=2, tensor=2.

``@pytest.mark.slow`` like everything here (~5-9 minutes on 2 busy cores, both layouts at once): losses step by step (stage 1
and stage 2, float tolerance), final parameters of both stages (float tolerance) and every
evaluation metric (equal) of the 2-process run match the 1-process run.

``@pytest.mark.slow`` (``--runslow``): preemption during evaluation (~2-3 minutes): the 1 x 8
job gets SIGTERM while it evaluates the method -> exit status 0, no results written; the
re-run reuses stage 1 and the method's training (no training step, no stage-1 evaluation
again) and writes the uninterrupted run's results (in-process, the default run checks the
same stop in tests/test_userllm_job.py).  The 2-process run is SIGKILLed (one process) after its
stage-2 checkpoint, both processes are restarted and finish with the uninterrupted run's
results; the checkpoint taken at the kill also finishes on 1 process x 8 devices with the same
results (~10 minutes here).  And the encoder job on its own (configs/encoder_movielens_100k.py
:tiny, ml-100k) as 2 x 4 and 1 x 8: the same losses, parameters and metrics.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest

from userllm_jax.train.metrics_writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = "userllm_soft_prompt"
STEPS1, STEPS2 = 10, 10
MESH = [f"--config.{sec}mesh.{a}=2" for sec in ("", "encoder.") for a in ("data", "fsdp",
                                                                         "tensor")]
ARGS = ["--config=configs/userllm_movielens_100k.py:tiny",
        f"--config.encoder.train.steps={STEPS1}", f"--config.train.steps={STEPS2}",
        "--config.encoder.train.log_every=1", "--config.train.log_every=1",
        "--config.tasks.num_test_users=20", "--config.tasks.history_lengths=(12,)"] + MESH


ENCODER_ARGS = ["--config=configs/encoder_movielens_100k.py:tiny", "--config.train.log_every=1",
                "--config.train.steps=8"] + [f"--config.mesh.{a}=2" for a in ("data", "fsdp",
                                                                                "tensor")]


def spawn(workdir, log, *, devices, process_id=None, port=None, extra=(), args=ARGS):
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "userllm_jax.main", f"--workdir={workdir}", *args, *extra]
  if process_id is not None:
    cmd += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={process_id}"]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"),
                          stderr=subprocess.STDOUT)


def spawn_pair(workdir, log_prefix, extra=(), args=ARGS):
  port = portpicker.pick_unused_port()
  return [spawn(workdir, f"{log_prefix}.{i}.log", devices=4, process_id=i, port=port,
                extra=extra, args=args) for i in range(2)]


def wait(procs, timeout=900):
  deadline = time.time() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"{p.args[-1]} timed out after {timeout}s; see its log")
  return [p.returncode for p in procs]


def tail(log, n=3000):
  with open(log) as f:
    return f.read()[-n:]


def losses(workdir):
  return [m["train/loss"] for _, m in sorted(read_metrics(str(workdir)).items())]


def checkpoint_params(ckpt_dir):
  """The ``params`` of the newest checkpoint in ``ckpt_dir``, as numpy (any topology)."""
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  path = os.path.join(ckpt_dir, str(step), "state")
  ck = ocp.PyTreeCheckpointer()
  tree = ck.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return step, ck.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))["params"]


def eval_metrics(workdir):
  """Every number of results.json that is not a timing."""
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  timing = ("_ms", "_s", "seconds", "steps_per_sec")
  out = {}

  def walk(x, key):
    name = key.split("/")[-1]
    # Run records, not results: timings, and XLA's FLOP count of the first batch shape this
    # run compiled (a restarted run starts on another batch, of another shape).
    if name.endswith(timing) or name in ("timings", "compile", "dir", "compiled_step_flops"):
      return
    if isinstance(x, dict):
      for k, v in x.items():
        walk(v, f"{key}/{k}")
    elif isinstance(x, list):
      for i, v in enumerate(x):
        walk(v, f"{key}/{i}")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
      out[key] = x
  for section in ("methods", "baselines", "sweep"):
    walk(r[section], section)
  return out


def assert_same_run(a, b, *, loss_rtol=2e-5, param_rtol=1e-4):
  """Workdirs ``a`` and ``b`` hold the same job's results (see the module docstring)."""
  for sub, steps in (("stage1", STEPS1), (METHOD, STEPS2)):
    la, lb = losses(a / sub), losses(b / sub)
    assert len(la) == len(lb) == steps, (sub, len(la), len(lb))
    np.testing.assert_allclose(la, lb, rtol=loss_rtol, err_msg=f"{sub} losses")
    sa, pa = checkpoint_params(a / sub / "checkpoints")
    sb, pb = checkpoint_params(b / sub / "checkpoints")
    assert sa == sb == steps
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=param_rtol, atol=1e-6),
                 pa, pb)
  ma, mb = eval_metrics(a), eval_metrics(b)
  assert ma.keys() == mb.keys() and len(ma) > 10
  assert any("genre_accuracy" in k for k in ma) and any("recall@" in k for k in ma)
  diff = {k: (ma[k], mb[k]) for k in ma if not np.isclose(ma[k], mb[k], rtol=1e-3, atol=0)}
  # train FLOPs and losses agree to float tolerance; accuracies and recalls exactly
  assert not diff, diff
  for k in ma:
    if "accuracy" in k or "recall@" in k:
      assert ma[k] == mb[k], (k, ma[k], mb[k])


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("main_dist")
  pair = spawn_pair(tmp / "p2x4", tmp / "p2x4")
  one = spawn(tmp / "p1x8", tmp / "p1x8.log", devices=8)
  rcs = wait(pair + [one])
  assert rcs == [0, 0, 0], [tail(tmp / f) for f in ("p2x4.0.log", "p2x4.1.log", "p1x8.log")]
  return tmp


@pytest.mark.slow   # ~4 min on 2 cores; the default run has the same comparison on a toy
                    # model (test_train_distributed.py) and the topology restores
def test_two_processes_equal_one_process(layouts):
  tmp = layouts
  with open(tmp / "p2x4" / "stage1" / "results.json") as f:
    s1 = json.load(f)
  assert s1["processes"] == 2 and s1["devices"] == 8
  assert s1["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  # only process 0 wrote the job's files, and the log shows the 2-process mesh for stage 2
  assert "over 8 devices (2 processes)" in tail(tmp / "p2x4.1.log", 10**7)
  assert_same_run(tmp / "p2x4", tmp / "p1x8")


@pytest.mark.slow
def test_sigkill_and_restart_then_resume_on_one_process(layouts, tmp_path):
  """Kill process 1 of 2 (SIGKILL) right after the stage-2 checkpoint at step 5; restart both:
  the job finishes with the uninterrupted results.  The workdir as it was at the kill also
  finishes on 1 process x 8 devices with the same results."""
  work = tmp_path / "killed"
  ckpt5 = work / METHOD / "checkpoints" / "5"
  pair = spawn_pair(work, tmp_path / "run1", extra=["--config.train.ckpt_every=5"])
  deadline = time.time() + 900
  try:
    while not ckpt5.is_dir():      # Orbax renames the finished step directory into place
      assert time.time() < deadline, tail(tmp_path / "run1.0.log")
      assert pair[0].poll() is None, f"ended before the checkpoint:\n{tail(tmp_path / 'run1.0.log')}"
      time.sleep(0.2)
  finally:
    if not ckpt5.is_dir():
      for p in pair:
        p.kill()
  pair[1].send_signal(signal.SIGKILL)
  pair[1].wait()
  # process 0 cannot go on without its peer: it errors or blocks in a collective
  try:
    pair[0].wait(timeout=60)
  except subprocess.TimeoutExpired:
    pair[0].kill()
    pair[0].wait()
  assert not (work / "results.json").exists()
  time.sleep(1.0)   # let an in-flight Orbax finalisation of step 5 settle on disk
  copy = tmp_path / "killed_on_1"
  shutil.copytree(work, copy)
  steps = sorted(int(d) for d in os.listdir(work / METHOD / "checkpoints") if d.isdigit())
  assert steps and steps[-1] < STEPS2, steps       # killed mid-run
  restarted = spawn_pair(work, tmp_path / "run2", extra=["--config.train.ckpt_every=5"])
  single = spawn(copy, tmp_path / "run1x8.log", devices=8,
                 extra=["--config.train.ckpt_every=5"])
  rcs = wait(restarted + [single])
  assert rcs == [0, 0, 0], [tail(tmp_path / f) for f in ("run2.0.log", "run1x8.log")]
  assert f"resumed from step {steps[-1]}" in tail(tmp_path / "run2.0.log", 10**7)
  assert_same_run(work, layouts / "p2x4")
  assert_same_run(copy, layouts / "p2x4")


@pytest.mark.slow   # the default run checks SIGTERM during evaluation in-process
                    # (tests/test_userllm_job.py); this is the entry point's exit status
def test_sigterm_during_evaluation_then_rerun_gives_the_uninterrupted_results(layouts, tmp_path):
  work = tmp_path / "work"
  job = spawn(work, tmp_path / "run1.log", devices=8)
  try:
    deadline = time.time() + 900
    # The progress bar of the method's first task: it is being evaluated (the first batch
    # compiles for seconds; the stop comes before the next batch).
    while f"{METHOD}/fav_genre/h" not in tail(tmp_path / "run1.log", 10**7):
      assert job.poll() is None, f"ended before its evaluation:\n{tail(tmp_path / 'run1.log')}"
      assert time.time() < deadline
      time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=300) == 0, tail(tmp_path / "run1.log")
  finally:
    if job.poll() is None:
      job.kill()
  log1 = tail(tmp_path / "run1.log", 10**7)
  assert f"preempted evaluating {METHOD}" in log1
  assert not (work / METHOD / "results.json").exists() and not (work / "results.json").exists()
  assert (work / METHOD / "train_info.json").exists()
  rerun = spawn(work, tmp_path / "run2.log", devices=8)
  assert wait([rerun]) == [0], tail(tmp_path / "run2.log")
  log2 = tail(tmp_path / "run2.log", 10**7)
  assert "results are there; not evaluating again" in log2             # stage 1 reused
  assert f"resumed from step {STEPS2}" in log2 and "step 0/" not in log2  # nothing retrained
  assert f"{METHOD}: trained before (step {STEPS2})" in log2
  a, b = eval_metrics(work), eval_metrics(layouts / "p1x8")
  assert a.keys() == b.keys() and any("genre_accuracy" in k for k in a)
  assert a == b, {k: (a[k], b[k]) for k in a if a[k] != b[k]}


@pytest.mark.slow
def test_encoder_job_two_processes_equal_one_process(tmp_path):
  """``configs/encoder_movielens_100k.py:tiny`` (ml-100k, the real pretraining pipeline) as
  2 x 4 and 1 x 8 devices on data=2, fsdp=2, tensor=2."""
  procs = spawn_pair(tmp_path / "p2x4", tmp_path / "p2x4", args=ENCODER_ARGS) + [
      spawn(tmp_path / "p1x8", tmp_path / "p1x8.log", devices=8, args=ENCODER_ARGS)]
  assert wait(procs) == [0, 0, 0], [tail(tmp_path / f) for f in ("p2x4.0.log", "p1x8.log")]
  la, lb = losses(tmp_path / "p2x4"), losses(tmp_path / "p1x8")
  assert len(la) == len(lb) == 8
  np.testing.assert_allclose(la, lb, rtol=2e-5)
  (sa, pa), (sb, pb) = (checkpoint_params(tmp_path / w / "checkpoints") for w in ("p2x4", "p1x8"))
  assert sa == sb == 8
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), pa, pb)
  with open(tmp_path / "p2x4" / "results.json") as f, open(tmp_path / "p1x8" / "results.json") as g:
    ra, rb = json.load(f), json.load(g)
  assert ra["processes"] == 2 and rb["processes"] == 1
  for split in ("valid", "test"):
    for k, v in rb[split]["model"].items():
      np.testing.assert_allclose(ra[split]["model"][k], v, rtol=1e-6, err_msg=f"{split} {k}")
