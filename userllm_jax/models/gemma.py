"""The Gemma 3 text decoder in Flax NNX, with User-LLM hooks and a KV cache.

Architecture (Gemma 3 technical report; matches transformers ``Gemma3ForCausalLM`` and
google-deepmind/gemma):

* token embedding ``E[V, D]`` times ``sqrt(D)`` (the normaliser cast to the compute dtype
  first, as the references do); the output projection is tied: ``logits = h @ E^T``;
* per layer: ``x += post_attn_norm(attn(pre_attn_norm(x)))``,
  ``x += post_ffw_norm(mlp(pre_ffw_norm(x)))``; RMSNorm applies ``1 + w`` (eps 1e-6);
* attention: GQA, RMSNorm on q and k per head (``head_dim``), split-halves ("rotate_half")
  RoPE, query scale ``query_pre_attn_scalar ** -0.5``, no soft-capping;
  layer ``i`` is *global* iff ``(i + 1) % global_every == 0`` (RoPE base 1e6, optional linear
  scaling ``positions / global_rope_scale``), otherwise *local* (RoPE base 1e4, sliding window:
  key ``j`` visible from query ``i`` iff ``0 <= pos_i - pos_j < sliding_window``);
* MLP: ``down(gelu_tanh(gate(x)) * up(x))``.

User-LLM hooks:

* ``prefix_embeds_BxPxD`` (soft prompt, already at model width, *not* scaled by ``sqrt(D)``)
  is placed before the token embeddings; ``prefix_mask_BxP`` marks valid prefix slots.
  Masked slots (prefix or tokens) take no part in attention and do not advance positions:
  ``position = (number of valid slots before it)``, so a padded example computes what it
  would compute alone.
* ``cfg.cross_attention_layers``: after layer ``i`` the hidden state goes through
  ``self.xattn[str(i)]`` (:class:`~userllm_jax.models.xattn.GatedCrossAttention`) with
  ``media_BxMxD`` / ``media_mask_BxM``.

Attention goes through ``jax.nn.dot_product_attention``.  Without padding, prefix mask or
cache it uses ``is_causal`` and, on local layers, ``local_window_size=(window - 1, 0)``
(fused kernels can use these).  With padding masks or a KV cache the slot index no longer
equals the position, so the causal/window rule is applied to *positions* through an explicit
boolean mask.

KV cache: :meth:`Gemma3.init_cache` gives a fixed-length cache (a pytree); calling the model
with ``cache=`` writes the chunk's keys/values at ``cache['index']`` and returns
``(output, new_cache)``.  Full-length caches on every layer (no ring buffer for local layers).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from userllm_jax.models.common import RMSNorm
from userllm_jax.models.lora import LoRAConfig, Projection, apply_lora
from userllm_jax.models.xattn import GatedCrossAttention

Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Gemma 3 text decoder hyper-parameters (see the presets below)."""
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  sliding_window: int
  query_pre_attn_scalar: float
  local_rope_base: float = 10_000.0
  global_rope_base: float = 1_000_000.0
  local_rope_scale: float = 1.0
  global_rope_scale: float = 1.0
  global_every: int = 6
  rms_eps: float = 1e-6
  dtype: str = "float32"          # compute dtype
  param_dtype: str = "float32"
  cross_attention_layers: tuple[int, ...] = ()
  xattn_num_heads: Optional[int] = None   # default: num_heads
  xattn_head_dim: Optional[int] = None    # default: head_dim
  xattn_mlp_dim: Optional[int] = None     # default: mlp_dim
  lora: Optional[LoRAConfig] = None
  # Rematerialise each decoder block in the backward pass (activations recomputed instead of
  # stored); only without a KV cache, i.e. in training and scoring.
  remat: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "sliding_window", "global_every"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"GemmaConfig.{name}: expected a positive int, got {v!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"GemmaConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"GemmaConfig.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
    object.__setattr__(self, "cross_attention_layers", tuple(self.cross_attention_layers))
    bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"GemmaConfig.cross_attention_layers: {bad} outside [0, {self.num_layers})")
    jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # raise early on a bad name

  def is_global(self, layer: int) -> bool:
    return (layer + 1) % self.global_every == 0

  def replace(self, **kw) -> "GemmaConfig":
    return dataclasses.replace(self, **kw)


def gemma3_270m(**kw) -> GemmaConfig:
  return GemmaConfig(vocab_size=262_144, embed_dim=640, num_layers=18, num_heads=4,
                     num_kv_heads=1, head_dim=256, mlp_dim=2048, sliding_window=512,
                     query_pre_attn_scalar=256.0, **kw)


