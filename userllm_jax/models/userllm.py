"""User-LLM (arXiv 2402.13598): an LLM conditioned on user embeddings.

    history ─► UserEncoder ─► item_emb_BxTxE ─► [PerceiverResampler] ─► Projector ─► user tokens
                                                                                     │
    prompt tokens ─────────────────────────────► Gemma 3 ◄── 'xattn':  gated cross-attention
                                                                       after every k-th layer
                                                        ◄── 'soft_prompt': prefix embeddings

* The encoder reads the history (left-aligned, padded; padding is ``segment == 0`` or
  ``item == 0``) and gives one embedding per item.
* The optional Perceiver compresses the T item embeddings into N latents; without it the
  user tokens are the T item embeddings themselves (masked like the history).
  ``user_vector_token``: one more token, the encoder's output at the last valid position
  (its user vector, what it scores the next item with).
* The projector is a 2-layer MLP (``Dense -> GeLU-tanh -> Dense``) to the LLM width D.
* ``mode='xattn'``: the user tokens are the ``media`` of Flamingo-style gated cross-attention
  blocks (:class:`~userllm_jax.models.xattn.GatedCrossAttention`, tanh gates starting at 0)
  inserted after layers ``i`` with ``(i + 1) % xattn_every == 0``.  At initialisation the
  LLM computes exactly what the bare LLM computes.
  ``mode='soft_prompt'``: the user tokens are placed before the prompt tokens
  (``prefix_embeds``), unscaled; masked slots take no part in attention.
* A user with an empty history gets a mask of all False: cross-attention contributes exactly
  zero and the soft prompt is fully masked, i.e. the LLM sees only the prompt.

History batches use the encoder's keys (``item_BxT``, ``segment_BxT``, ``position_BxT``,
``genre_BxTxG``, ``rating_BxT``, ``timegap_BxT``), as :mod:`userllm_jax.data.tasks` spells
them from the example on.

Training strategies (:func:`trainable_filter`), as nnx filters for
``nnx.Optimizer(model, tx, wrt=filter)`` or ``nnx.state(model, filter)``:

==========  =====================================================================
'full'      every parameter
'enc'       encoder + perceiver + projector + cross-attention; the LLM is frozen
'lora'      'enc' + the LoRA factors of the LLM (:class:`~userllm_jax.models.lora.LoRAParam`)
'proj'      perceiver + projector + cross-attention; encoder and LLM are frozen
==========  =====================================================================
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from userllm_jax.models.common import param
from userllm_jax.models.encoder import EncoderConfig, UserEncoder, pool
from userllm_jax.models.gemma import Gemma3, GemmaConfig
from userllm_jax.models.lora import LoRAConfig, LoRAParam, apply_lora
from userllm_jax.models.perceiver import PerceiverConfig, PerceiverResampler
from userllm_jax.models.xattn import GatedCrossAttention

MODES = ("xattn", "soft_prompt")
STRATEGIES = ("full", "enc", "lora", "proj")


@dataclasses.dataclass(frozen=True)
class UserLLMConfig:
  """The bridge between the user encoder and the LLM (the ``userllm`` section of a config).

  Attributes:
    mode: 'xattn' (gated cross-attention) or 'soft_prompt' (prefix embeddings).
    strategy: which parameters train: 'full' | 'enc' | 'lora' | 'proj'.
    use_perceiver: compress the item embeddings to ``num_latents`` tokens.
    num_latents, perceiver_layers, perceiver_heads, perceiver_head_dim: Perceiver sizes.
    perceiver_mlp_dim: Perceiver MLP width; 0 -> 4 * perceiver width.
    perceiver_dim: latent width; 0 -> the encoder width.
    perceiver_self_attention: latent self-attention in every Perceiver layer.
    projector_hidden_dim: hidden width of the 2-layer projector; 0 -> the LLM width.
    user_vector_token: one more user token, after the Perceiver's (or the items'): the
      encoder's user vector, its output at the last valid position -- the vector it scores
      the next item with.  The per-item outputs carry no position the bridge could read, so
      without it the bridge cannot tell the most recent item's output from the others.
    xattn_every: cross-attention after layers i with (i + 1) % xattn_every == 0.
    xattn_layers: explicit layers to put cross-attention after (overrides ``xattn_every``;
      negative = from the end, -1 = after the last layer).  Late layers make training cheap:
      the frozen layers below the first block need no backward pass.
    xattn_num_heads, xattn_head_dim, xattn_mlp_dim: cross-attention block sizes;
      0 -> the LLM's num_heads / head_dim / mlp_dim.
    lora_rank, lora_alpha, lora_targets: LoRA on the LLM (strategy 'lora' only).
    dtype: compute dtype of the perceiver and projector.
  """
  mode: str = "xattn"
  strategy: str = "enc"
  use_perceiver: bool = True
  num_latents: int = 16
  perceiver_layers: int = 2
  perceiver_heads: int = 4
  perceiver_head_dim: int = 32
  perceiver_mlp_dim: int = 0
  perceiver_dim: int = 0
  perceiver_self_attention: bool = True
  projector_hidden_dim: int = 0
  user_vector_token: bool = False
  xattn_every: int = 1
  xattn_layers: tuple[int, ...] = ()
  xattn_num_heads: int = 0
  xattn_head_dim: int = 0
  xattn_mlp_dim: int = 0
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
  dtype: str = "float32"

  def __post_init__(self):
    def bad(field, expected, got):
      raise ValueError(f"UserLLMConfig.{field}: expected {expected}, got {got!r}")
    if self.mode not in MODES:
      bad("mode", " | ".join(map(repr, MODES)), self.mode)
    if self.strategy not in STRATEGIES:
      bad("strategy", " | ".join(map(repr, STRATEGIES)), self.strategy)
    for name in ("num_latents", "perceiver_layers", "perceiver_heads", "perceiver_head_dim",
                 "xattn_every", "lora_rank"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        bad(name, "a positive int", v)
    for name in ("perceiver_mlp_dim", "perceiver_dim", "projector_hidden_dim",
                 "xattn_num_heads", "xattn_head_dim", "xattn_mlp_dim"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 0:
        bad(name, "an int >= 0 (0 = default)", v)
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    object.__setattr__(self, "xattn_layers", tuple(int(i) for i in self.xattn_layers))
    jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], **overrides) -> "UserLLMConfig":
    """From a ConfigDict / dict (e.g. ``config.userllm``); unknown keys raise."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    d.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"UserLLMConfig: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**d)

  def replace(self, **kw) -> "UserLLMConfig":
    return dataclasses.replace(self, **kw)

  def perceiver_config(self, input_dim: int) -> PerceiverConfig:
    width = self.perceiver_dim or input_dim
    return PerceiverConfig(
        input_dim=input_dim, latent_dim=width, num_latents=self.num_latents,
        num_layers=self.perceiver_layers, num_heads=self.perceiver_heads,
        head_dim=self.perceiver_head_dim, mlp_dim=self.perceiver_mlp_dim or 4 * width,
        self_attention=self.perceiver_self_attention, dtype=self.dtype)

  def cross_attention_layers(self, num_layers: int) -> tuple[int, ...]:
    if self.mode != "xattn":
      return ()
    if self.xattn_layers:
      layers = sorted({i % num_layers if -num_layers <= i < num_layers else -1
                       for i in self.xattn_layers})
      if layers[0] < 0:
        raise ValueError(f"UserLLMConfig.xattn_layers: {self.xattn_layers} outside the LLM's "
                         f"{num_layers} layers")
      return tuple(layers)
    return tuple(i for i in range(num_layers) if (i + 1) % self.xattn_every == 0)

  def lora_config(self) -> Optional[LoRAConfig]:
    if self.strategy != "lora":
      return None
    return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets)


