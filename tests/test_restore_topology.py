"""Restore on any topology: a checkpoint written by 2 processes x 4 CPU devices (mesh
data=2, fsdp=2, tensor=2) restores on 1 process x 8 devices and on 1 x 1 with identical
params and optimizer-restored state, and the data position continues by the documented rule
(train/checkpoint.py): after G x S examples of the global order (global batch G, step S), the
next global batch is exactly the next G examples, whatever the process count.

Plus the rule itself in-process: the elastic and strided cases, and the clear errors
(naming both process counts) where no rule applies.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from userllm_jax.train import checkpoint as ckpt_lib

import _train_worker as tw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_train_worker.py")
STEPS, BATCH = 4, 8


def _spawn(devices, args):
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, WORKER, f"--steps={STEPS}", f"--batch={BATCH}",
                           f"--ckpt_every={STEPS}", "--data=strided"] + args, cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=900):
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
  tmp = tmp_path_factory.mktemp("topo")
  port = portpicker.pick_unused_port()
  procs = [_spawn(4, [f"--workdir={tmp}/w2x4", f"--out={tmp}/w2x4.json", "--mesh=2,2,2",
                      f"--dump={tmp}/w2x4", "--num_processes=2", f"--process_id={i}",
                      f"--port={port}"]) for i in range(2)]
  for p in procs:
    _wait(p)
  # The same checkpoint, resumed (0 further steps) on 1 x 8 (data=2, fsdp=4) and on 1 x 1.
  for name, devices, mesh in (("w1x8", 8, "2,4,1"), ("w1x1", 1, "1,1,1")):
    shutil.copytree(tmp / "w2x4", tmp / name, ignore=shutil.ignore_patterns("tb", "*.jsonl"))
  restores = [_spawn(devices, [f"--workdir={tmp}/{name}", f"--out={tmp}/{name}.json",
                               f"--mesh={mesh}", f"--dump={tmp}/{name}"])
              for name, devices, mesh in (("w1x8", 8, "2,4,1"), ("w1x1", 1, "1,1,1"))]
  for p in restores:
    _wait(p)
  out = {}
  for name in ("w2x4", "w1x8", "w1x1"):
    with open(tmp / f"{name}.json") as f:
      out[name] = json.load(f)
    n = out[name]["processes"]
    out[name]["params"] = tw.load_dumped_params(str(tmp / name), n)
    out[name]["next"] = [json.load(open(tmp / f"{name}.p{i}.json"))["next_ids"]
                         for i in range(n)]
  out["tmp"] = tmp
  return out


def test_written_by_2_processes(runs):
  r = runs["w2x4"]
  assert r["processes"] == 2 and r["devices"] == 8
  assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert r["start_step"] == 0 and r["step"] == STEPS
  data_dir = runs["tmp"] / "w2x4" / "checkpoints" / str(STEPS) / "data"
  assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.parametrize("name", ["w1x8", "w1x1"])
def test_restores_on_other_topology_with_identical_params(runs, name):
  r = runs[name]
  assert r["processes"] == 1 and r["start_step"] == STEPS and r["step"] == STEPS
  assert r["devices"] == (8 if name == "w1x8" else 1)
  ref = runs["w2x4"]["params"]
  assert sorted(r["params"]) == sorted(ref)
  for k in ref:
    assert not np.isnan(ref[k]).any(), k           # every shard was dumped
    np.testing.assert_array_equal(r["params"][k], ref[k], err_msg=k)


@pytest.mark.parametrize("name", ["w2x4", "w1x8", "w1x1"])
def test_data_position_continues_at_global_step_times_global_batch(runs, name):
  order = tw.global_order((STEPS + 1) * BATCH)
  want = order[STEPS * BATCH:(STEPS + 1) * BATCH]      # the next global batch
  got = runs[name]["next"]
  n = len(got)
  # process i takes positions i, i+n, ... of the global order: together the next G examples
  assert [sorted(g) for g in got] == [sorted(want[i::n]) for i in range(n)]
  assert sorted(sum(got, [])) == sorted(want)


# --------------------------------------------------------------------- the rule, in-process


def test_strided_rule_carries_global_position():
  saved = {0: {"next_index": 16}, 1: {"next_index": 16}}    # 2 processes, 16 examples each
  assert ckpt_lib.reshard_data_state(saved, 0, 1, layout="strided") == {"next_index": 32}
  assert ckpt_lib.reshard_data_state(saved, 3, 4, layout="strided") == {"next_index": 8}
  with pytest.raises(ckpt_lib.DataTopologyError,
                     match=r"saved by 2 processes and is restored on 3.*32 examples"):
    ckpt_lib.reshard_data_state(saved, 0, 3, layout="strided")
  with pytest.raises(ckpt_lib.DataTopologyError, match="different numbers of examples"):
    ckpt_lib.reshard_data_state({0: {"next_index": 16}, 1: {"next_index": 8}}, 0, 1,
                                layout="strided")


def test_replicated_state_is_the_global_batch_position():
  """Stage 2's stream: every process iterates the same global batches (keeping its rows)."""
  saved = {0: {"next_index": 7}, 1: {"next_index": 7}}
  assert ckpt_lib.reshard_data_state(saved, 0, 1, layout="replicated") == {"next_index": 7}
  assert ckpt_lib.reshard_data_state(saved, 2, 4, layout="replicated") == {"next_index": 7}
  with pytest.raises(ckpt_lib.DataTopologyError, match="saved states differ"):
    ckpt_lib.reshard_data_state({0: {"next_index": 7}, 1: {"next_index": 6}}, 0, 1,
                                layout="replicated")


