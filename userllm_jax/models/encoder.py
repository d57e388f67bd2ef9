"""User encoder (User-LLM stage 1): a causal Transformer over a user's interaction history.

Pipeline per batch (see docs/INTERFACES.md for the batch layout)::

  item_BxT, genre_BxTxG, rating_BxT, timegap_BxT, position_BxT, segment_BxT
     │ per-feature embeddings  (item table ('items','embed'); genres: masked mean over G)
     ├─ fusion='early': combine per item (sum, or concat + linear) ► one Transformer stack
     └─ fusion='late' : one Transformer stack per feature stream  ► combine (sum | concat + linear)
     ▼
  item_emb_BxTxD (final RMSNorm)  and  user_BxD (pooled: last valid item, or mean)

Positions: 'learned' (absolute table, added to the input) or 'rotary' (applied to q/k inside
attention, split-halves form) or 'none'; an optional time-gap bucket embedding is one more
feature ('timegap').  Attention is causal and segment-masked (packed rows attend only within
their own segment; padding has segment 0 and never reaches a real token).  The attention
function is pluggable: 'xla', 'cudnn' (GPU, bf16/fp16) or any name registered with
:func:`register_attention` (e.g. a TPU splash/flash kernel).

Pretraining objectives (:func:`pretrain_loss`): next item with a full softmax over the
catalogue, a sampled softmax with logQ correction, or in-batch negatives (for 10^5-10^6
items), plus next-genre (multi-label, sigmoid) and next-rating (softmax) heads when those
features are fused.  Everything is masked by ``target_item > OOV`` (targets 0 = PAD and
1 = OOV carry no loss; the catalogue scored excludes ids 0 and 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from userllm_jax.models.common import RMSNorm, param

PAD_ID = 0
OOV_ID = 1
NUM_SPECIAL = 2  # ids < NUM_SPECIAL are never scored nor used as targets.

FEATURES = ("item", "genre", "rating", "timegap")
_NEG_INF = -1e30

_init = jax.nn.initializers.normal(stddev=0.02)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Hyper-parameters of :class:`UserEncoder` (the ``model`` section of an encoder config).

  Vocabulary sizes include the special ids (PAD=0, OOV=1).
  """
  num_items: int
  num_genres: int = 0
  num_ratings: int = 0
  num_timegap_buckets: int = 0
  features: tuple[str, ...] = ("item",)
  embed_dim: int = 64
  num_layers: int = 2
  num_heads: int = 2
  head_dim: int = 0  # 0 -> embed_dim // num_heads
  mlp_dim: int = 0  # 0 -> 4 * embed_dim
  dropout: float = 0.2
  emb_dropout: float = -1.0  # < 0 -> same as dropout
  max_len: int = 50
  position: str = "learned"  # 'learned' | 'rotary' | 'none'
  rope_base: float = 10_000.0
  fusion: str = "early"  # 'early' | 'late'
  combine: str = "sum"  # 'sum' | 'concat' (concat + linear)
  pooling: str = "last"  # 'last' | 'mean'
  tie_output: bool = True  # output item embedding tied to the input item table
  attention: str = "xla"  # 'xla' | 'cudnn' | a name registered with register_attention
  remat: bool = False
  dtype: str = "float32"  # compute dtype: 'float32' | 'bfloat16'
  param_dtype: str = "float32"

  def __post_init__(self):
    def bad(field, expected, got):
      raise ValueError(f"EncoderConfig.{field}: expected {expected}, got {got!r}")
    if self.num_items <= NUM_SPECIAL:
      bad("num_items", f"> {NUM_SPECIAL} (ids 0=PAD, 1=OOV are reserved)", self.num_items)
    if not self.features or "item" not in self.features:
      bad("features", "a tuple containing 'item'", self.features)
    for f in self.features:
      if f not in FEATURES:
        bad("features", f"names from {FEATURES}", self.features)
    if len(set(self.features)) != len(self.features):
      bad("features", "no duplicates", self.features)
    for f, size in (("genre", self.num_genres), ("rating", self.num_ratings),
                    ("timegap", self.num_timegap_buckets)):
      if f in self.features and size <= 1:
        field = {"genre": "num_genres", "rating": "num_ratings",
                 "timegap": "num_timegap_buckets"}[f]
        bad(field, f"> 1 because feature {f!r} is enabled", size)
    if self.position not in ("learned", "rotary", "none"):
      bad("position", "'learned' | 'rotary' | 'none'", self.position)
    if self.fusion not in ("early", "late"):
      bad("fusion", "'early' | 'late'", self.fusion)
    if self.combine not in ("sum", "concat"):
      bad("combine", "'sum' | 'concat'", self.combine)
    if self.pooling not in ("last", "mean"):
      bad("pooling", "'last' | 'mean'", self.pooling)
    if self.dtype not in ("float32", "bfloat16", "float16"):
      bad("dtype", "'float32' | 'bfloat16' | 'float16'", self.dtype)
    if self.embed_dim <= 0 or self.num_layers < 0 or self.num_heads <= 0:
      bad("embed_dim/num_layers/num_heads", "positive sizes",
          (self.embed_dim, self.num_layers, self.num_heads))
    if self.head_dim == 0 and self.embed_dim % self.num_heads:
      bad("head_dim", f"set explicitly, embed_dim={self.embed_dim} is not divisible by "
          f"num_heads={self.num_heads}", self.head_dim)
    if self.position == "rotary" and self.resolved_head_dim % 2:
      bad("head_dim", "even for rotary positions", self.resolved_head_dim)
    if not 0.0 <= self.dropout < 1.0:
      bad("dropout", "in [0, 1)", self.dropout)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def resolved_mlp_dim(self) -> int:
    return self.mlp_dim or 4 * self.embed_dim

  @property
  def resolved_emb_dropout(self) -> float:
    return self.dropout if self.emb_dropout < 0 else self.emb_dropout

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], **overrides) -> "EncoderConfig":
    """Builds from a ConfigDict / dict (e.g. ``config.model``); unknown keys raise."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    d.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"EncoderConfig: unknown field(s) {unknown}; known: {sorted(names)}")
    if "features" in d:
      d["features"] = tuple(d["features"])
    return cls(**d)


# --------------------------------------------------------------------------------------------
# Attention functions (pluggable)
# --------------------------------------------------------------------------------------------

# fn(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, segment_BxT) -> out_BxTxNxH; causal within segments.
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
_ATTENTION: dict[str, AttentionFn] = {}


def register_attention(name: str, fn: AttentionFn) -> None:
  """Registers an attention kernel usable as ``EncoderConfig.attention=name``.

  ``fn(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, segment_BxT) -> out_BxTxNxH`` must implement causal
  attention restricted to keys with the same segment id as the query (scale 1/sqrt(H)).
  """
  _ATTENTION[name] = fn


def attention_names() -> list[str]:
  return sorted(_ATTENTION)


def segment_causal_mask(segment_BxT: jax.Array) -> jax.Array:
  """[B,1,T,T] bool: key j visible from query i iff j <= i and segment[i] == segment[j].

  Padding (segment 0) only sees padding, so real tokens never see padding and no row is
  fully masked.
  """
  T = segment_BxT.shape[-1]
  causal_TxT = jnp.tril(jnp.ones((T, T), bool))
  same_BxTxT = segment_BxT[:, :, None] == segment_BxT[:, None, :]
  return (same_BxTxT & causal_TxT[None])[:, None]


def _xla_attention(q, k, v, segment_BxT):
  return jax.nn.dot_product_attention(q, k, v, mask=segment_causal_mask(segment_BxT),
                                      implementation="xla")


def _cudnn_attention(q, k, v, segment_BxT):
  # cuDNN fused attention (GPU; fp16/bf16).  Causal masking is native; the segment mask is
  # passed as an explicit mask (folded into a bias by JAX).
  same = (segment_BxT[:, :, None] == segment_BxT[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True,
                                      implementation="cudnn")


register_attention("xla", _xla_attention)
register_attention("cudnn", _cudnn_attention)


def get_attention(name: str) -> AttentionFn:
  if name not in _ATTENTION:
    raise ValueError(f"EncoderConfig.attention: unknown attention {name!r}; "
                     f"registered: {attention_names()}")
  return _ATTENTION[name]


def rotary(x_BxTxNxH: jax.Array, position_BxT: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding, split-halves ("rotate_half") form."""
  H = x_BxTxNxH.shape[-1]
  half = H // 2
  inv_freq = 1.0 / (base ** (np.arange(half, dtype=np.float32) * 2.0 / H))
  angle_BxTxF = position_BxT.astype(jnp.float32)[..., None] * inv_freq
  sin = jnp.sin(angle_BxTxF)[:, :, None, :]
  cos = jnp.cos(angle_BxTxF)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def _dropout(x: jax.Array, rate: float, key: Optional[jax.Array]) -> jax.Array:
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _fold(key: Optional[jax.Array], i: int) -> Optional[jax.Array]:
  return None if key is None else jax.random.fold_in(key, i)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class Block(nnx.Module):
  """Pre-norm Transformer block: x + Attn(norm(x)); x + MLP(norm(x)) with GELU."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    D, N, H, F = cfg.embed_dim, cfg.num_heads, cfg.resolved_head_dim, cfg.resolved_mlp_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.attn_norm = RMSNorm(D, rngs=rngs, param_dtype=pd)
    self.q_proj = param(rngs, _init, (D, N, H), ("embed", "heads", "head_dim"), pd)
    self.k_proj = param(rngs, _init, (D, N, H), ("embed", "heads", "head_dim"), pd)
    self.v_proj = param(rngs, _init, (D, N, H), ("embed", "heads", "head_dim"), pd)
    self.o_proj = param(rngs, _init, (N, H, D), ("heads", "head_dim", "embed"), pd)
    self.mlp_norm = RMSNorm(D, rngs=rngs, param_dtype=pd)
    self.up_proj = param(rngs, _init, (D, F), ("embed", "mlp"), pd)
    self.up_bias = param(rngs, nnx.initializers.zeros, (F,), ("mlp",), pd)
    self.down_proj = param(rngs, _init, (F, D), ("mlp", "embed"), pd)

  def __call__(self, x_BxTxD, segment_BxT, position_BxT, key):
    cfg = self.cfg
    dt = cfg.compute_dtype
    h = self.attn_norm(x_BxTxD).astype(dt)
    q = jnp.einsum("btd,dnh->btnh", h, self.q_proj[...].astype(dt))
    k = jnp.einsum("btd,dnh->btnh", h, self.k_proj[...].astype(dt))
    v = jnp.einsum("btd,dnh->btnh", h, self.v_proj[...].astype(dt))
    if cfg.position == "rotary":
      q = rotary(q, position_BxT, cfg.rope_base)
      k = rotary(k, position_BxT, cfg.rope_base)
    a = get_attention(cfg.attention)(q, k, v, segment_BxT)
    a = jnp.einsum("btnh,nhd->btd", a.astype(dt), self.o_proj[...].astype(dt))
    x = x_BxTxD + _dropout(a, cfg.dropout, _fold(key, 0)).astype(x_BxTxD.dtype)
    h = self.mlp_norm(x).astype(dt)
    h = jax.nn.gelu(h @ self.up_proj[...].astype(dt) + self.up_bias[...].astype(dt))
    h = _dropout(h, cfg.dropout, _fold(key, 1))
    h = h @ self.down_proj[...].astype(dt)
    return x + _dropout(h, cfg.dropout, _fold(key, 2)).astype(x.dtype)


class Stack(nnx.Module):
  """``num_layers`` blocks and a final RMSNorm (one Transformer stack)."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.embed_dim, rngs=rngs, param_dtype=jnp.dtype(cfg.param_dtype))

  def __call__(self, x_BxTxD, segment_BxT, position_BxT, key):
    for i, block in enumerate(self.blocks):
      k = _fold(key, i)
      if self.cfg.remat:
        x_BxTxD = nnx.remat(lambda b, x, s, p, kk: b(x, s, p, kk))(
            block, x_BxTxD, segment_BxT, position_BxT, k)
      else:
        x_BxTxD = block(x_BxTxD, segment_BxT, position_BxT, k)
    return self.final_norm(x_BxTxD)