def gemma3_1b(**kw) -> GemmaConfig:
  return GemmaConfig(vocab_size=262_144, embed_dim=1152, num_layers=26, num_heads=4,
                     num_kv_heads=1, head_dim=256, mlp_dim=6 * 1152, sliding_window=512,
                     query_pre_attn_scalar=256.0, **kw)


def gemma3_4b(**kw) -> GemmaConfig:
  return GemmaConfig(vocab_size=262_144, embed_dim=2560, num_layers=34, num_heads=8,
                     num_kv_heads=4, head_dim=256, mlp_dim=2560 * 4, sliding_window=1024,
                     query_pre_attn_scalar=256.0, global_rope_scale=8.0, **kw)


def gemma3_12b(**kw) -> GemmaConfig:
  return GemmaConfig(vocab_size=262_144, embed_dim=3840, num_layers=48, num_heads=16,
                     num_kv_heads=8, head_dim=256, mlp_dim=3840 * 4, sliding_window=1024,
                     query_pre_attn_scalar=256.0, global_rope_scale=8.0, **kw)


def gemma3_27b(**kw) -> GemmaConfig:
  return GemmaConfig(vocab_size=262_144, embed_dim=5376, num_layers=62, num_heads=32,
                     num_kv_heads=16, head_dim=128, mlp_dim=5376 * 4, sliding_window=1024,
                     query_pre_attn_scalar=5376 / 32, global_rope_scale=8.0, **kw)


def tiny(**kw) -> GemmaConfig:
  """A small random-init config for tests: 6 layers (layer 5 global), window 4."""
  base = dict(vocab_size=128, embed_dim=32, num_layers=6, num_heads=4, num_kv_heads=2,
              head_dim=8, mlp_dim=64, sliding_window=4, query_pre_attn_scalar=8.0)
  base.update(kw)
  return GemmaConfig(**base)


PRESETS = {"gemma3-270m": gemma3_270m, "gemma3-1b": gemma3_1b, "gemma3-4b": gemma3_4b,
           "gemma3-12b": gemma3_12b, "gemma3-27b": gemma3_27b, "tiny": tiny}


def get_config(name: str, **kw) -> GemmaConfig:
  """A preset by name (``gemma3-270m`` ... ``gemma3-27b``, ``tiny``) with overrides."""
  key = name.replace("_", "-").lower()
  if key not in PRESETS:
    raise ValueError(f"get_config: unknown Gemma preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[key](**kw)


# ---------------------------------------------------------------------------------------------
# Pieces.


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, base: float,
               scale: float = 1.0) -> jax.Array:
  """Split-halves RoPE; ``scale`` > 1 is linear position interpolation (positions / scale)."""
  h = x_BxTxNxH.shape[-1]
  half = h // 2
  inv_freq = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / h))
  angle_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq / scale
  sin = jnp.sin(angle_BxTxF)[:, :, None, :]
  cos = jnp.cos(angle_BxTxF)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


class Embedder(nnx.Module):

  def __init__(self, vocab_size: int, embed_dim: int, *, rngs: nnx.Rngs, param_dtype):
    # std 1/sqrt(D): after the sqrt(D) input scaling the embeddings are O(1), and tied
    # logits of a random model are O(1) (not peaked on the input token).
    init = jax.nn.initializers.normal(stddev=embed_dim ** -0.5)
    self.input_embedding = nnx.Param(init(rngs.params(), (vocab_size, embed_dim), param_dtype),
                                     logical_axes=("vocab", "embed"))


