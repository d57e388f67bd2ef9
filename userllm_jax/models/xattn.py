"""Flamingo-style gated cross-attention (Alayrac et al. 2022), used by User-LLM.

    x = x + tanh(alpha_attn) * CrossAttn(norm(x), media)
    x = x + tanh(alpha_ffw)  * GeGLU(norm(x))

Both gates start at 0, so a freshly inserted block is the identity and the frozen
LLM's outputs are unchanged at step 0.  Query rows whose media are all masked
(an empty history) receive exactly zero from the attention branch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from userllm_jax.models.common import RMSNorm, param

_init = jax.nn.initializers.normal(stddev=0.02)


class GatedCrossAttention(nnx.Module):
  """Gated cross-attention + gated GeGLU MLP; media are the (projected) user tokens."""

  def __init__(self, embed_dim: int, media_dim: int, num_heads: int, head_dim: int,
               mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.dtype = dtype
    self.norm = RMSNorm(embed_dim, rngs=rngs, param_dtype=param_dtype)
    self.q_proj = param(rngs, _init, (embed_dim, num_heads, head_dim),
                        ("embed", "heads", "head_dim"), param_dtype)
    self.k_proj = param(rngs, _init, (media_dim, num_heads, head_dim),
                        ("embed", "heads", "head_dim"), param_dtype)
    self.v_proj = param(rngs, _init, (media_dim, num_heads, head_dim),
                        ("embed", "heads", "head_dim"), param_dtype)
    self.o_proj = param(rngs, _init, (num_heads, head_dim, embed_dim),
                        ("heads", "head_dim", "embed"), param_dtype)
    self.ffw_norm = RMSNorm(embed_dim, rngs=rngs, param_dtype=param_dtype)
    self.gate_proj = param(rngs, _init, (embed_dim, mlp_dim), ("embed", "mlp"), param_dtype)
    self.up_proj = param(rngs, _init, (embed_dim, mlp_dim), ("embed", "mlp"), param_dtype)
    self.down_proj = param(rngs, _init, (mlp_dim, embed_dim), ("mlp", "embed"), param_dtype)
    self.attn_gate = nnx.Param(jnp.zeros((), param_dtype), logical_axes=())
    self.ffw_gate = nnx.Param(jnp.zeros((), param_dtype), logical_axes=())

  def __call__(self, x_BxLxD: jax.Array, media_BxMxE: jax.Array,
               media_mask_BxM: jax.Array | None = None) -> jax.Array:
    dt = self.dtype
    B, L, _ = x_BxLxD.shape
    M = media_BxMxE.shape[1]
    if media_mask_BxM is None:
      media_mask_BxM = jnp.ones((B, M), bool)
    media_mask_BxM = media_mask_BxM.astype(bool)
    h = self.norm(x_BxLxD).astype(dt)
    media = media_BxMxE.astype(dt)
    q = jnp.einsum("bld,dnh->blnh", h, self.q_proj[...].astype(dt))
    k = jnp.einsum("bme,enh->bmnh", media, self.k_proj[...].astype(dt))
    v = jnp.einsum("bme,enh->bmnh", media, self.v_proj[...].astype(dt))
    mask = jnp.broadcast_to(media_mask_BxM[:, None, None, :], (B, 1, L, M))
    attn = jax.nn.dot_product_attention(q, k, v, mask=mask)
    any_media_B = jnp.any(media_mask_BxM, axis=-1)
    attn = jnp.where(any_media_B[:, None, None, None], attn, 0.0)
    out = jnp.einsum("blnh,nhd->bld", attn, self.o_proj[...].astype(dt))
    x = x_BxLxD + (jnp.tanh(self.attn_gate[...]) * out).astype(x_BxLxD.dtype)
    h = self.ffw_norm(x).astype(dt)
    gate = jax.nn.gelu(h @ self.gate_proj[...].astype(dt), approximate=True)
    ff = (gate * (h @ self.up_proj[...].astype(dt))) @ self.down_proj[...].astype(dt)
    return x + (jnp.tanh(self.ffw_gate[...]) * ff).astype(x.dtype)