class UserEncoder(nnx.Module):
  """Multi-feature causal Transformer user encoder.

  ``__call__(batch, *, deterministic=True, rng=None) -> (item_emb_BxTxD, user_BxD)``.
  ``batch`` needs ``item_BxT`` and ``segment_BxT`` (or only ``item_BxT``: then segment =
  (item != 0) and positions = arange); ``position_BxT`` (0-based within a segment); and
  ``genre_BxTxG`` / ``rating_BxT`` / ``timegap_BxT`` for the enabled features.  Training
  (``deterministic=False``) needs ``rng`` for dropout.
  """

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D = cfg.embed_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.item_embedding = param(rngs, _init, (cfg.num_items, D), ("items", "embed"), pd)
    if "genre" in cfg.features:
      self.genre_embedding = param(rngs, _init, (cfg.num_genres, D), (None, "embed"), pd)
    if "rating" in cfg.features:
      self.rating_embedding = param(rngs, _init, (cfg.num_ratings, D), (None, "embed"), pd)
    if "timegap" in cfg.features:
      self.timegap_embedding = param(rngs, _init, (cfg.num_timegap_buckets, D),
                                     (None, "embed"), pd)
    if cfg.position == "learned":
      self.position_embedding = param(rngs, _init, (cfg.max_len, D), (None, "embed"), pd)
    F = len(cfg.features)
    if cfg.fusion == "early":
      if cfg.combine == "concat" and F > 1:
        self.fuse_proj = param(rngs, _init, (F * D, D), (None, "embed"), pd)
      self.stack = Stack(cfg, rngs=rngs)
    else:
      self.streams = nnx.List([Stack(cfg, rngs=rngs) for _ in range(F)])
      if cfg.combine == "concat" and F > 1:
        self.fuse_proj = param(rngs, _init, (F * D, D), (None, "embed"), pd)
    self.input_norm = RMSNorm(D, rngs=rngs, param_dtype=pd)
    # Output heads.
    if not cfg.tie_output:
      self.output_embedding = param(rngs, _init, (cfg.num_items, D), ("items", "embed"), pd)
    if "genre" in cfg.features:
      self.genre_head = param(rngs, _init, (D, cfg.num_genres), ("embed", None), pd)
    if "rating" in cfg.features:
      self.rating_head = param(rngs, _init, (D, cfg.num_ratings), ("embed", None), pd)

  # ---------------------------------------------------------------------------------------

  def output_table(self) -> jax.Array:
    """[num_items, D] table scored against hidden states for next-item prediction."""
    return (self.item_embedding if self.cfg.tie_output else self.output_embedding)[...]

  def _feature_embeddings(self, batch) -> list[jax.Array]:
    cfg = self.cfg
    item_BxT = jnp.asarray(batch["item_BxT"])
    out = []
    for f in cfg.features:
      if f == "item":
        out.append(jnp.take(self.item_embedding[...], item_BxT, axis=0))
      elif f == "genre":
        genre_BxTxG = jnp.asarray(_need(batch, "genre_BxTxG", f))
        e_BxTxGxD = jnp.take(self.genre_embedding[...], genre_BxTxG, axis=0)
        m_BxTxG = (genre_BxTxG >= NUM_SPECIAL).astype(e_BxTxGxD.dtype)
        denom_BxT = jnp.maximum(m_BxTxG.sum(-1), 1.0)
        out.append(jnp.einsum("btgd,btg->btd", e_BxTxGxD, m_BxTxG) / denom_BxT[..., None])
      elif f == "rating":
        out.append(jnp.take(self.rating_embedding[...],
                            jnp.asarray(_need(batch, "rating_BxT", f)), axis=0))
      elif f == "timegap":
        out.append(jnp.take(self.timegap_embedding[...],
                            jnp.asarray(_need(batch, "timegap_BxT", f)), axis=0))
    return out

  def _combine(self, xs: Sequence[jax.Array]) -> jax.Array:
    if len(xs) == 1:
      return xs[0]
    if self.cfg.combine == "sum":
      return sum(xs[1:], xs[0])
    x = jnp.concatenate(xs, axis=-1)
    return x @ self.fuse_proj[...].astype(x.dtype)

  def __call__(self, batch: Mapping[str, Any], *, deterministic: bool = True,
               rng: Optional[jax.Array] = None):
    cfg = self.cfg
    item_BxT = jnp.asarray(batch["item_BxT"])
    if item_BxT.ndim != 2:
      raise ValueError(f"UserEncoder: batch['item_BxT'] must be [B,T], got {item_BxT.shape}")
    B, T = item_BxT.shape
    if "segment_BxT" in batch:
      segment_BxT = jnp.asarray(batch["segment_BxT"])
    else:
      segment_BxT = (item_BxT != PAD_ID).astype(jnp.int32)
    if "position_BxT" in batch:
      position_BxT = jnp.asarray(batch["position_BxT"])
    else:
      position_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if cfg.position == "learned" and T > cfg.max_len:
      raise ValueError(f"UserEncoder: sequence length T={T} > model.max_len={cfg.max_len} "
                       "(learned positions); raise model.max_len or use position='rotary'")
    if not deterministic and rng is None:
      raise ValueError("UserEncoder: deterministic=False needs rng= for dropout")
    key = None if deterministic else rng
    valid_BxT = segment_BxT != 0

    feats = self._feature_embeddings(batch)
    pos_BxTxD = None
    if cfg.position == "learned":
      pos_BxTxD = jnp.take(self.position_embedding[...],
                           jnp.clip(position_BxT, 0, cfg.max_len - 1), axis=0)

    def prepare(x, i):
      if pos_BxTxD is not None:
        x = x + pos_BxTxD
      x = self.input_norm(x)
      x = _dropout(x, cfg.resolved_emb_dropout, _fold(key, 1000 + i))
      return jnp.where(valid_BxT[..., None], x, 0.0)

    if cfg.fusion == "early":
      x = prepare(self._combine(feats), 0)
      h_BxTxD = self.stack(x, segment_BxT, position_BxT, _fold(key, 0))
    else:
      outs = [stream(prepare(f, i), segment_BxT, position_BxT, _fold(key, 1 + i))
              for i, (stream, f) in enumerate(zip(self.streams, feats))]
      h_BxTxD = self._combine(outs)
    h_BxTxD = jnp.where(valid_BxT[..., None], h_BxTxD, 0.0).astype(jnp.float32)
    return h_BxTxD, pool(h_BxTxD, segment_BxT, cfg.pooling)