class Attention(nnx.Module):

  def __init__(self, cfg: GemmaConfig, layer: int, *, rngs: nnx.Rngs):
    d, h, k, dh = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt = jnp.dtype(cfg.param_dtype)
    self.is_global = cfg.is_global(layer)
    self.window = None if self.is_global else cfg.sliding_window
    self.rope_base = cfg.global_rope_base if self.is_global else cfg.local_rope_base
    self.rope_scale = cfg.global_rope_scale if self.is_global else cfg.local_rope_scale
    self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
    self.q_proj = Projection((d,), (h, dh), ("embed", "heads", "head_dim"), rngs=rngs,
                             name="q", param_dtype=pdt)
    self.k_proj = Projection((d,), (k, dh), ("embed", "kv_heads", "head_dim"), rngs=rngs,
                             name="k", param_dtype=pdt)
    self.v_proj = Projection((d,), (k, dh), ("embed", "kv_heads", "head_dim"), rngs=rngs,
                             name="v", param_dtype=pdt)
    self.o_proj = Projection((h, dh), (d,), ("heads", "head_dim", "embed"), rngs=rngs,
                             name="o", param_dtype=pdt)
    self.q_norm = RMSNorm(dh, rngs=rngs, eps=cfg.rms_eps, axis_name="head_dim", param_dtype=pdt)
    self.k_norm = RMSNorm(dh, rngs=rngs, eps=cfg.rms_eps, axis_name="head_dim", param_dtype=pdt)

  def __call__(self, x_BxTxD, positions_BxT, masks, kv_cache=None, cache_index=None):
    """Returns (out_BxTxD, new_kv_cache).

    masks: dict with 'global'/'local' boolean [B,1,T,S] masks, or None for the unpadded
    fast path (is_causal + local_window_size).
    """
    dt = x_BxTxD.dtype
    q = self.q_norm(self.q_proj(x_BxTxD))
    k = self.k_norm(self.k_proj(x_BxTxD))
    v = self.v_proj(x_BxTxD)
    q = apply_rope(q, positions_BxT, self.rope_base, self.rope_scale)
    k = apply_rope(k, positions_BxT, self.rope_base, self.rope_scale)
    new_cache = None
    if kv_cache is not None:
      kc = jax.lax.dynamic_update_slice_in_dim(kv_cache["k"], k.astype(kv_cache["k"].dtype),
                                               cache_index, axis=1)
      vc = jax.lax.dynamic_update_slice_in_dim(kv_cache["v"], v.astype(kv_cache["v"].dtype),
                                               cache_index, axis=1)
      new_cache = {"k": kc, "v": vc}
      k, v = kc.astype(dt), vc.astype(dt)
    if masks is None:
      attn = jax.nn.dot_product_attention(
          q, k, v, scale=self.scale, is_causal=True,
          local_window_size=None if self.window is None else (self.window - 1, 0))
    else:
      mask = masks["global" if self.window is None else "local"]
      attn = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.scale)
    return self.o_proj(attn), new_cache


class MLP(nnx.Module):

  def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
    d, f = cfg.embed_dim, cfg.mlp_dim
    pdt = jnp.dtype(cfg.param_dtype)
    self.gate_proj = Projection((d,), (f,), ("embed", "mlp"), rngs=rngs, name="gate",
                                param_dtype=pdt)
    self.up_proj = Projection((d,), (f,), ("embed", "mlp"), rngs=rngs, name="up", param_dtype=pdt)
    self.down_proj = Projection((f,), (d,), ("mlp", "embed"), rngs=rngs, name="down",
                                param_dtype=pdt)

  def __call__(self, x):
    return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


class Block(nnx.Module):

  def __init__(self, cfg: GemmaConfig, layer: int, *, rngs: nnx.Rngs):
    d = cfg.embed_dim
    pdt = jnp.dtype(cfg.param_dtype)
    norm = lambda: RMSNorm(d, rngs=rngs, eps=cfg.rms_eps, param_dtype=pdt)
    self.pre_attention_norm = norm()
    self.attn = Attention(cfg, layer, rngs=rngs)
    self.post_attention_norm = norm()
    self.pre_ffw_norm = norm()
    self.mlp = MLP(cfg, rngs=rngs)
    self.post_ffw_norm = norm()

  def __call__(self, x, positions, masks, kv_cache=None, cache_index=None):
    h, new_cache = self.attn(self.pre_attention_norm(x), positions, masks, kv_cache, cache_index)
    x = x + self.post_attention_norm(h)
    x = x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))
    return x, new_cache


def _position_masks(q_pos_BxT, k_pos_BxS, k_valid_BxS, window: int):
  """Boolean [B,1,T,S] masks: causal by position, key valid, (local) within the window."""
  diff = q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]
  base = (diff >= 0) & k_valid_BxS[:, None, :]
  return {"global": base[:, None], "local": (base & (diff < window))[:, None]}


# ---------------------------------------------------------------------------------------------
# The model.


