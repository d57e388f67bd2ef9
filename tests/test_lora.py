"""LoRA: identity at init, only LoRA params train, merge == unmerged, targets, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from userllm_jax.models import gemma
from userllm_jax.models.lora import (LoRAConfig, LoRAParam, Projection, apply_lora,
                                     lora_param_count, merge_lora)


def _cfg(**kw):
  return gemma.tiny(num_layers=2, global_every=2, **kw)


@functools.partial(jax.jit, static_argnames="graphdef")
def _fwd(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def fwd(m, tokens):
  return np.asarray(_fwd(*nnx.split(m), tokens))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 9)))


def _randomize_lora_b(m, seed=1):
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(m):
    if isinstance(var, LoRAParam) and path[-1] == "lora_b":
      var[...] = jnp.asarray(rng.normal(0, 0.05, var.shape), var[...].dtype)


def test_projection_with_lora_matches_numpy():
  p = Projection((6,), (3, 4), ("embed", "heads", "head_dim"), rngs=nnx.Rngs(0), name="q")
  holder = nnx.List([p])
  apply_lora(holder, LoRAConfig(rank=2, alpha=6.0, targets=("q",)), rngs=nnx.Rngs(1))
  _randomize_lora_b(holder)
  x = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)
  w = np.asarray(p.kernel[...]).reshape(6, 12)
  a = np.asarray(p.lora_a[...])
  b = np.asarray(p.lora_b[...]).reshape(2, 12)
  want = (x @ w + 3.0 * (x @ a) @ b).reshape(5, 3, 4)
  np.testing.assert_allclose(np.asarray(p(jnp.asarray(x))), want, atol=1e-5)
  assert p.lora_a.get_metadata()["logical_axes"] == ("embed", None)
  assert p.lora_b.get_metadata()["logical_axes"] == (None, "heads", "head_dim")


def test_identity_at_init_and_param_bookkeeping():
  m = gemma.Gemma3(_cfg(), rngs=nnx.Rngs(0))
  base = fwd(m, TOKENS)
  n_proj = apply_lora(m, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
  assert n_proj == 2 * 7
  # B = 0: the base model.  A different XLA graph (the LoRA branch may be fused with the base
  # matmul), so only equal to float32 rounding: 9.5e-7 apart was seen on one CPU.
  np.testing.assert_allclose(fwd(m, TOKENS), base, rtol=1e-5, atol=1e-5)
  d, h, k, dh, f, r = 32, 4, 2, 8, 64, 4
  per_layer = r * ((d + h * dh) + 2 * (d + k * dh) + (h * dh + d) + 2 * (d + f) + (f + d))
  assert lora_param_count(m) == 2 * per_layer
  lora_leaves = jax.tree.leaves(nnx.state(m, LoRAParam))
  assert len(lora_leaves) == 2 * 7 * 2
  # LoRAParam is a Param subtype, but a plain-Param filter that excludes it is possible
  base_only = nnx.state(m, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
  assert len(jax.tree.leaves(base_only)) == len(jax.tree.leaves(nnx.state(m, nnx.Param))) - 28
  with pytest.raises(ValueError, match="already has LoRA"):
    apply_lora(m, LoRAConfig(rank=2), rngs=nnx.Rngs(2))


def test_targets_subset_and_config_field():
  m = gemma.Gemma3(_cfg(lora=LoRAConfig(rank=2, alpha=2.0, targets=("q", "v", "down"))),
                   rngs=nnx.Rngs(0))
  a = m.layers[1].attn
  assert a.q_proj.lora_a is not None and a.v_proj.lora_a is not None
  assert a.k_proj.lora_a is None and a.o_proj.lora_a is None
  assert m.layers[0].mlp.down_proj.lora_b.shape == (2, 32)
  assert m.layers[0].mlp.up_proj.lora_a is None
  with pytest.raises(ValueError, match="targets"):
    LoRAConfig(targets=("q", "query"))
  with pytest.raises(ValueError, match="rank"):
    LoRAConfig(rank=0)


def test_merge_equals_unmerged_and_removes_factors():
  m = gemma.Gemma3(_cfg(), rngs=nnx.Rngs(0))
  base = fwd(m, TOKENS)
  apply_lora(m, LoRAConfig(rank=4, alpha=16.0), rngs=nnx.Rngs(1))
  _randomize_lora_b(m)
  adapted = fwd(m, TOKENS)
  assert np.abs(adapted - base).max() > 1e-2     # the adapters do something
  assert merge_lora(m) == 14
  assert not jax.tree.leaves(nnx.state(m, LoRAParam))
  assert m.layers[0].attn.q_proj.lora_a is None
  merged = fwd(m, TOKENS)
  np.testing.assert_allclose(merged, adapted, atol=1e-4 * np.abs(adapted).max(), rtol=1e-5)


def test_optimizer_trains_only_lora_params():
  m = gemma.Gemma3(_cfg(), rngs=nnx.Rngs(0))
  apply_lora(m, LoRAConfig(rank=2, alpha=4.0, targets=("q", "o", "up")), rngs=nnx.Rngs(1))
  before_base = jax.tree.map(np.asarray, nnx.state(m, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
  before_lora = jax.tree.map(np.asarray, nnx.state(m, LoRAParam))
  opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=LoRAParam)

  def loss_fn(model):
    logits = model(TOKENS[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(m, opt)) for _ in range(5)]
  assert losses[-1] < losses[0]
  after_base = jax.tree.map(np.asarray, nnx.state(m, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
  jax.tree.map(np.testing.assert_array_equal, after_base, before_base)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), nnx.state(m, LoRAParam),
                         before_lora)
  assert all(jax.tree.leaves(changed))