def _need(batch, name, feature):
  if name not in batch:
    raise KeyError(f"UserEncoder: feature {feature!r} is enabled (model.features) but the batch "
                   f"has no {name!r}; batch keys: {sorted(batch)}")
  return batch[name]


def pool(h_BxTxD: jax.Array, segment_BxT: jax.Array, pooling: str = "last") -> jax.Array:
  """User vector [B,D]: the hidden state of the last valid position ('last'; for packed rows
  the last position of the last segment), or the mean over the last segment ('mean')."""
  valid_BxT = segment_BxT != 0
  T = h_BxTxD.shape[1]
  idx_T = jnp.arange(T)
  last_B = jnp.max(jnp.where(valid_BxT, idx_T, -1), axis=1)
  if pooling == "last":
    out = jnp.take_along_axis(h_BxTxD, jnp.maximum(last_B, 0)[:, None, None], axis=1)[:, 0]
    return jnp.where((last_B >= 0)[:, None], out, 0.0)
  if pooling == "mean":
    last_seg_B = jnp.take_along_axis(segment_BxT, jnp.maximum(last_B, 0)[:, None], axis=1)
    m_BxT = (valid_BxT & (segment_BxT == last_seg_B)).astype(h_BxTxD.dtype)
    return jnp.einsum("btd,bt->bd", h_BxTxD, m_BxT) / jnp.maximum(m_BxT.sum(1), 1.0)[:, None]
  raise ValueError(f"pool: pooling must be 'last' or 'mean', got {pooling!r}")