class Gemma3(nnx.Module):
  """Gemma 3 text decoder.  Works under ``nnx.eval_shape`` (abstract init)."""

  def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.embedder = Embedder(cfg.vocab_size, cfg.embed_dim, rngs=rngs, param_dtype=pdt)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.embed_dim, rngs=rngs, eps=cfg.rms_eps, param_dtype=pdt)
    xattn = {}
    for i in cfg.cross_attention_layers:
      xattn[str(i)] = GatedCrossAttention(
          embed_dim=cfg.embed_dim, media_dim=cfg.embed_dim,
          num_heads=cfg.xattn_num_heads or cfg.num_heads,
          head_dim=cfg.xattn_head_dim or cfg.head_dim,
          mlp_dim=cfg.xattn_mlp_dim or cfg.mlp_dim, rngs=rngs, dtype=jnp.dtype(cfg.dtype),
          param_dtype=pdt)
    self.xattn = nnx.Dict(xattn)
    if cfg.lora is not None:
      apply_lora(self, cfg.lora, rngs=rngs)

  # -- helpers ---------------------------------------------------------------------------------

  @property
  def dtype(self):
    return jnp.dtype(self.cfg.dtype)

  def embed(self, tokens_BxL: jax.Array) -> jax.Array:
    """Scaled token embeddings in the compute dtype."""
    emb = self.embedder.input_embedding[...]
    x = jnp.take(emb, tokens_BxL, axis=0).astype(self.dtype)
    return x * jnp.sqrt(jnp.float32(self.cfg.embed_dim)).astype(self.dtype)

  def logits(self, hidden_BxLxD: jax.Array,
             vocab_ids: Optional[jax.Array] = None) -> jax.Array:
    """Tied output projection of the final (normed) hidden state, float32 logits.

    ``vocab_ids``: optional int ``[K]`` (shared by all rows) or ``[B, K]`` (one set per row
    of the leading axis of ``hidden``): logits only against those rows of the embedding
    table, output ``[..., K]`` in the order of ``vocab_ids`` (column ``k`` is the logit of
    token ``vocab_ids[..., k]``).  Costs ``K / V`` of the full projection.
    """
    hidden = hidden_BxLxD.astype(self.dtype)
    emb_VxD = self.embedder.input_embedding[...]
    if vocab_ids is None:
      return jnp.einsum("...d,vd->...v", hidden, emb_VxD.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    ids = jnp.asarray(vocab_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"Gemma3.logits: vocab_ids must be integer token ids, got dtype "
                       f"{ids.dtype}")
    if ids.ndim == 1:
      emb_KxD = jnp.take(emb_VxD, ids, axis=0).astype(self.dtype)
      return jnp.einsum("...d,kd->...k", hidden, emb_KxD, preferred_element_type=jnp.float32)
    if ids.ndim == 2:
      if hidden.ndim < 2 or hidden.shape[0] != ids.shape[0]:
        raise ValueError(f"Gemma3.logits: vocab_ids [B, K] = {ids.shape} needs hidden with "
                         f"leading batch {ids.shape[0]}, got hidden shape {hidden.shape}")
      emb_BxKxD = jnp.take(emb_VxD, ids, axis=0).astype(self.dtype)
      return jnp.einsum("b...d,bkd->b...k", hidden, emb_BxKxD,
                        preferred_element_type=jnp.float32)
    raise ValueError(f"Gemma3.logits: vocab_ids must be [K] or [B, K], got shape {ids.shape}")

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> Cache:
    """An empty KV cache with ``max_len`` slots (prefix + prompt + generated tokens)."""
    cfg = self.cfg
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {
        "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                   for _ in range(cfg.num_layers)],
        "pos": jnp.zeros((batch_size, max_len), jnp.int32),
        "valid": jnp.zeros((batch_size, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }

  # -- forward ---------------------------------------------------------------------------------

  def __call__(self, tokens_BxL: jax.Array, *, positions_BxL: Optional[jax.Array] = None,
               input_mask_BxL: Optional[jax.Array] = None,
               prefix_embeds_BxPxD: Optional[jax.Array] = None,
               prefix_mask_BxP: Optional[jax.Array] = None,
               media_BxMxD: Optional[jax.Array] = None,
               media_mask_BxM: Optional[jax.Array] = None,
               logits_positions: Optional[jax.Array] = None,
               logits_vocab_ids: Optional[jax.Array] = None,
               return_hidden: bool = False,
               cache: Optional[Cache] = None,
               stop_after_layer: Optional[int] = None,
               trunk_BxLxD: Optional[jax.Array] = None,
               trunk_layer: Optional[int] = None):
    """Forward pass.

    Args:
      tokens_BxL: int token ids.
      positions_BxL: explicit RoPE positions of the tokens (counted after the valid prefix).
        Default: the number of valid slots before each token (so padding never shifts them).
        Only honoured when the masks are explicit (padding, prefix, or cache).
      input_mask_BxL: True for real tokens; padded slots take no part in attention.
      prefix_embeds_BxPxD / prefix_mask_BxP: soft prompt placed before the tokens.
      media_BxMxD / media_mask_BxM: inputs of the cross-attention blocks (required iff
        ``cfg.cross_attention_layers``).
      logits_positions: int [B, N] (or [N]) indices into the token part: logits only there.
      logits_vocab_ids: int [K] (or [B, K]) token ids: logits only against those rows of the
        tied embedding table, output [..., K] (see :meth:`logits`); composes with
        ``logits_positions``.  Ignored with ``return_hidden``.
      return_hidden: return the final normed hidden state of the token part instead of
        logits (use :meth:`logits` on the rows you need).
      cache: a cache from :meth:`init_cache`; the chunk (prefix + tokens) is written at
        ``cache['index']``. Then the result is ``(out, new_cache)``.
      stop_after_layer: return the hidden state ``[B, L, D]`` after block ``k`` (before its
        cross-attention, not normed): the *trunk* that ``trunk_BxLxD`` resumes from.
      trunk_BxLxD / trunk_layer: resume from the hidden state after block ``trunk_layer``
        (from ``stop_after_layer``): blocks ``0..trunk_layer`` are skipped, its
        cross-attention and the blocks above run.  Without a prefix or a cache only.  With
        cross-attention only after late layers and a frozen LLM the trunk depends on the
        tokens alone, so it can be computed once per sequence (``stage2/trunk.py``).

    Returns:
      float32 logits [B, L, V] (or [B, N, V]; V -> K with ``logits_vocab_ids``), or hidden
      [B, L, D]; plus the new cache if
      ``cache`` was given.
    """
    cfg = self.cfg
    dt = self.dtype
    tokens_BxL = jnp.asarray(tokens_BxL)
    if tokens_BxL.ndim != 2:
      raise ValueError(f"Gemma3: tokens_BxL must be [B, L], got shape {tokens_BxL.shape}")
    B, L = tokens_BxL.shape
    if trunk_BxLxD is not None:
      if trunk_layer is None or not 0 <= int(trunk_layer) < cfg.num_layers:
        raise ValueError(f"Gemma3: trunk_BxLxD needs trunk_layer in [0, {cfg.num_layers}), "
                         f"got {trunk_layer!r}")
      if prefix_embeds_BxPxD is not None or cache is not None or stop_after_layer is not None:
        raise ValueError("Gemma3: trunk_BxLxD cannot be combined with a prefix, a cache or "
                         "stop_after_layer")
      if tuple(trunk_BxLxD.shape) != (B, L, cfg.embed_dim):
        raise ValueError(f"Gemma3: trunk_BxLxD shape {tuple(trunk_BxLxD.shape)}, expected "
                         f"{(B, L, cfg.embed_dim)}")
      x = jnp.asarray(trunk_BxLxD).astype(self.dtype)
    else:
      x = self.embed(tokens_BxL)
    if stop_after_layer is not None and not 0 <= int(stop_after_layer) < cfg.num_layers:
      raise ValueError(f"Gemma3: stop_after_layer must be in [0, {cfg.num_layers}), got "
                       f"{stop_after_layer!r}")
    if stop_after_layer is not None and cache is not None:
      raise ValueError("Gemma3: stop_after_layer cannot be combined with a cache")
    valid = None if input_mask_BxL is None else jnp.asarray(input_mask_BxL).astype(bool)
    if valid is not None and valid.shape != (B, L):
      raise ValueError(f"Gemma3: input_mask_BxL shape {valid.shape}, expected {(B, L)}")
    P = 0
    if prefix_embeds_BxPxD is not None:
      pre = jnp.asarray(prefix_embeds_BxPxD)
      if pre.ndim != 3 or pre.shape[0] != B or pre.shape[2] != cfg.embed_dim:
        raise ValueError(f"Gemma3: prefix_embeds_BxPxD shape {pre.shape}, expected "
                         f"({B}, P, {cfg.embed_dim})")
      P = pre.shape[1]
      x = jnp.concatenate([pre.astype(dt), x], axis=1)
      pmask = (jnp.ones((B, P), bool) if prefix_mask_BxP is None
               else jnp.asarray(prefix_mask_BxP).astype(bool))
      if pmask.shape != (B, P):
        raise ValueError(f"Gemma3: prefix_mask_BxP shape {pmask.shape}, expected {(B, P)}")
      if prefix_mask_BxP is not None or valid is not None:
        valid = jnp.concatenate([pmask, jnp.ones((B, L), bool) if valid is None else valid], 1)
    elif prefix_mask_BxP is not None:
      raise ValueError("Gemma3: prefix_mask_BxP given without prefix_embeds_BxPxD")
    S = P + L
    # The trunk up to the first cross-attention block (stop_after_layer) needs no media.
    needs_media = cfg.cross_attention_layers and (
        stop_after_layer is None or int(stop_after_layer) > min(cfg.cross_attention_layers))
    if needs_media and media_BxMxD is None:
      raise ValueError(f"Gemma3: cfg.cross_attention_layers={cfg.cross_attention_layers} "
                       "needs media_BxMxD")

    explicit = valid is not None or cache is not None or positions_BxL is not None
    valid_BxS = jnp.ones((B, S), bool) if valid is None else valid
    # Position of each slot = number of valid slots before it (continuing the cache).
    offset_B = (jnp.zeros((B,), jnp.int32) if cache is None
                else jnp.sum(cache["valid"], axis=1).astype(jnp.int32))
    positions_BxS = offset_B[:, None] + jnp.cumsum(valid_BxS.astype(jnp.int32), axis=1) - 1
    if positions_BxL is not None:
      positions_BxL = jnp.asarray(positions_BxL).astype(jnp.int32)
      if positions_BxL.shape != (B, L):
        raise ValueError(f"Gemma3: positions_BxL shape {positions_BxL.shape}, expected {(B, L)}")
      prefix_len_B = offset_B + (jnp.sum(valid_BxS[:, :P], axis=1) if P else 0)
      positions_BxS = jnp.concatenate(
          [positions_BxS[:, :P], prefix_len_B[:, None] + positions_BxL], axis=1)

    masks = None
    new_cache = None
    index = None
    if cache is not None:
      index = cache["index"]
      max_len = cache["pos"].shape[1]
      if cache["pos"].shape[0] != B:
        raise ValueError(f"Gemma3: cache batch {cache['pos'].shape[0]} != input batch {B}")
      try:
        concrete_index = int(index)
      except (jax.errors.TracerIntegerConversionError, jax.errors.ConcretizationTypeError):
        concrete_index = None
      if concrete_index is not None and concrete_index + S > max_len:
        raise ValueError(f"Gemma3: cache overflow: index {int(index)} + chunk {S} > {max_len}")
      k_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions_BxS, index, axis=1)
      k_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid_BxS, index, axis=1)
      masks = _position_masks(positions_BxS, k_pos, k_valid, cfg.sliding_window)
      new_cache = {"layers": [], "pos": k_pos, "valid": k_valid, "index": index + S}
    elif explicit:
      masks = _position_masks(positions_BxS, positions_BxS, valid_BxS, cfg.sliding_window)

    for i, block in enumerate(self.layers):
      if trunk_BxLxD is not None and i <= int(trunk_layer):
        if i == int(trunk_layer) and str(i) in self.xattn:
          x = self.xattn[str(i)](x, media_BxMxD, media_mask_BxM)
        continue
      kv = None if cache is None else cache["layers"][i]
      if cfg.remat and cache is None:
        x, kv_new = nnx.remat(lambda b, x_, p_, m_: b(x_, p_, m_))(block, x, positions_BxS,
                                                                    masks)
      else:
        x, kv_new = block(x, positions_BxS, masks, kv, index)
      if cache is not None:
        new_cache["layers"].append(kv_new)
      if stop_after_layer is not None and i == int(stop_after_layer):
        return x[:, P:]
      if str(i) in self.xattn:
        x = self.xattn[str(i)](x, media_BxMxD, media_mask_BxM)

    x = x[:, P:]
    if logits_positions is not None:
      lp = jnp.asarray(logits_positions).astype(jnp.int32)
      if lp.ndim == 1:
        lp = jnp.broadcast_to(lp[None], (B, lp.shape[0]))
      x = jnp.take_along_axis(x, lp[:, :, None], axis=1)
    h = self.final_norm(x)
    if logits_vocab_ids is not None:
      ids = jnp.asarray(logits_vocab_ids)
      if ids.ndim not in (1, 2) or (ids.ndim == 2 and ids.shape[0] != B):
        raise ValueError(f"Gemma3: logits_vocab_ids must be [K] or [B={B}, K], got shape "
                         f"{ids.shape}")
    out = h if return_hidden else self.logits(h, logits_vocab_ids)
    return out if cache is None else (out, new_cache)


def param_count(model: nnx.Module) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
