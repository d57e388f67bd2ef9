"""train/loop.py + optim.py in one process on one CPU device, with the tiny model of _train_worker.

NaN/Inf stop, gradient accumulation == the full batch, frozen params (no optimizer
state, bit-identical), the warmup+cosine schedule, the weight-decay mask, the eval
hook and the metrics files.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from userllm_jax.train import loop, optim
from userllm_jax.train.metrics_writer import read_metrics

import _train_worker as tw


def _mesh():
  from userllm_jax.train import mesh as mesh_lib
  return mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])


def _run(tmp_path, name, cfg, **kw):
  it = tw.make_iterator(cfg.train.batch_size, nan_at=kw.pop("nan_at", -1))
  return loop.run_training(cfg, str(tmp_path / name), build_model=tw.build_model,
                           loss_fn=tw.tiny_loss, train_iter=it, mesh=_mesh(), **kw)


def test_nan_stops_with_step_and_metric(tmp_path):
  cfg = tw.make_config(steps=6)
  with pytest.raises(loop.NonFiniteError, match=r"step 3: metric 'loss' = nan is not finite"):
    _run(tmp_path, "nan", cfg, nan_at=3)
  rows = read_metrics(str(tmp_path / "nan"))
  assert sorted(rows) == [0, 1, 2]        # steps before the bad one were logged


def test_grad_accumulation_equals_full_batch(tmp_path):
  full = _run(tmp_path, "full", tw.make_config(steps=4, grad_accum=1))
  acc = _run(tmp_path, "acc", tw.make_config(steps=4, grad_accum=2))
  l_full = [m["loss"] for _, m in full.history]
  l_acc = [m["loss"] for _, m in acc.history]
  np.testing.assert_allclose(l_acc, l_full, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               acc.state["params"], full.state["params"])
  # and the run learned something (so the comparison is not trivially of constants)
  assert l_full[-1] < l_full[0]


def test_frozen_params_have_no_opt_state_and_stay_identical(tmp_path):
  trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed")))
  init = _run(tmp_path, "frozen0", tw.make_config(steps=0), trainable=trainable)
  res = _run(tmp_path, "frozen", tw.make_config(steps=4), trainable=trainable)
  assert set(res.state["frozen"]) == {"embed"}
  assert "embed" not in res.state["params"]
  opt_paths = [jax.tree_util.keystr(p)
               for p, _ in jax.tree_util.tree_flatten_with_path(res.state["opt_state"])[0]]
  assert opt_paths and not any("embed" in p for p in opt_paths), opt_paths
  np.testing.assert_array_equal(np.asarray(res.model.embed[...]),
                                np.asarray(init.model.embed[...]))
  assert not np.allclose(np.asarray(res.model.w_in[...]), np.asarray(init.model.w_in[...]))


def test_checkpoints_leave_out_frozen_params_and_resume_exactly(tmp_path):
  """Frozen params (the pretrained LLM in stage 2) are not written: a resume rebuilds them with
  build_model and continues exactly as the uninterrupted run; train.save_frozen keeps them."""
  trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed")))
  whole = _run(tmp_path, "whole", tw.make_config(steps=6, ckpt_every=3), trainable=trainable)
  _run(tmp_path, "cut", tw.make_config(steps=3, ckpt_every=3), trainable=trainable)
  resumed = _run(tmp_path, "cut", tw.make_config(steps=6, ckpt_every=3), trainable=trainable)
  assert [s for s, _ in resumed.history] == [3, 4, 5]
  np.testing.assert_allclose([m["loss"] for _, m in resumed.history],
                             [m["loss"] for s, m in whole.history if s >= 3], rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, resumed.state["params"], whole.state["params"])
  jax.tree.map(np.testing.assert_array_equal, resumed.state["frozen"], whole.state["frozen"])

  def saved_files(name):  # the saved tree's key paths, from Orbax's metadata files
    root = tmp_path / name / "checkpoints"
    return " ".join(p.read_text(errors="replace") for p in root.rglob("_METADATA")
                    if p.parent.name == "state")

  assert "w_in" in saved_files("whole") and "embed" not in saved_files("whole")
  kept = _run(tmp_path, "kept", tw.make_config(steps=3, ckpt_every=3, save_frozen=True),
              trainable=trainable)
  assert kept.step == 3 and "embed" in saved_files("kept")


def test_schedule_and_logging(tmp_path):
  calls = []

  def eval_fn(model, step):
    calls.append(step)
    assert isinstance(model, tw.TinyLM)
    return {"w_in_norm": jnp.linalg.norm(model.w_in[...])}

  cfg = tw.make_config(steps=8, warmup_steps=2, lr=0.1, eval_every=4, log_every=2)
  res = _run(tmp_path, "log", cfg, eval_fn=eval_fn)
  assert calls == [4, 8]
  lr = {s: m["lr"] for s, m in res.history}
  # linear warmup 0 -> 0.1 over 2 steps, then cosine to 0 at step 8
  expect = {0: 0.0, 1: 0.05, 2: 0.1}
  for s in range(3, 8):
    expect[s] = 0.1 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))
  for s, v in expect.items():
    assert lr[s] == pytest.approx(v, rel=1e-5, abs=1e-7), s
  rows = read_metrics(str(tmp_path / "log"))
  assert sorted(s for s in rows if "train/loss" in rows[s]) == [0, 1, 3, 5, 7]
  assert rows[4]["eval/w_in_norm"] == pytest.approx(res.eval_history[0][1]["w_in_norm"])
  assert os.listdir(tmp_path / "log" / "tb")           # tensorboard event file
  assert res.compile_stats["cost_flops"] > 0
  # a run in a finished workdir resumes at the end and does not train again
  again = _run(tmp_path, "log", cfg)
  assert again.start_step == 8 and again.history == []
  jax.tree.map(np.testing.assert_array_equal, again.state["params"], res.state["params"])


def test_weight_decay_mask():
  params = nnx.to_pure_dict(nnx.state(tw.TinyLM(rngs=nnx.Rngs(0)), nnx.Param))
  mask = optim.weight_decay_mask(params)
  assert mask == {"embed": True, "w_in": True, "w_out": True, "b_in": False,
                  "norm": {"scale": False}}
  gated = {"xattn": {"attn_gate": jnp.zeros(()), "gate_proj": jnp.zeros((2, 2))},
           "q_norm": {"w": jnp.zeros((2, 2))}}
  assert optim.weight_decay_mask(gated) == {
      "xattn": {"attn_gate": False, "gate_proj": True}, "q_norm": {"w": False}}


def test_bad_batch_divisibility_is_reported(tmp_path):
  cfg = tw.make_config(steps=2, grad_accum=3)
  with pytest.raises(ValueError, match=r"not divisible by data\*fsdp=1 x train.grad_accum=3"):
    _run(tmp_path, "div", cfg)