def score_items(model: UserEncoder, batch: Mapping[str, Any]) -> jax.Array:
  """Scores of every catalogue item for each user's next item: [B, num_items] (float32).

  Ids 0 (PAD) and 1 (OOV) get -inf, so they never rank.
  """
  _, user_BxD = model(batch, deterministic=True)
  scores_BxN = user_BxD @ model.output_table().astype(jnp.float32).T
  return scores_BxN.at[:, :NUM_SPECIAL].set(-jnp.inf)


# --------------------------------------------------------------------------------------------
# Pretraining losses
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The ``loss`` section of an encoder config."""
  item_softmax: str = "full"  # 'full' | 'sampled' | 'in_batch'
  num_negatives: int = 1024  # 'sampled': negatives per step (shared by the batch)
  genre_weight: float = 0.0
  rating_weight: float = 0.0
  logq_correction: bool = True  # 'sampled' / 'in_batch'
  label_smoothing: float = 0.0  # 'full' only

  def __post_init__(self):
    if self.item_softmax not in ("full", "sampled", "in_batch"):
      raise ValueError("LossConfig.item_softmax: expected 'full' | 'sampled' | 'in_batch', "
                       f"got {self.item_softmax!r}")
    if self.item_softmax == "sampled" and self.num_negatives < 1:
      raise ValueError(f"LossConfig.num_negatives: expected >= 1, got {self.num_negatives}")

  @classmethod
  def from_config(cls, cfg: Any) -> "LossConfig":
    if cfg is None:
      return cls()
    if isinstance(cfg, cls):
      return cfg
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"LossConfig: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


def full_softmax_loss(h_NxD: jax.Array, target_N: jax.Array, table_VxD: jax.Array,
                      mask_N: jax.Array, label_smoothing: float = 0.0):
  """Mean cross-entropy of ``target_N`` under a softmax over items >= NUM_SPECIAL.

  Returns (loss, top1_accuracy) averaged over ``mask_N``.
  """
  logits_NxV = h_NxD.astype(jnp.float32) @ table_VxD.astype(jnp.float32).T
  V = logits_NxV.shape[-1]
  special_V = jnp.arange(V) < NUM_SPECIAL
  logits_NxV = jnp.where(special_V, _NEG_INF, logits_NxV)
  logp_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
  nll_N = -jnp.take_along_axis(logp_NxV, target_N[:, None], axis=-1)[:, 0]
  if label_smoothing > 0:
    smooth_N = -jnp.sum(jnp.where(special_V, 0.0, logp_NxV), -1) / (V - NUM_SPECIAL)
    nll_N = (1 - label_smoothing) * nll_N + label_smoothing * smooth_N
  m = mask_N.astype(jnp.float32)
  denom = jnp.maximum(m.sum(), 1.0)
  acc_N = (jnp.argmax(logits_NxV, -1) == target_N).astype(jnp.float32)
  return (nll_N * m).sum() / denom, (acc_N * m).sum() / denom


def sampled_softmax_loss(h_NxD: jax.Array, target_N: jax.Array, table_VxD: jax.Array,
                         mask_N: jax.Array, negatives_K: jax.Array,
                         log_q_V: Optional[jax.Array] = None, logq_correction: bool = True):
  """Sampled softmax (Jean et al. 2015; Bengio & Senecal 2008) with logQ correction.

  Candidates for row n: its target plus the K shared ``negatives_K`` (drawn with replacement
  from the proposal q).  Each candidate's logit is corrected by ``- log(K * q(item))`` (for
  the target too); negatives equal to the row's target ("accidental hits") are removed.  With
  a uniform q and every item drawn exactly once this equals the full softmax.
  """
  h = h_NxD.astype(jnp.float32)
  table = table_VxD.astype(jnp.float32)
  K = negatives_K.shape[0]
  pos_N = jnp.sum(h * jnp.take(table, target_N, axis=0), -1)
  neg_NxK = h @ jnp.take(table, negatives_K, axis=0).T
  if logq_correction:
    if log_q_V is None:
      V = table.shape[0]
      log_q_V = jnp.where(jnp.arange(V) < NUM_SPECIAL, _NEG_INF,
                          -jnp.log(float(V - NUM_SPECIAL)))
    log_k = math.log(K)
    pos_N = pos_N - (jnp.take(log_q_V, target_N) + log_k)
    neg_NxK = neg_NxK - (jnp.take(log_q_V, negatives_K) + log_k)[None]
  hit_NxK = negatives_K[None, :] == target_N[:, None]
  neg_NxK = jnp.where(hit_NxK | (negatives_K < NUM_SPECIAL)[None], _NEG_INF, neg_NxK)
  logits = jnp.concatenate([pos_N[:, None], neg_NxK], axis=-1)
  nll_N = -jax.nn.log_softmax(logits, axis=-1)[:, 0]
  m = mask_N.astype(jnp.float32)
  denom = jnp.maximum(m.sum(), 1.0)
  acc_N = (jnp.argmax(logits, -1) == 0).astype(jnp.float32)
  return (nll_N * m).sum() / denom, (acc_N * m).sum() / denom


def in_batch_softmax_loss(h_NxD: jax.Array, target_N: jax.Array, table_VxD: jax.Array,
                          mask_N: jax.Array, log_q_V: Optional[jax.Array] = None,
                          logq_correction: bool = True):
  """In-batch negatives: the other valid targets of the batch are the negatives.

  Candidate j's logit is corrected by ``- log q(t_j)``; q is ``log_q_V`` when given, else the
  item's frequency among this batch's targets (Yi et al. 2019).  Duplicates of the row's own
  target are masked (only its own column counts as the positive).  Memory O(N^2), N = number
  of positions in the batch.
  """
  h = h_NxD.astype(jnp.float32)
  e_NxD = jnp.take(table_VxD.astype(jnp.float32), target_N, axis=0)
  logits_NxN = h @ e_NxD.T
  valid_N = mask_N.astype(bool)
  same_NxN = target_N[:, None] == target_N[None, :]
  if logq_correction:
    if log_q_V is None:
      count_N = jnp.sum(same_NxN & valid_N[None, :], axis=1).astype(jnp.float32)
      log_q_N = jnp.log(jnp.maximum(count_N, 1.0)) - jnp.log(jnp.maximum(valid_N.sum(), 1))
    else:
      log_q_N = jnp.take(log_q_V, target_N)
    logits_NxN = logits_NxN - log_q_N[None, :]
  eye = jnp.eye(target_N.shape[0], dtype=bool)
  keep_NxN = valid_N[None, :] & (eye | ~same_NxN)
  logits_NxN = jnp.where(keep_NxN, logits_NxN, _NEG_INF)
  nll_N = -jnp.diagonal(jax.nn.log_softmax(logits_NxN, axis=-1))
  m = valid_N.astype(jnp.float32)
  denom = jnp.maximum(m.sum(), 1.0)
  acc_N = (jnp.argmax(logits_NxN, -1) == jnp.arange(target_N.shape[0])).astype(jnp.float32)
  return (nll_N * m).sum() / denom, (acc_N * m).sum() / denom


def genre_loss(h_NxD, target_genre_NxG, head_DxC, mask_N):
  """Multi-label next-genre loss: mean sigmoid BCE over genre classes >= NUM_SPECIAL."""
  logits_NxC = h_NxD.astype(jnp.float32) @ head_DxC.astype(jnp.float32)
  C = logits_NxC.shape[-1]
  onehot_NxGxC = jax.nn.one_hot(target_genre_NxG, C, dtype=jnp.float32)
  y_NxC = jnp.clip(onehot_NxGxC.sum(1), 0.0, 1.0)
  bce_NxC = optax_sigmoid_bce(logits_NxC, y_NxC)
  cls_C = (jnp.arange(C) >= NUM_SPECIAL).astype(jnp.float32)
  per_N = (bce_NxC * cls_C).sum(-1) / max(C - NUM_SPECIAL, 1)
  m = mask_N.astype(jnp.float32)
  return (per_N * m).sum() / jnp.maximum(m.sum(), 1.0)


def optax_sigmoid_bce(logits, labels):
  """Numerically stable sigmoid binary cross-entropy (elementwise)."""
  return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def rating_loss(h_NxD, target_rating_N, head_DxC, mask_N):
  """Next-rating softmax cross-entropy over rating ids >= NUM_SPECIAL; (loss, accuracy)."""
  logits_NxC = h_NxD.astype(jnp.float32) @ head_DxC.astype(jnp.float32)
  C = logits_NxC.shape[-1]
  logits_NxC = jnp.where(jnp.arange(C) < NUM_SPECIAL, _NEG_INF, logits_NxC)
  nll_N = -jnp.take_along_axis(jax.nn.log_softmax(logits_NxC, -1),
                               target_rating_N[:, None], axis=-1)[:, 0]
  m = (mask_N & (target_rating_N >= NUM_SPECIAL)).astype(jnp.float32)
  denom = jnp.maximum(m.sum(), 1.0)
  acc = ((jnp.argmax(logits_NxC, -1) == target_rating_N) * m).sum() / denom
  return (nll_N * m).sum() / denom, acc


def pretrain_loss(model: UserEncoder, batch: Mapping[str, Any], rng: Optional[jax.Array],
                  cfg: Any = None, *, deterministic: bool = False,
                  log_q_V: Optional[jax.Array] = None):
  """Self-supervised next-interaction loss; returns ``(loss, metrics)``.

  Args:
    model: the encoder.
    batch: a pretraining batch (``item_BxT`` ... ``target_item_BxT``, ``target_genre_BxTxG``,
      ``target_rating_BxT``; see docs/INTERFACES.md).
    rng: PRNG key for dropout and negative sampling (``None`` only with deterministic=True
      and item_softmax != 'sampled').
    cfg: the ``loss`` config section (ConfigDict, dict or :class:`LossConfig`).
    deterministic: disable dropout (evaluation of the loss).
    log_q_V: optional log proposal probabilities per item id [num_items] (e.g. log unigram
      frequency) for 'sampled' (sampling and correction) and 'in_batch' (correction).

  Metrics: ``loss``, ``item_loss``, ``item_acc`` (top-1 among the scored candidates),
  ``genre_loss``, ``rating_loss``, ``rating_acc`` (when active), ``num_targets``.
  """
  lc = LossConfig.from_config(cfg)
  mcfg = model.cfg
  if rng is None and (not deterministic or lc.item_softmax == "sampled"):
    raise ValueError("pretrain_loss: rng is required (dropout / negative sampling)")
  drop_key = None if rng is None else jax.random.fold_in(rng, 0)
  h_BxTxD, _ = model(batch, deterministic=deterministic, rng=drop_key)
  B, T, D = h_BxTxD.shape
  h_NxD = h_BxTxD.reshape(B * T, D)
  target_N = jnp.asarray(batch["target_item_BxT"]).reshape(B * T).astype(jnp.int32)
  mask_N = target_N >= NUM_SPECIAL
  safe_target_N = jnp.where(mask_N, target_N, NUM_SPECIAL)
  table = model.output_table()

  if lc.item_softmax == "full":
    item_loss, item_acc = full_softmax_loss(h_NxD, safe_target_N, table, mask_N,
                                            lc.label_smoothing)
  elif lc.item_softmax == "sampled":
    V = table.shape[0]
    key = jax.random.fold_in(rng, 1)
    if log_q_V is None:
      negatives_K = jax.random.randint(key, (lc.num_negatives,), NUM_SPECIAL, V)
    else:
      negatives_K = jax.random.categorical(key, log_q_V, shape=(lc.num_negatives,))
    item_loss, item_acc = sampled_softmax_loss(h_NxD, safe_target_N, table, mask_N,
                                               negatives_K, log_q_V, lc.logq_correction)
  else:
    item_loss, item_acc = in_batch_softmax_loss(h_NxD, safe_target_N, table, mask_N, log_q_V,
                                                lc.logq_correction)
  loss = item_loss
  metrics = {"item_loss": item_loss, "item_acc": item_acc,
             "num_targets": mask_N.sum().astype(jnp.float32)}
  if "genre" in mcfg.features and lc.genre_weight > 0:
    tg = jnp.asarray(_need(batch, "target_genre_BxTxG", "genre"))
    g_loss = genre_loss(h_NxD, tg.reshape(B * T, -1), model.genre_head[...], mask_N)
    loss = loss + lc.genre_weight * g_loss
    metrics["genre_loss"] = g_loss
  if "rating" in mcfg.features and lc.rating_weight > 0:
    tr = jnp.asarray(_need(batch, "target_rating_BxT", "rating")).reshape(B * T)
    r_loss, r_acc = rating_loss(h_NxD, tr, model.rating_head[...], mask_N)
    loss = loss + lc.rating_weight * r_loss
    metrics["rating_loss"] = r_loss
    metrics["rating_acc"] = r_acc
  metrics["loss"] = loss
  return loss, metrics


# --------------------------------------------------------------------------------------------
# Incremental encoding (serving): a per-user key/value cache
# --------------------------------------------------------------------------------------------
#
# The encoder is causal, and everything but attention is per position, so the outputs of
# positions 0..n-1 do not change when position n is appended.  ``EncoderCache`` keeps, per
# row (user), every layer's keys/values and the final per-item outputs of a window of at most
# ``capacity`` items; :func:`encode_append` runs k new items through the stack at positions
# ``length .. length + k - 1`` (k positions of work; attention reads the cached keys) and
# writes them into the cache.  Positions are window positions (0 at the window's first item),
# exactly as :meth:`UserEncoder.__call__` numbers a left-aligned window, so
# ``init_cache`` + ``encode_append`` of a window equals ``__call__`` on that window (within
# float tolerance: the attention is computed by a different XLA graph).  What to do when a
# window is full (re-encode a shorter suffix) is the caller's rule: see
# ``userllm_jax/serving/state.py``.  Deterministic (inference) only.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EncoderCache:
  """Per-row incremental encoder state.

  ``S`` streams (1 for fusion 'early', one per feature for 'late'), ``L`` layers, ``B``
  rows, capacity ``C``, ``N`` heads of width ``H``; ``D`` the model width.
  Slots ``>= length_B`` are zero.
  """
  k_SxLxBxCxNxH: jax.Array
  v_SxLxBxCxNxH: jax.Array
  h_BxCxD: jax.Array      # final per-item outputs (float32), as __call__ returns them
  length_B: jax.Array     # int32: items in the window

  @property
  def capacity(self) -> int:
    return int(self.h_BxCxD.shape[1])

  def valid_BxC(self) -> jax.Array:
    return jnp.arange(self.capacity)[None, :] < self.length_B[:, None]


def init_cache(model: UserEncoder, batch_size: int, capacity: Optional[int] = None
               ) -> EncoderCache:
  """An empty :class:`EncoderCache` for ``batch_size`` rows of at most ``capacity`` items
  (default ``model.cfg.max_len``; learned positions allow at most ``max_len``)."""
  cfg = model.cfg
  C = int(capacity or cfg.max_len)
  if C < 1:
    raise ValueError(f"init_cache: capacity must be >= 1, got {C}")
  if cfg.position == "learned" and C > cfg.max_len:
    raise ValueError(f"init_cache: capacity={C} > model.max_len={cfg.max_len} (learned "
                     "positions have no embedding beyond max_len)")
  S = 1 if cfg.fusion == "early" else len(cfg.features)
  L, N, H, D = cfg.num_layers, cfg.num_heads, cfg.resolved_head_dim, cfg.embed_dim
  kv = jnp.zeros((S, L, batch_size, C, N, H), cfg.compute_dtype)
  return EncoderCache(kv, kv, jnp.zeros((batch_size, C, D), jnp.float32),
                      jnp.zeros((batch_size,), jnp.int32))


def _block_append(block: Block, x_BxKxD, position_BxK, new_valid_BxK, k_BxCxNxH, v_BxCxNxH):
  """One :class:`Block` on K new positions, reading/extending the layer's key/value cache."""
  cfg = block.cfg
  dt = cfg.compute_dtype
  B, C = k_BxCxNxH.shape[:2]
  h = block.attn_norm(x_BxKxD).astype(dt)
  q = jnp.einsum("btd,dnh->btnh", h, block.q_proj[...].astype(dt))
  k = jnp.einsum("btd,dnh->btnh", h, block.k_proj[...].astype(dt))
  v = jnp.einsum("btd,dnh->btnh", h, block.v_proj[...].astype(dt))
  if cfg.position == "rotary":
    q = rotary(q, position_BxK, cfg.rope_base)
    k = rotary(k, position_BxK, cfg.rope_base)
  write_BxK = jnp.where(new_valid_BxK, position_BxK, C)  # C: out of range -> dropped
  rows_Bx1 = jnp.arange(B)[:, None]
  k_BxCxNxH = k_BxCxNxH.at[rows_Bx1, write_BxK].set(k.astype(k_BxCxNxH.dtype), mode="drop")
  v_BxCxNxH = v_BxCxNxH.at[rows_Bx1, write_BxK].set(v.astype(v_BxCxNxH.dtype), mode="drop")
  # Causal: key slot j is visible from the query at window position p iff j <= p (slots below
  # p hold this row's earlier items, cached or written just above).
  mask_BxKxC = jnp.arange(C)[None, None, :] <= position_BxK[:, :, None]
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("bknh,bcnh->bnkc", q.astype(jnp.float32),
                 k_BxCxNxH.astype(jnp.float32)) * scale
  s = jnp.where(mask_BxKxC[:, None], s, _NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  a = jnp.einsum("bnkc,bcnh->bknh", p, v_BxCxNxH.astype(jnp.float32)).astype(dt)
  a = jnp.einsum("btnh,nhd->btd", a, block.o_proj[...].astype(dt))
  x = x_BxKxD + a.astype(x_BxKxD.dtype)
  h = block.mlp_norm(x).astype(dt)
  h = jax.nn.gelu(h @ block.up_proj[...].astype(dt) + block.up_bias[...].astype(dt))
  h = h @ block.down_proj[...].astype(dt)
  return x + h.astype(x.dtype), k_BxCxNxH, v_BxCxNxH


def encode_append(model: UserEncoder, cache: EncoderCache, new_batch: Mapping[str, Any],
                  num_new_B: Optional[jax.Array] = None) -> EncoderCache:
  """Appends up to K new items per row to ``cache``; returns the new cache.

  ``new_batch`` holds the new items under the usual batch names with T = K (``item_BxT`` and
  ``genre_BxTxG`` / ``rating_BxT`` / ``timegap_BxT`` for the enabled features); row b appends
  its first ``num_new_B[b]`` items (default: all K; the rest is padding and is ignored).  The
  caller keeps ``length_B + num_new_B <= capacity`` (slots past the capacity are dropped).
  Costs K positions per row: attention reads the cached keys/values.
  """
  cfg = model.cfg
  item_BxK = jnp.asarray(new_batch["item_BxT"])
  B, K = item_BxK.shape
  if num_new_B is None:
    num_new_B = jnp.full((B,), K, jnp.int32)
  num_new_B = jnp.asarray(num_new_B, jnp.int32)
  C = cache.capacity
  position_BxK = cache.length_B[:, None] + jnp.arange(K, dtype=jnp.int32)[None, :]
  valid_BxK = jnp.arange(K)[None, :] < num_new_B[:, None]
  feats = model._feature_embeddings(new_batch)  # pylint: disable=protected-access
  pos_BxKxD = None
  if cfg.position == "learned":
    pos_BxKxD = jnp.take(model.position_embedding[...],
                         jnp.clip(position_BxK, 0, cfg.max_len - 1), axis=0)

  def prepare(x):
    if pos_BxKxD is not None:
      x = x + pos_BxKxD
    x = model.input_norm(x)
    return jnp.where(valid_BxK[..., None], x, 0.0)

  def run_stack(stack: Stack, x, s):
    ks, vs = [], []
    for i, block in enumerate(stack.blocks):
      x, k_c, v_c = _block_append(block, x, position_BxK, valid_BxK,
                                  cache.k_SxLxBxCxNxH[s, i], cache.v_SxLxBxCxNxH[s, i])
      ks.append(k_c)
      vs.append(v_c)
    return stack.final_norm(x), ks, vs

  if cfg.fusion == "early":
    h_BxKxD, ks, vs = run_stack(model.stack, prepare(model._combine(feats)), 0)  # pylint: disable=protected-access
    all_k, all_v = [ks], [vs]
  else:
    outs, all_k, all_v = [], [], []
    for s, (stream, f) in enumerate(zip(model.streams, feats)):
      o, ks, vs = run_stack(stream, prepare(f), s)
      outs.append(o)
      all_k.append(ks)
      all_v.append(vs)
    h_BxKxD = model._combine(outs)  # pylint: disable=protected-access
  h_BxKxD = jnp.where(valid_BxK[..., None], h_BxKxD, 0.0).astype(jnp.float32)
  new_k = jnp.stack([jnp.stack(ks) for ks in all_k]) if cfg.num_layers else cache.k_SxLxBxCxNxH
  new_v = jnp.stack([jnp.stack(vs) for vs in all_v]) if cfg.num_layers else cache.v_SxLxBxCxNxH
  write_BxK = jnp.where(valid_BxK, position_BxK, C)
  h_BxCxD = cache.h_BxCxD.at[jnp.arange(B)[:, None], write_BxK].set(h_BxKxD, mode="drop")
  return EncoderCache(new_k, new_v, h_BxCxD,
                      jnp.minimum(cache.length_B + num_new_B, C).astype(jnp.int32))


def cache_user_vector(cache: EncoderCache, pooling: str = "last") -> jax.Array:
  """The pooled user vector ``[B, D]`` of the cached window (as :func:`pool` gives it)."""
  return pool(cache.h_BxCxD, cache.valid_BxC().astype(jnp.int32), pooling)