def test_elastic_state_is_shared_by_all_processes():
  saved = {i: {"global_next_index": 96} for i in range(4)}
  assert ckpt_lib.reshard_data_state(saved, 1, 2, layout=None) == {"global_next_index": 96}


@pytest.mark.parametrize("state,layout", [
    ({"next_index": 16}, None),                      # undeclared layout
    ({"parent": {"next_index": 3}, "buffer": []}, "strided"),   # e.g. a packing buffer
])
def test_no_rule_is_a_clear_error_naming_both_counts(state, layout):
  with pytest.raises(ckpt_lib.DataTopologyError) as err:
    ckpt_lib.reshard_data_state({0: state, 1: state}, 0, 1, layout=layout)
  msg = str(err.value)
  assert "saved by 2 processes and is restored on 1" in msg
  assert "resume on 2 processes" in msg and "model" not in msg


def test_finished_training_resumes_on_another_process_count_without_a_data_rule(tmp_path):
  """A 2-process checkpoint of an iterator with no shard layout (no rule carries its position)
  resumes on 1 process when training is finished (no more data is read); a run that still has
  steps to go gets the DataTopologyError naming both process counts."""
  import jax  # pylint: disable=g-import-not-at-top
  from userllm_jax.train import loop  # pylint: disable=g-import-not-at-top
  from userllm_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  kw = dict(build_model=tw.build_model, loss_fn=tw.tiny_loss, mesh=mesh)
  loop.run_training(tw.make_config(steps=3), str(tmp_path), train_iter=tw.make_iterator(8),
                    **kw)
  data = tmp_path / "checkpoints" / "3" / "data"
  state = (data / "process_0-of-1.json").read_text()
  (data / "process_0-of-1.json").unlink()
  for i in range(2):     # as if written by 2 processes
    (data / f"process_{i}-of-2.json").write_text(state)
  res = loop.run_training(tw.make_config(steps=3), str(tmp_path),
                          train_iter=tw.make_iterator(8), **kw)
  assert res.start_step == res.step == 3
  with pytest.raises(ckpt_lib.DataTopologyError, match="saved by 2 processes and is restored on 1"):
    loop.run_training(tw.make_config(steps=5), str(tmp_path), train_iter=tw.make_iterator(8),
                      **kw)
