"""LoRA (Hu et al. 2021) for the Gemma 3 projections, and the projection module itself.

Every attention/MLP projection of :mod:`userllm_jax.models.gemma` is a
:class:`Projection`: one ``kernel`` (an ``nnx.Param``) applied by ``einsum``.
:func:`apply_lora` adds two low-rank factors to the chosen projections::

    y = x @ W + (alpha / rank) * (x @ A) @ B      A: in_shape + (r,),  B: (r,) + out_shape

``A`` and ``B`` are :class:`LoRAParam` variables (a subclass of ``nnx.Param``), so an
optimizer built with ``wrt=LoRAParam`` (or ``nnx.state(model, LoRAParam)``) trains only them.
``B`` starts at zero, so a freshly adapted model computes exactly the base model.
:func:`merge_lora` folds ``(alpha / rank) * A @ B`` into ``W`` and removes the factors.

Targets are named ``q, k, v, o`` (attention) and ``gate, up, down`` (MLP).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoRAParam(nnx.Param):
  """A LoRA factor: trainable on its own (``nnx.Optimizer(model, tx, wrt=LoRAParam)``)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Which projections get low-rank adapters, and their size.

  Attributes:
    rank: inner dimension ``r`` of ``A @ B``.
    alpha: the update is scaled by ``alpha / rank``.
    targets: subset of ``('q','k','v','o','gate','up','down')``.
    param_dtype: dtype of ``A`` and ``B`` (float32 even for a bf16 base is the usual choice).
  """
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ALL_TARGETS
  param_dtype: str = "float32"

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRAConfig.rank: expected an int >= 1, got {self.rank!r}")
    bad = [t for t in self.targets if t not in ALL_TARGETS]
    if bad or not self.targets:
      raise ValueError(f"LoRAConfig.targets: expected a non-empty subset of {ALL_TARGETS}, "
                       f"got {tuple(self.targets)!r} (unknown: {bad})")

  @property
  def scale(self) -> float:
    return float(self.alpha) / float(self.rank)


class Projection(nnx.Module):
  """``y = einsum(x, kernel)`` over the first ``num_in`` kernel axes, with optional LoRA.

  The kernel has shape ``in_shape + out_shape``; ``x`` ends in ``in_shape`` and ``y``
  ends in ``out_shape`` (e.g. q: ``[D] -> [H, Dh]``, o: ``[H, Dh] -> [D]``).
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               axes: Sequence[Optional[str]], *, rngs: nnx.Rngs, name: str,
               init=jax.nn.initializers.normal(stddev=0.02), param_dtype=jnp.float32):
    self.in_shape = tuple(int(s) for s in in_shape)
    self.out_shape = tuple(int(s) for s in out_shape)
    self.target = name
    shape = self.in_shape + self.out_shape
    if len(axes) != len(shape):
      raise ValueError(f"Projection {name}: {len(axes)} axis names {tuple(axes)} for {shape}")
    self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype), logical_axes=tuple(axes))
    # data attributes (pytree nodes) so LoRA factors can be added and removed later
    self.lora_a: Optional[LoRAParam] = nnx.data(None)
    self.lora_b: Optional[LoRAParam] = nnx.data(None)
    self.lora_scale: float = 0.0

  def _contract(self, x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    return jax.lax.dot_general(
        x, w, (((tuple(range(x.ndim - n_in, x.ndim))), tuple(range(n_in))), ((), ())))

  def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    n_in = len(self.in_shape)
    if x.shape[x.ndim - n_in:] != self.in_shape:
      raise ValueError(f"Projection {self.target}: input ends in {x.shape[x.ndim - n_in:]}, "
                       f"expected {self.in_shape}")
    y = self._contract(x, self.kernel[...].astype(dtype), n_in)
    if self.lora_a is not None:
      xa = self._contract(x, self.lora_a[...].astype(dtype), n_in)
      y = y + self.lora_scale * self._contract(xa, self.lora_b[...].astype(dtype), 1)
    return y


def _projections(model: nnx.Module):
  for path, module in nnx.iter_graph(model):
    if isinstance(module, Projection):
      yield path, module


def apply_lora(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> int:
  """Adds LoRA factors to every :class:`Projection` named in ``cfg.targets``, in place.

  ``A`` ~ N(0, 1/fan_in) (fan_in = prod(in_shape)), ``B`` = 0.  Returns how many
  projections were adapted; raises if none matched or a projection already has LoRA.
  """
  dtype = jnp.dtype(cfg.param_dtype)
  count = 0
  for path, proj in list(_projections(model)):
    if proj.target not in cfg.targets:
      continue
    if proj.lora_a is not None:
      raise ValueError(f"apply_lora: {'/'.join(map(str, path))} already has LoRA factors")
    axes = proj.kernel.get_metadata().get("logical_axes") or (None,) * proj.kernel.ndim
    n_in = len(proj.in_shape)
    fan_in = int(np.prod(proj.in_shape))
    a = jax.random.normal(rngs.params(), proj.in_shape + (cfg.rank,), dtype) / math.sqrt(fan_in)
    proj.lora_a = nnx.data(LoRAParam(a, logical_axes=tuple(axes[:n_in]) + (None,)))
    proj.lora_b = nnx.data(LoRAParam(jnp.zeros((cfg.rank,) + proj.out_shape, dtype),
                                     logical_axes=(None,) + tuple(axes[n_in:])))
    proj.lora_scale = cfg.scale
    count += 1
  if count == 0:
    raise ValueError(f"apply_lora: no projection matched targets {cfg.targets}")
  return count


def merge_lora(model: nnx.Module) -> int:
  """Folds ``scale * A @ B`` into each adapted kernel (in the kernel's dtype) and removes A, B.

  Returns how many projections were merged.
  """
  count = 0
  for _, proj in list(_projections(model)):
    if proj.lora_a is None:
      continue
    kernel = proj.kernel[...]
    a = proj.lora_a[...].astype(jnp.float32)
    b = proj.lora_b[...].astype(jnp.float32)
    delta = jnp.tensordot(a, b, axes=1) * proj.lora_scale
    proj.kernel[...] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    proj.lora_a = nnx.data(None)
    proj.lora_b = nnx.data(None)
    proj.lora_scale = 0.0
    count += 1
  return count


def lora_param_count(model: nnx.Module) -> int:
  """Number of scalar LoRA parameters in ``model``."""
  state = nnx.state(model, LoRAParam)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
