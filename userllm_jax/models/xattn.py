"""Flamingo-style gated cross-attention (Alayrac et al. 2022), used by User-LLM.

    x = x + tanh(alpha_attn) * s(x) * CrossAttn(norm(x), media_norm(media))
    x = x + tanh(alpha_ffw)  * s(x) * GeGLU(norm(x))

Both gates start at 0, so a freshly inserted block is the identity and the frozen
LLM's outputs are unchanged at step 0.  Query rows whose media are all masked
(an empty history) receive exactly zero from the attention branch.

``s(x)`` (``residual_scale=True``, the default) is the RMS of each token's residual
stream, held constant for the gradient.  Flamingo adds the branch outputs to the
residual stream as they are; that works for a host LM whose residual stream is of
order 1, but Gemma 3's is not: in Gemma 3 270M it has an RMS of ~450 after layer 11
and ~1,200 after layer 17 (measured on a short prompt), while a freshly initialised
branch outputs values of order 1.  Even with its gate fully open such a branch would
change the stream by ~0.1%, and stage 2 cannot learn to use the user (this is what
kept the cross-attention variant at chance).  With ``s(x)`` the gate reads as the
fraction of the stream the branch may write, whatever the host's scale.  The
projections use fan-in initialisation (unit-variance outputs) and the media are
RMS-normalised, so the branch output is of order 1 before scaling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from userllm_jax.models.common import RMSNorm, param

_init = jax.nn.initializers.lecun_normal()                      # [in, out]
_init_qkv = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))   # [in, heads, dim]
_init_out = jax.nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)   # [heads, dim, out]


class GatedCrossAttention(nnx.Module):
  """Gated cross-attention + gated GeGLU MLP; media are the (projected) user tokens."""

  def __init__(self, embed_dim: int, media_dim: int, num_heads: int, head_dim: int,
               mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, residual_scale: bool = True):
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.dtype = dtype
    self.residual_scale = bool(residual_scale)
    self.norm = RMSNorm(embed_dim, rngs=rngs, param_dtype=param_dtype)
    self.media_norm = RMSNorm(media_dim, rngs=rngs, param_dtype=param_dtype)
    self.q_proj = param(rngs, _init_qkv, (embed_dim, num_heads, head_dim),
                        ("embed", "heads", "head_dim"), param_dtype)
    self.k_proj = param(rngs, _init_qkv, (media_dim, num_heads, head_dim),
                        ("embed", "heads", "head_dim"), param_dtype)
    self.v_proj = param(rngs, _init_qkv, (media_dim, num_heads, head_dim),
                        ("embed", "heads", "head_dim"), param_dtype)
    self.o_proj = param(rngs, _init_out, (num_heads, head_dim, embed_dim),
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
    if self.residual_scale:
      x32 = x_BxLxD.astype(jnp.float32)
      scale_BxLx1 = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(x32 * x32, -1, keepdims=True)))
    else:
      scale_BxLx1 = jnp.ones((B, L, 1), jnp.float32)
    h = self.norm(x_BxLxD).astype(dt)
    media = self.media_norm(media_BxMxE).astype(dt)
    q = jnp.einsum("bld,dnh->blnh", h, self.q_proj[...].astype(dt))
    k = jnp.einsum("bme,enh->bmnh", media, self.k_proj[...].astype(dt))
    v = jnp.einsum("bme,enh->bmnh", media, self.v_proj[...].astype(dt))
    mask = jnp.broadcast_to(media_mask_BxM[:, None, None, :], (B, 1, L, M))
    attn = jax.nn.dot_product_attention(q, k, v, mask=mask)
    any_media_B = jnp.any(media_mask_BxM, axis=-1)
    attn = jnp.where(any_media_B[:, None, None, None], attn, 0.0)
    out = jnp.einsum("blnh,nhd->bld", attn, self.o_proj[...].astype(dt))
    x = x_BxLxD + (jnp.tanh(self.attn_gate[...]) * scale_BxLx1 * out).astype(x_BxLxD.dtype)
    h = self.ffw_norm(x).astype(dt)
    gate = jax.nn.gelu(h @ self.gate_proj[...].astype(dt), approximate=True)
    ff = (gate * (h @ self.up_proj[...].astype(dt))) @ self.down_proj[...].astype(dt)
    return x + (jnp.tanh(self.ffw_gate[...]) * scale_BxLx1 * ff).astype(x.dtype)
