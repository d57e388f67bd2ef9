"""Perceiver resampler (Jaegle et al. 2021; Flamingo's resampler): a fixed number of user tokens.

User-LLM compresses a variable-length sequence of per-item embeddings into N learned
latent queries.  One layer (pre-norm, residual everywhere)::

    z = z + CrossAttn(norm(z), norm_kv(x), mask)      # latents attend to the items
    z = z + SelfAttn(norm(z))                          # optional: latents attend to each other
    z = z + MLP(norm(z))                               # GeLU-tanh gated MLP
    out = final_norm(z)

``x`` is ``emb_BxTxE`` (the encoder's per-item embeddings, ``E = cfg.input_dim``), the latents
have width ``D = cfg.latent_dim``.  Padded items (``mask_BxT == False``) are excluded from the
softmax, so their content never changes the output; a user with no valid item gets an exactly
zero cross-attention update (the latents then carry only their learned values), never NaN.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from userllm_jax.models.common import RMSNorm, param

# Fan-in initialisation: unit-variance branch outputs at any width.  (GPT-style 0.02 made
# the cross-attention update ~0.02 of the latents' scale at width 64, so the user tokens of
# two users differed by ~1%: the LLM could hardly tell users apart at the start of stage 2.)
_init = jax.nn.initializers.lecun_normal()                                 # [in, out]
_init_qkv = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))   # [in, heads, dim]
_init_out = jax.nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)   # [heads, dim, out]
# The learned latents start small: the first cross-attention (whose output depends on the
# user) then dominates the latents' content instead of a shared learned offset.
LATENT_INIT_STDDEV = 0.02


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
  """Perceiver resampler settings.

  Attributes:
    input_dim: width E of the item embeddings it reads (the encoder's output width).
    latent_dim: width D of the latents (and of the output); None -> input_dim.
    num_latents: N, the number of output user tokens.
    num_layers: number of (cross-attn [+ self-attn] + MLP) layers.
    num_heads: attention heads (cross and self).
    head_dim: per-head width.
    mlp_dim: hidden width of the gated MLP.
    self_attention: add latent self-attention in every layer.
    dtype: compute dtype (params stay float32 unless param_dtype says otherwise).
  """
  input_dim: int = 64
  latent_dim: Optional[int] = None
  num_latents: int = 16
  num_layers: int = 2
  num_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 256
  self_attention: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def width(self) -> int:
    return self.latent_dim or self.input_dim

  def validate(self) -> "PerceiverConfig":
    for name in ("input_dim", "num_latents", "num_layers", "num_heads", "head_dim", "mlp_dim"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"PerceiverConfig.{name}: expected a positive int, got {v!r}")
    if self.latent_dim is not None and self.latent_dim <= 0:
      raise ValueError(f"PerceiverConfig.latent_dim: expected a positive int or None, "
                       f"got {self.latent_dim!r}")
    return self


def masked_attention(q_BxLxHxK: jax.Array, k_BxMxHxK: jax.Array, v_BxMxHxK: jax.Array,
                     mask_BxM: Optional[jax.Array]) -> jax.Array:
  """Softmax attention over the valid keys; rows with no valid key return exactly 0."""
  scale = q_BxLxHxK.shape[-1] ** -0.5
  s = jnp.einsum("blhk,bmhk->bhlm", q_BxLxHxK, k_BxMxHxK).astype(jnp.float32) * scale
  if mask_BxM is not None:
    m = mask_BxM.astype(bool)[:, None, None, :]
    s = jnp.where(m, s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1)
  if mask_BxM is not None:
    p = jnp.where(m, p, 0.0)   # all-masked rows: softmax is uniform over garbage -> zero it
  return jnp.einsum("bhlm,bmhk->blhk", p.astype(v_BxMxHxK.dtype), v_BxMxHxK)


class _Attention(nnx.Module):
  """Multi-head attention with separate query / key-value input widths."""

  def __init__(self, q_dim: int, kv_dim: int, num_heads: int, head_dim: int, *,
               rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.q_proj = param(rngs, _init_qkv, (q_dim, num_heads, head_dim),
                        ("embed", "heads", "head_dim"), param_dtype)
    self.k_proj = param(rngs, _init_qkv, (kv_dim, num_heads, head_dim),
                        ("embed", "heads", "head_dim"), param_dtype)
    self.v_proj = param(rngs, _init_qkv, (kv_dim, num_heads, head_dim),
                        ("embed", "heads", "head_dim"), param_dtype)
    self.o_proj = param(rngs, _init_out, (num_heads, head_dim, q_dim),
                        ("heads", "head_dim", "embed"), param_dtype)

  def __call__(self, x_BxLxD, kv_BxMxE, mask_BxM, dtype):
    q = jnp.einsum("bld,dhk->blhk", x_BxLxD.astype(dtype), self.q_proj[...].astype(dtype))
    k = jnp.einsum("bme,ehk->bmhk", kv_BxMxE.astype(dtype), self.k_proj[...].astype(dtype))
    v = jnp.einsum("bme,ehk->bmhk", kv_BxMxE.astype(dtype), self.v_proj[...].astype(dtype))
    o = masked_attention(q, k, v, mask_BxM)
    return jnp.einsum("blhk,hkd->bld", o, self.o_proj[...].astype(dtype))


class _MLP(nnx.Module):
  """GeLU-tanh gated MLP (as in Gemma)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.gate_proj = param(rngs, _init, (dim, hidden), ("embed", "mlp"), param_dtype)
    self.up_proj = param(rngs, _init, (dim, hidden), ("embed", "mlp"), param_dtype)
    self.down_proj = param(rngs, _init, (hidden, dim), ("mlp", "embed"), param_dtype)

  def __call__(self, x, dtype):
    x = x.astype(dtype)
    g = jax.nn.gelu(x @ self.gate_proj[...].astype(dtype), approximate=True)
    return (g * (x @ self.up_proj[...].astype(dtype))) @ self.down_proj[...].astype(dtype)


class PerceiverLayer(nnx.Module):
  """Cross-attention to the items, optional latent self-attention, MLP; all pre-norm."""

  def __init__(self, cfg: PerceiverConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    D, E = cfg.width, cfg.input_dim
    self.kv_norm = RMSNorm(E, rngs=rngs, param_dtype=pd)
    self.cross_norm = RMSNorm(D, rngs=rngs, param_dtype=pd)
    self.cross_attn = _Attention(D, E, cfg.num_heads, cfg.head_dim, rngs=rngs, param_dtype=pd)
    if cfg.self_attention:
      self.self_norm = RMSNorm(D, rngs=rngs, param_dtype=pd)
      self.self_attn = _Attention(D, D, cfg.num_heads, cfg.head_dim, rngs=rngs, param_dtype=pd)
    else:
      self.self_norm = None
      self.self_attn = None
    self.mlp_norm = RMSNorm(D, rngs=rngs, param_dtype=pd)
    self.mlp = _MLP(D, cfg.mlp_dim, rngs=rngs, param_dtype=pd)

  def __call__(self, z_BxNxD, x_BxTxE, mask_BxT, dtype):
    z = z_BxNxD
    kv = self.kv_norm(x_BxTxE)
    z = z + self.cross_attn(self.cross_norm(z), kv, mask_BxT, dtype).astype(z.dtype)
    if self.self_attn is not None:
      h = self.self_norm(z)
      z = z + self.self_attn(h, h, None, dtype).astype(z.dtype)
    z = z + self.mlp(self.mlp_norm(z), dtype).astype(z.dtype)
    return z


class PerceiverResampler(nnx.Module):
  """``(emb_BxTxE, mask_BxT) -> latents_BxNxD`` with N = ``cfg.num_latents``."""

  def __init__(self, cfg: PerceiverConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.latents = param(rngs, jax.nn.initializers.normal(stddev=LATENT_INIT_STDDEV),
                         (cfg.num_latents, cfg.width), ("latents", "embed"), pd)
    self.layers = nnx.List([PerceiverLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.width, rngs=rngs, param_dtype=pd)

  def __call__(self, emb_BxTxE: jax.Array, mask_BxT: Optional[jax.Array] = None) -> jax.Array:
    if emb_BxTxE.ndim != 3 or emb_BxTxE.shape[-1] != self.cfg.input_dim:
      raise ValueError(f"PerceiverResampler: expected emb_BxTxE of shape [B, T, "
                       f"{self.cfg.input_dim}], got {emb_BxTxE.shape}")
    B, T, _ = emb_BxTxE.shape
    if mask_BxT is not None and tuple(mask_BxT.shape) != (B, T):
      raise ValueError(f"PerceiverResampler: mask_BxT shape {mask_BxT.shape} != {(B, T)}")
    dtype = jnp.dtype(self.cfg.dtype)
    z = jnp.broadcast_to(self.latents[...][None].astype(dtype),
                         (B, self.cfg.num_latents, self.cfg.width))
    for layer in self.layers:
      z = layer(z, emb_BxTxE.astype(dtype), mask_BxT, dtype)
    return self.final_norm(z)
