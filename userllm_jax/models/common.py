"""Small building blocks shared by the encoder, the Perceiver, Gemma and the bridge.

Every parameter is created through :func:`param`, which records its *logical* axis
names (e.g. ``('embed', 'mlp')``) as the ``logical_axes`` metadata of the
``nnx.Param`` (read back with ``var.get_metadata()['logical_axes']``).
``train/mesh.py`` maps logical names to mesh axes with one rules table, so models
never mention mesh axes and build without any mesh (Flax's eager ``out_sharding``
would require one).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs, initializer: Initializer, shape: Sequence[int],
          axes: Sequence[Optional[str]], dtype=jnp.float32) -> nnx.Param:
  """An ``nnx.Param`` initialised with ``initializer`` and logical axis names ``axes``."""
  if len(axes) != len(shape):
    raise ValueError(f"param: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
  value = initializer(rngs.params(), tuple(shape), dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
  """RMSNorm whose stored weight ``w`` is applied as ``1 + w`` (Gemma convention).

  ``w`` starts at zero, so a fresh norm is the identity scale.
  """

  def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6,
               axis_name: Optional[str] = "embed", param_dtype=jnp.float32):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = x32 * jax.lax.rsqrt(var + self.eps)
    return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(dtype)