class Projector(nnx.Module):
  """2-layer MLP from the user-token width to the LLM width: ``W2 gelu(W1 x + b1) + b2``."""

  def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.dtype = jnp.dtype(dtype)
    init = jax.nn.initializers.lecun_normal()
    self.w1 = param(rngs, init, (in_dim, hidden_dim), (None, "mlp"))
    self.b1 = nnx.Param(jnp.zeros((hidden_dim,)), logical_axes=("mlp",))
    self.w2 = param(rngs, init, (hidden_dim, out_dim), ("mlp", "embed"))
    self.b2 = nnx.Param(jnp.zeros((out_dim,)), logical_axes=("embed",))

  def __call__(self, x_BxNxE: jax.Array) -> jax.Array:
    dt = self.dtype
    h = x_BxNxE.astype(dt) @ self.w1[...].astype(dt) + self.b1[...].astype(dt)
    h = jax.nn.gelu(h, approximate=True)
    return h @ self.w2[...].astype(dt) + self.b2[...].astype(dt)


def history_inputs(history_batch: Mapping[str, Any]) -> tuple[dict[str, Any], jax.Array]:
  """``(encoder_batch, valid_BxT)`` from a history batch (the encoder's keys).

  Raises KeyError naming the keys present when ``item_BxT`` is missing.
  """
  if "item_BxT" not in history_batch:
    raise KeyError(f"UserLLM: history batch needs 'item_BxT' (and the encoder's other "
                   f"history keys); got keys {sorted(history_batch)}")
  batch = dict(history_batch)
  item_BxT = jnp.asarray(batch["item_BxT"])
  if item_BxT.ndim != 2:
    raise ValueError(f"UserLLM: history item ids must be [B, T], got shape {item_BxT.shape}")
  if "segment_BxT" in batch:
    valid_BxT = jnp.asarray(batch["segment_BxT"]) != 0
  else:
    valid_BxT = item_BxT != 0
  return batch, valid_BxT


