"""Optimizer: clip -> AdamW (masked weight decay) with warmup + cosine; gradient accumulation.

Trainable filtering is done *outside* the optax chain: the loop splits the
model state with the job's nnx filter into trainable params (which get
gradients and optimizer state) and frozen params (no gradients, no optimizer
state, passed through the step untouched).  This is MaxText's
``multi_transform(..., set_to_zero())`` without even the empty state.

Gradient accumulation is a ``jax.lax.scan`` over microbatches *inside* the one
jitted step (:func:`accumulate_gradients`), not ``optax.MultiSteps``: one
optimizer update per train step, the step counter, schedule, checkpoints and
logs all count optimizer steps, and the activations of only one microbatch are
live at a time.  Each microbatch's loss is a mean over its examples, so the
accumulated gradient (mean over microbatches) equals the full-batch gradient
exactly when every microbatch carries the same loss weight (e.g. equal token
counts); otherwise it is the mean of per-microbatch means.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

# A parameter is decayed iff it is a matrix (ndim >= 2) and no path element
# names a norm, bias or gate.  (`gate_proj` is an MLP kernel and is decayed;
# `attn_gate`/`ffw_gate` are scalars anyway.)
_NO_DECAY_WORDS = ("norm", "bias", "scale")


def _decays(path, leaf) -> bool:
  if getattr(leaf, "ndim", 0) < 2:
    return False
  for key in path:
    name = str(getattr(key, "key", getattr(key, "name", key))).lower()
    if any(w in name for w in _NO_DECAY_WORDS) or name.endswith("gate"):
      return False
  return True


def weight_decay_mask(params) -> Any:
  """Pytree of bools: True where AdamW applies weight decay (see ``_decays``)."""
  return jax.tree_util.tree_map_with_path(_decays, params)


def make_schedule(train_cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``train.lr`` over ``warmup_steps``, then cosine to
  ``lr * train.get('min_lr_ratio', 0.0)`` at ``total_steps``."""
  lr = float(train_cfg["lr"])
  warmup = int(train_cfg.get("warmup_steps", 0))
  if warmup < 0 or lr < 0:
    raise ValueError(f"train.lr={lr}, train.warmup_steps={warmup}: must be >= 0")
  end = lr * float(train_cfg.get("min_lr_ratio", 0.0))
  decay_steps = max(int(total_steps), warmup + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=decay_steps,
      end_value=end)


def make_optimizer(train_cfg: Mapping[str, Any], total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``clip_by_global_norm(grad_clip)`` -> ``adamw(schedule, weight_decay, mask)``."""
  schedule = make_schedule(train_cfg, total_steps)
  parts = []
  clip = train_cfg.get("grad_clip", None)
  if clip:
    parts.append(optax.clip_by_global_norm(float(clip)))
  parts.append(optax.adamw(
      schedule,
      b1=float(train_cfg.get("b1", 0.9)),
      b2=float(train_cfg.get("b2", 0.999)),
      eps=float(train_cfg.get("eps", 1e-8)),
      weight_decay=float(train_cfg.get("weight_decay", 0.0)),
      mask=weight_decay_mask))
  return optax.chain(*parts), schedule


def opt_state_specs(tx: optax.GradientTransformation, abstract_opt_state, param_specs) -> Any:
  """PartitionSpecs for the optimizer state: param-shaped parts follow the params,
  everything else (counters) is replicated."""
  return optax.tree_map_params(
      tx, lambda _, spec: spec, abstract_opt_state, param_specs,
      transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, P))


def split_microbatches(batch, num_micro: int, sharding_axes=None):
  """``[B, ...] -> [A, B/A, ...]`` with microbatch ``a`` = rows ``a, a+A, a+2A, ...``.

  Strided rows keep each microbatch spread over all data-parallel devices (a
  contiguous block would live on 1/A of them).
  """
  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"train.grad_accum={num_micro} does not divide the batch size "
                       f"{x.shape[0]} (array shape {x.shape})")
    y = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
    if sharding_axes is not None:
      y = jax.lax.with_sharding_constraint(y, P(None, sharding_axes))
    return y
  return jax.tree.map(split, batch)


def accumulate_gradients(grad_fn: Callable, params, batch, num_micro: int, rng,
                         sharding_axes=None):
  """Mean loss, mean grads and mean metrics over ``num_micro`` microbatches.

  ``grad_fn(params, microbatch, rng) -> ((loss, (metrics, aux)), grads)``; ``aux``
  is threaded from the last microbatch.  With ``num_micro == 1`` this is a
  plain call.
  """
  if num_micro == 1:
    return grad_fn(params, batch, rng)
  micro = split_microbatches(batch, num_micro, sharding_axes)
  rngs = jax.random.split(rng, num_micro)
  # Shapes for the carry: trace one microbatch abstractly.
  first = jax.tree.map(lambda x: x[0], micro)
  (loss_s, (metrics_s, aux_s)), grads_s = jax.eval_shape(grad_fn, params, first, rngs[0])
  zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
  init = (zeros(loss_s), zeros(metrics_s), zeros(aux_s), zeros(grads_s))

  def body(carry, xs):
    loss_acc, met_acc, _, g_acc = carry
    mb, r = xs
    (loss, (metrics, aux)), grads = grad_fn(params, mb, r)
    g_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), g_acc, grads)
    met_acc = jax.tree.map(lambda a, m: a + m, met_acc, metrics)
    return (loss_acc + loss, met_acc, aux, g_acc), None

  (loss, metrics, aux, grads), _ = jax.lax.scan(body, init, (micro, rngs))
  inv = 1.0 / num_micro
  scale = lambda t: jax.tree.map(lambda x: (x * inv).astype(x.dtype), t)
  return (loss * inv, (scale(metrics), aux)), scale(grads)