def user_tokens_from_encoded(perceiver: Optional[PerceiverResampler], projector: Projector,
                             item_emb_BxTxE: jax.Array, valid_BxT: jax.Array, *,
                             dtype=jnp.float32, user_vector: bool = False
                             ) -> tuple[jax.Array, jax.Array]:
  """Perceiver (if any) + projector on per-item encoder outputs: ``(user_BxNxD, mask_BxN)``;
  ``user_vector``: + the output at the last valid position as a last token
  (``UserLLMConfig.user_vector_token``).

  The one implementation behind :meth:`UserLLM.user_tokens_from_encoded`; a function of the
  two modules so that a caller can jit it over their state alone (the serving engine).
  """
  if perceiver is not None:
    tokens_BxNxE = perceiver(item_emb_BxTxE, valid_BxT)
    any_B = jnp.any(valid_BxT, axis=1)
    mask_BxN = jnp.broadcast_to(any_B[:, None], tokens_BxNxE.shape[:2])
  else:
    tokens_BxNxE, mask_BxN = item_emb_BxTxE, valid_BxT
  if user_vector:
    last_BxE = pool(item_emb_BxTxE, valid_BxT.astype(jnp.int32), "last")
    if last_BxE.shape[-1] != tokens_BxNxE.shape[-1]:
      raise ValueError(f"UserLLMConfig.user_vector_token: the encoder width "
                       f"{last_BxE.shape[-1]} differs from the Perceiver's "
                       f"{tokens_BxNxE.shape[-1]} (set perceiver_dim=0)")
    tokens_BxNxE = jnp.concatenate([tokens_BxNxE, last_BxE[:, None].astype(tokens_BxNxE.dtype)], 1)
    mask_BxN = jnp.concatenate([mask_BxN, jnp.any(valid_BxT, axis=1)[:, None]], 1)
  user_BxNxD = projector(tokens_BxNxE)
  user_BxNxD = jnp.where(mask_BxN[..., None], user_BxNxD, 0.0)
  return user_BxNxD.astype(dtype), mask_BxN


class UserLLM(nnx.Module):
  """encoder -> [perceiver] -> projector -> Gemma ('xattn' or 'soft_prompt').

  Build it with :func:`build_userllm` (which inserts the cross-attention blocks and LoRA into
  the Gemma it is given); the constructor only wires existing modules together.
  """

  def __init__(self, encoder: UserEncoder, perceiver: Optional[PerceiverResampler],
               projector: Projector, gemma: Gemma3, *, mode: str = "xattn",
               cfg: Optional[UserLLMConfig] = None):
    if mode not in MODES:
      raise ValueError(f"UserLLM: mode must be one of {MODES}, got {mode!r}")
    if mode == "xattn" and not gemma.cfg.cross_attention_layers:
      raise ValueError("UserLLM: mode='xattn' needs a Gemma with cross_attention_layers "
                       "(use build_userllm, or GemmaConfig(cross_attention_layers=...))")
    self.cfg = cfg or UserLLMConfig(mode=mode)
    self.mode = mode
    self.encoder = encoder
    self.perceiver = perceiver
    self.projector = projector
    self.gemma = gemma

  def embed_users(self, history_batch: Mapping[str, Any], *, deterministic: bool = True,
                  rng: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """``(user_tokens_BxNxD, mask_BxN)`` at the LLM width D.

    N = num_latents with the Perceiver (mask: True iff the user has any valid item),
    else N = T (mask: the history mask); + 1 with ``user_vector_token`` (mask: True iff the
    user has any valid item).
    """
    batch, valid_BxT = history_inputs(history_batch)
    item_emb_BxTxE, _ = self.encoder(batch, deterministic=deterministic, rng=rng)
    return self.user_tokens_from_encoded(item_emb_BxTxE, valid_BxT)

  def user_tokens_from_encoded(self, item_emb_BxTxE: jax.Array, valid_BxT: jax.Array
                               ) -> tuple[jax.Array, jax.Array]:
    """:meth:`embed_users` after the encoder: ``(user_tokens_BxNxD, mask_BxN)`` from the
    encoder's per-item outputs (serving runs it on cached outputs)."""
    return user_tokens_from_encoded(self.perceiver, self.projector, item_emb_BxTxE, valid_BxT,
                                    dtype=self.gemma.dtype,
                                    user_vector=self.cfg.user_vector_token)

  def llm_inputs(self, history_batch: Mapping[str, Any], *, deterministic: bool = True,
                 rng: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """The Gemma keyword arguments that carry the users: ``media_BxMxD``/``media_mask_BxM``
    ('xattn') or ``prefix_embeds_BxPxD``/``prefix_mask_BxP`` ('soft_prompt').

    For generation with a KV cache: pass the media on every step; pass the prefix only with
    the prefill chunk (it is then in the cache).
    """
    user_BxNxD, mask_BxN = self.embed_users(history_batch, deterministic=deterministic, rng=rng)
    if self.mode == "xattn":
      return {"media_BxMxD": user_BxNxD, "media_mask_BxM": mask_BxN}
    return {"prefix_embeds_BxPxD": user_BxNxD, "prefix_mask_BxP": mask_BxN}

  def __call__(self, history_batch: Mapping[str, Any], tokens_BxL: jax.Array,
               input_mask_BxL: Optional[jax.Array] = None, *,
               positions_BxL: Optional[jax.Array] = None,
               logits_positions: Optional[jax.Array] = None, return_hidden: bool = False,
               deterministic: bool = True, rng: Optional[jax.Array] = None,
               cache=None):
    """Logits ``[B, L, V]`` over the prompt tokens (or ``[B, N, V]`` at ``logits_positions``).

    ``cache`` (from ``self.gemma.init_cache``) makes it a prefill: returns ``(out, cache)``.
    """
    kw = self.llm_inputs(history_batch, deterministic=deterministic, rng=rng)
    return self.gemma(tokens_BxL, positions_BxL=positions_BxL, input_mask_BxL=input_mask_BxL,
                      logits_positions=logits_positions, return_hidden=return_hidden,
                      cache=cache, **kw)


  def generate(self, history_batch: Mapping[str, Any], prompts, *, eos_id: int = 1,
               pad_id: int = 0, **kw):
    """:meth:`models.sampler.Sampler.generate` on the LLM, conditioned on the users.

    ``prompts``: token-id lists (``[BOS] + prompt``) or ``(tokens_BxL, mask_BxL)``, one per
    history row; ``kw``: ``max_new_tokens``, ``temperature``, ``logits_processor`` ...
    """
    from userllm_jax.models.sampler import Sampler  # pylint: disable=g-import-not-at-top
    return Sampler(self.gemma, eos_id=eos_id, pad_id=pad_id).generate(
        prompts, **self.llm_inputs(history_batch), **kw)

  def beam_search(self, history_batch: Mapping[str, Any], prompts, *, eos_id: int = 1,
                  pad_id: int = 0, **kw):
    """:meth:`models.sampler.Sampler.beam_search` conditioned on the users."""
    from userllm_jax.models.sampler import Sampler  # pylint: disable=g-import-not-at-top
    return Sampler(self.gemma, eos_id=eos_id, pad_id=pad_id).beam_search(
        prompts, **self.llm_inputs(history_batch), **kw)


# ---------------------------------------------------------------------------------------------
# Building.


def add_cross_attention(gemma: Gemma3, layers: tuple[int, ...], *, rngs: nnx.Rngs,
                        num_heads: int = 0, head_dim: int = 0, mlp_dim: int = 0) -> Gemma3:
  """Inserts fresh gated cross-attention blocks (gates 0) after ``layers`` of ``gemma``, in place.

  Built exactly as :class:`Gemma3` builds them from ``cfg.cross_attention_layers``; the
  pretrained weights are untouched.  ``gemma.cfg`` is updated accordingly.
  """
  cfg = gemma.cfg
  if cfg.cross_attention_layers:
    if tuple(cfg.cross_attention_layers) != tuple(layers):
      raise ValueError(f"add_cross_attention: gemma already has cross-attention after "
                       f"{cfg.cross_attention_layers}, asked for {layers}")
    return gemma
  new_cfg = cfg.replace(cross_attention_layers=tuple(layers),
                        xattn_num_heads=num_heads or cfg.xattn_num_heads,
                        xattn_head_dim=head_dim or cfg.xattn_head_dim,
                        xattn_mlp_dim=mlp_dim or cfg.xattn_mlp_dim)
  for i in new_cfg.cross_attention_layers:
    gemma.xattn[str(i)] = GatedCrossAttention(
        embed_dim=new_cfg.embed_dim, media_dim=new_cfg.embed_dim,
        num_heads=new_cfg.xattn_num_heads or new_cfg.num_heads,
        head_dim=new_cfg.xattn_head_dim or new_cfg.head_dim,
        mlp_dim=new_cfg.xattn_mlp_dim or new_cfg.mlp_dim, rngs=rngs,
        dtype=jnp.dtype(new_cfg.dtype), param_dtype=jnp.dtype(new_cfg.param_dtype))
  gemma.cfg = new_cfg
  return gemma


def build_userllm(cfg: UserLLMConfig, *, encoder: UserEncoder, gemma: Gemma3,
                  rngs: nnx.Rngs) -> UserLLM:
  """A UserLLM around a (pretrained) encoder and a (pretrained) Gemma.

  ``gemma`` is modified in place: cross-attention blocks are added for ``mode='xattn'`` and
  LoRA factors for ``strategy='lora'`` (both start as the identity, so at initialisation the
  LLM part computes exactly what the pretrained Gemma computes).  The Perceiver and the
  projector are freshly initialised from ``rngs``.
  """
  enc_dim = encoder.cfg.embed_dim
  perceiver = None
  width = enc_dim
  if cfg.use_perceiver:
    pcfg = cfg.perceiver_config(enc_dim)
    perceiver = PerceiverResampler(pcfg, rngs=rngs)
    width = pcfg.width
  D = gemma.cfg.embed_dim
  projector = Projector(width, cfg.projector_hidden_dim or D, D, rngs=rngs, dtype=cfg.dtype)
  if cfg.mode == "xattn":
    add_cross_attention(gemma, cfg.cross_attention_layers(gemma.cfg.num_layers), rngs=rngs,
                        num_heads=cfg.xattn_num_heads, head_dim=cfg.xattn_head_dim,
                        mlp_dim=cfg.xattn_mlp_dim)
  lcfg = cfg.lora_config()
  if lcfg is not None and gemma.cfg.lora is None:
    apply_lora(gemma, lcfg, rngs=rngs)
    gemma.cfg = gemma.cfg.replace(lora=lcfg)
  return UserLLM(encoder, perceiver, projector, gemma, mode=cfg.mode, cfg=cfg)


def init_userllm(cfg: UserLLMConfig, encoder_cfg: EncoderConfig, gemma_cfg: GemmaConfig, *,
                 rngs: nnx.Rngs) -> UserLLM:
  """A randomly initialised UserLLM from configs alone (tests; ``nnx.eval_shape`` for FLOPs)."""
  encoder = UserEncoder(encoder_cfg, rngs=rngs)
  gemma = Gemma3(gemma_cfg, rngs=rngs)
  return build_userllm(cfg, encoder=encoder, gemma=gemma, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# Training strategies.


@dataclasses.dataclass(frozen=True)
class _Under:
  """nnx filter: the variable's path starts with one of ``prefixes`` (tuples of keys)."""
  prefixes: tuple[tuple[str, ...], ...]

  def __call__(self, path, x) -> bool:
    keys = tuple(str(getattr(p, "key", p)) for p in path)
    return any(keys[:len(pre)] == pre for pre in self.prefixes)


_BRIDGE = (("perceiver",), ("projector",), ("gemma", "xattn"))


def trainable_filter(strategy: str):
  """The nnx filter of the parameters that train under ``strategy`` (see the module doc)."""
  if strategy == "full":
    return nnx.Param
  if strategy == "enc":
    return nnx.All(nnx.Param, _Under((("encoder",),) + _BRIDGE))
  if strategy == "lora":
    return nnx.All(nnx.Param, nnx.Any(_Under((("encoder",),) + _BRIDGE), LoRAParam))
  if strategy == "proj":
    return nnx.All(nnx.Param, _Under(_BRIDGE))
  raise ValueError(f"trainable_filter: strategy must be one of {STRATEGIES}, got {strategy!r}")


# ---------------------------------------------------------------------------------------------
# Restoring a pretrained encoder.


def _key_str(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def load_encoder_from_checkpoint(ckpt_dir: str, encoder_cfg: EncoderConfig, *,
                                 step: Optional[int] = None) -> UserEncoder:
  """A :class:`UserEncoder` with the parameters of a stage-1 checkpoint.

  ``ckpt_dir`` is a :class:`userllm_jax.train.checkpoint.Checkpointer` directory (the latest
  step unless ``step``), or one step directory of it.  The saved train state's layout is not
  assumed: the encoder's parameter tree is located inside the saved ``state`` item as the
  (unique) sub-tree whose leaves have exactly the encoder's parameter paths and shapes.
  Raises FileNotFoundError / ValueError naming the directory and the mismatch.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"load_encoder_from_checkpoint: no directory {ckpt_dir}")
  if os.path.isdir(os.path.join(ckpt_dir, "state")):
    state_dir = os.path.join(ckpt_dir, "state")
  else:
    steps = sorted(int(d) for d in os.listdir(ckpt_dir)
                   if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d, "state")))
    if not steps:
      raise FileNotFoundError(f"load_encoder_from_checkpoint: {ckpt_dir} holds no checkpoint "
                              "step (expected <step>/state/ written by train/checkpoint.py)")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"load_encoder_from_checkpoint: step {step} not in {ckpt_dir}; "
                              f"steps: {steps}")
    state_dir = os.path.join(ckpt_dir, str(step), "state")

  encoder = UserEncoder(encoder_cfg, rngs=nnx.Rngs(0))
  params = nnx.state(encoder, nnx.Param)
  want = _flat(nnx.to_pure_dict(params))

  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(state_dir)
  meta_tree = getattr(meta, "item_metadata", None)
  meta_tree = meta if meta_tree is None else meta_tree
  meta_tree = getattr(meta_tree, "tree", meta_tree)
  flat_meta = _flat(meta_tree)
  # Candidate prefixes: every prefix of a saved path that ends right before an encoder path.
  some_want = next(iter(want))
  n = len(some_want)
  prefixes = {p[:len(p) - n] for p in flat_meta if len(p) >= n and p[len(p) - n:] == some_want}
  matches = [pre for pre in sorted(prefixes)
             if all(pre + k in flat_meta and tuple(flat_meta[pre + k].shape) == tuple(v.shape)
                    for k, v in want.items())]
  if not matches:
    raise ValueError(
        f"load_encoder_from_checkpoint: {state_dir} holds no sub-tree matching the encoder "
        f"config (looked for {len(want)} parameters such as {'/'.join(some_want)} "
        f"{tuple(want[some_want].shape)}); is encoder_cfg the one the checkpoint was trained "
        "with?")
  if len(matches) > 1:
    # e.g. the parameters and Adam's moments: prefer a path that is not optimizer state.
    named = [m for m in matches
             if not any(w in ("mu", "nu", "opt_state", "optimizer", "opt") for w in m)]
    matches = named or matches
  pre = matches[0]
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), meta_tree)
  restored = _flat(ckptr.restore(state_dir, target))
  pure = nnx.to_pure_dict(params)
  for k, v in want.items():
    node = pure
    for key in k[:-1]:
      node = node[key if key in node else int(key)]
    last = k[-1] if k[-1] in node else int(k[-1])
    node[last] = jnp.asarray(restored[pre + k], dtype=v.dtype)
  nnx.replace_by_pure_dict(params, pure)
  nnx.update(encoder, params)
  return encoder


def _flat(tree) -> dict[tuple[str, ...], Any]:
  """{path of key strings (a trailing 'value' of nnx Variables dropped): leaf}."""
  out = {}
  for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(_key_str(k) for k in p)
    if keys and keys[-1] == "value":
      keys = keys[:-1]
    out[keys] = v
  return out
