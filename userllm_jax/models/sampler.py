"""Generation for :class:`~userllm_jax.models.gemma.Gemma3`: greedy, sampling, beam search.

Everything runs inside one ``jax.jit`` per (shapes, settings): a prefill of the whole prompt
(soft prompt + tokens) into a fixed-length KV cache, then a ``lax.while_loop`` of one-token
decode steps that stops early once every sequence (or beam set) is finished.

Padding: prompts are **left-padded** (``pad_prompts``; arrays with any other padding are
re-aligned to the left).  Padded slots are masked out of attention and do not advance RoPE
positions, so every example of a padded batch produces the tokens it produces alone.
Prompts must hold at least one token (normally BOS).

Stop tokens: ``eos_id`` plus ``stop_tokens``.  A finished sequence keeps its stop token and
is followed by ``pad_id``; ``lengths`` count generated tokens including the stop token.

Logits processor: ``logits_processor(tokens_so_far_BxN, logits_BxV)`` is called inside the jit
before every token choice.  ``tokens_so_far_BxN`` (int32) holds the tokens generated so far by
each row (for beam search: each live beam, rows ``b * K + k``), ``-1`` where nothing was
generated yet; ``N = max_new_tokens``.  It returns new float logits, or a boolean mask of
allowed tokens (disallowed ones get ``-inf``).  It must be traceable by JAX (e.g. a trie
stored as dense transition arrays) and hashable (a plain function is).

Beam search keeps ``K`` live beams and a pool of ``K`` finished hypotheses (T5X style): each
step the ``2K`` best extensions of live beams are split into finished ones (ending in a stop
token) and the best ``K`` unfinished ones.  Scores are summed log-probabilities; with
``length_penalty=a`` the ranking score is ``sum_logprob / length ** a`` (``a = 0``: none).
At ``max_new_tokens`` live beams join the finished pool.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LogitsProcessor = Callable[[jax.Array, jax.Array], jax.Array]
Prompts = Union[Sequence[Sequence[int]], tuple[np.ndarray, np.ndarray]]
_NEG = -1e30  # "minus infinity" that survives arithmetic without NaNs


@dataclasses.dataclass
class GenerateOutput:
  tokens_BxN: np.ndarray     # generated tokens (pad_id after a stop token / unused steps)
  lengths_B: np.ndarray      # generated tokens including the stop token
  logprobs_BxN: np.ndarray   # log p(token) under the (processed, untempered) model; 0 at pad
  finished_B: np.ndarray     # True where a stop token was produced


@dataclasses.dataclass
class BeamOutput:
  tokens_BxKxN: np.ndarray   # best first
  scores_BxK: np.ndarray     # ranking score (length-normalised if length_penalty > 0)
  logprobs_BxK: np.ndarray   # summed log-probability of each sequence
  lengths_BxK: np.ndarray
  finished_BxK: np.ndarray   # ended with a stop token (False: hit max_new_tokens)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0,
                length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to ``[B, L]``; returns ``(tokens_BxL, mask_BxL)``."""
  if not len(prompts):
    raise ValueError("pad_prompts: no prompts")
  lens = [len(p) for p in prompts]
  if min(lens) == 0:
    raise ValueError(f"pad_prompts: prompt {lens.index(0)} is empty (add BOS)")
  L = max(lens) if length is None else length
  if max(lens) > L:
    raise ValueError(f"pad_prompts: a prompt has {max(lens)} tokens > length {L}")
  tokens = np.full((len(prompts), L), pad_id, np.int32)
  mask = np.zeros((len(prompts), L), bool)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, L - len(p):] = np.asarray(p, np.int32)
      mask[i, L - len(p):] = True
  return tokens, mask


def _left_align(tokens_BxL: np.ndarray, mask_BxL: np.ndarray, pad_id: int):
  tokens_BxL = np.asarray(tokens_BxL)
  mask_BxL = np.asarray(mask_BxL).astype(bool)
  if tokens_BxL.shape != mask_BxL.shape or tokens_BxL.ndim != 2:
    raise ValueError(f"prompts: tokens {tokens_BxL.shape} and mask {mask_BxL.shape} must be "
                     "equal [B, L] shapes")
  return pad_prompts([row[m] for row, m in zip(tokens_BxL, mask_BxL)], pad_id,
                     tokens_BxL.shape[1])


def _apply_processor(processor, tokens_so_far, logits):
  if processor is None:
    return logits
  out = processor(tokens_so_far, logits)
  if out.shape != logits.shape:
    raise ValueError(f"logits_processor returned shape {out.shape}, expected {logits.shape}")
  if out.dtype == jnp.bool_:
    return jnp.where(out, logits, _NEG)
  return out.astype(jnp.float32)


def _select(logits_BxV, key, sample: bool, use_top_k: bool, use_top_p: bool, temperature,
            top_k, top_p):
  """Greedy (``sample=False``), else temperature / top-k / top-p sampling.

  The flags are static (they change the program); the values are traced, so changing the
  temperature or k does not recompile.  Ties at the top-k / top-p threshold are kept.
  """
  if not sample:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV / temperature
  if use_top_k or use_top_p:
    sorted_desc = -jnp.sort(-logits, axis=-1)
  if use_top_k:
    kth = jax.lax.dynamic_index_in_dim(sorted_desc, top_k - 1, axis=1, keepdims=True)
    logits = jnp.where(logits < kth, _NEG, logits)
    sorted_desc = jnp.where(sorted_desc < kth, _NEG, sorted_desc)
  if use_top_p:
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs   # mass strictly above each token
    keep = before < top_p                          # the first token is always kept
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, _NEG, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _prefill(model, tokens, mask, prefix, pmask, media, mmask, max_new):
  B, L = tokens.shape
  P = 0 if prefix is None else prefix.shape[1]
  cache = model.init_cache(B, P + L + max_new)
  logits, cache = model(tokens, input_mask_BxL=mask, prefix_embeds_BxPxD=prefix,
                        prefix_mask_BxP=pmask, media_BxMxD=media, media_mask_BxM=mmask,
                        cache=cache, logits_positions=jnp.full((B, 1), L - 1, jnp.int32))
  return logits[:, 0].astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new", "sample", "use_top_k", "use_top_p", "stop_ids", "pad_id",
    "processor"))
def _generate_jit(graphdef, state, tokens, mask, prefix, pmask, media, mmask, rng, temperature,
                  top_k, top_p, *, max_new, sample, use_top_k, use_top_p, stop_ids, pad_id,
                  processor):
  model = nnx.merge(graphdef, state)
  B = tokens.shape[0]
  logits, cache = _prefill(model, tokens, mask, prefix, pmask, media, mmask, max_new)
  stops = jnp.asarray(stop_ids, jnp.int32)

  def cond(c):
    step, _, _, _, _, done = c
    return (step < max_new) & ~jnp.all(done)

  def body(c):
    step, cache, logits, out, logp_out, done = c
    logits = _apply_processor(processor, out, logits)
    tok = _select(logits, jax.random.fold_in(rng, step), sample, use_top_k, use_top_p,
                  temperature, top_k, top_p)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok[:, None], 1)[:, 0]
    chosen = jnp.take_along_axis(logits, tok[:, None], 1)[:, 0]
    lp = jnp.where(chosen <= _NEG / 2, _NEG, lp)   # the processor allowed nothing
    tok = jnp.where(done, pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    out = out.at[:, step].set(tok)
    logp_out = logp_out.at[:, step].set(lp)
    done = done | jnp.isin(tok, stops)
    new_logits, cache = model(tok[:, None], media_BxMxD=media, media_mask_BxM=mmask,
                              cache=cache)
    return step + 1, cache, new_logits[:, 0].astype(jnp.float32), out, logp_out, done

  init = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((B, max_new), -1, jnp.int32),
          jnp.zeros((B, max_new), jnp.float32), jnp.zeros((B,), bool))
  step, _, _, out, logp_out, done = jax.lax.while_loop(cond, body, init)
  generated = out >= 0
  is_stop = jnp.isin(out, stops) & generated
  # length: up to and including the first stop token, else the steps taken
  first_stop = jnp.argmax(is_stop, axis=1)
  lengths = jnp.where(done, first_stop + 1, step)
  keep = jnp.arange(max_new)[None] < lengths[:, None]
  out = jnp.where(keep, out, pad_id)
  return out, lengths, jnp.where(keep, logp_out, 0.0), done


def _gather_beams(tree, idx_BxK, K_src: int):
  """Reorders the batch (b * K_src + k) axis of every cache leaf by parent beam indices."""
  B, K = idx_BxK.shape
  flat = (jnp.arange(B)[:, None] * K_src + idx_BxK).reshape(-1)

  def g(x):
    if x.ndim == 0:
      return x
    return jnp.take(x, flat, axis=0)
  return jax.tree.map(g, tree)


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "num_beams", "max_new", "length_penalty", "stop_ids", "pad_id", "processor"))
def _beam_jit(graphdef, state, tokens, mask, prefix, pmask, media, mmask, *, num_beams,
              max_new, length_penalty, stop_ids, pad_id, processor):
  model = nnx.merge(graphdef, state)
  B, K, N = tokens.shape[0], num_beams, max_new
  logits, cache = _prefill(model, tokens, mask, prefix, pmask, media, mmask, max_new)
  rep = lambda x: None if x is None else jnp.repeat(x, K, axis=0)
  cache = jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, K, axis=0), cache)
  logits = jnp.repeat(logits, K, axis=0)
  media_k, mmask_k = rep(media), rep(mmask)
  stops = jnp.asarray(stop_ids, jnp.int32)

  def norm(raw, length):
    if length_penalty == 0.0:
      return raw
    return raw / jnp.maximum(length, 1).astype(jnp.float32) ** length_penalty

  def cond(c):
    step, _, _, _, alive_raw, _, fin_score, _, _ = c
    best_alive = norm(jnp.max(alive_raw, axis=1), jnp.full((B,), N))
    worst_fin = jnp.min(fin_score, axis=1)
    done = (worst_fin > _NEG / 2) & (best_alive <= worst_fin)
    return (step < N) & ~jnp.all(done)

  def body(c):
    step, cache, logits, alive_tok, alive_raw, fin_tok, fin_score, fin_raw, fin_len = c
    V = logits.shape[-1]
    logits = _apply_processor(processor, alive_tok.reshape(B * K, N), logits)
    logp = jax.nn.log_softmax(logits, axis=-1)
    # disallowed tokens (and rows where the processor allows nothing) are impossible, not
    # uniform: a fully masked row would otherwise get log(1/V) everywhere
    logp = jnp.where(logits <= _NEG / 2, _NEG, logp).reshape(B, K, V)
    cand = (alive_raw[:, :, None] + logp).reshape(B, K * V)
    vals, idx = jax.lax.top_k(cand, 2 * K)                      # [B, 2K]
    parent, tok = idx // V, (idx % V).astype(jnp.int32)
    cand_tok = jnp.take_along_axis(alive_tok, parent[:, :, None], axis=1)
    cand_tok = cand_tok.at[:, :, step].set(tok)
    is_stop = jnp.isin(tok, stops)
    # finished pool: old finished + new stop-terminated candidates, best K by score
    new_fin_raw = jnp.where(is_stop, vals, _NEG)
    new_fin_score = jnp.where(is_stop & (vals > _NEG / 2), norm(vals, step + 1), _NEG)
    all_score = jnp.concatenate([fin_score, new_fin_score], 1)
    all_tok = jnp.concatenate([fin_tok, cand_tok], 1)
    all_raw = jnp.concatenate([fin_raw, new_fin_raw], 1)
    all_len = jnp.concatenate([fin_len, jnp.full((B, 2 * K), step + 1, jnp.int32)], 1)
    fin_score, sel = jax.lax.top_k(all_score, K)
    fin_tok = jnp.take_along_axis(all_tok, sel[:, :, None], axis=1)
    fin_raw = jnp.take_along_axis(all_raw, sel, axis=1)
    fin_len = jnp.take_along_axis(all_len, sel, axis=1)
    # live beams: best K candidates that did not stop
    alive_vals = jnp.where(is_stop, _NEG, vals)
    alive_raw, asel = jax.lax.top_k(alive_vals, K)
    alive_tok = jnp.take_along_axis(cand_tok, asel[:, :, None], axis=1)
    alive_parent = jnp.take_along_axis(parent, asel, axis=1)
    last = jnp.take_along_axis(tok, asel, axis=1).reshape(B * K, 1)
    cache = _gather_beams(cache, alive_parent, K)
    new_logits, cache = model(last, media_BxMxD=media_k, media_mask_BxM=mmask_k, cache=cache)
    return (step + 1, cache, new_logits[:, 0].astype(jnp.float32), alive_tok, alive_raw,
            fin_tok, fin_score, fin_raw, fin_len)

  alive_raw = jnp.full((B, K), _NEG).at[:, 0].set(0.0)
  init = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((B, K, N), -1, jnp.int32),
          alive_raw, jnp.full((B, K, N), -1, jnp.int32), jnp.full((B, K), _NEG),
          jnp.full((B, K), _NEG), jnp.zeros((B, K), jnp.int32))
  (step, _, _, alive_tok, alive_raw, fin_tok, fin_score, fin_raw,
   fin_len) = jax.lax.while_loop(cond, body, init)
  # live beams (unfinished at the end) compete with the finished ones
  alive_score = jnp.where(alive_raw > _NEG / 2, norm(alive_raw, step), _NEG)
  all_score = jnp.concatenate([fin_score, alive_score], 1)
  all_tok = jnp.concatenate([fin_tok, alive_tok], 1)
  all_raw = jnp.concatenate([fin_raw, alive_raw], 1)
  all_len = jnp.concatenate([fin_len, jnp.full((B, K), step, jnp.int32)], 1)
  all_fin = jnp.concatenate([jnp.ones((B, K), bool), jnp.zeros((B, K), bool)], 1)
  score, sel = jax.lax.top_k(all_score, K)
  toks = jnp.take_along_axis(all_tok, sel[:, :, None], axis=1)
  lengths = jnp.take_along_axis(all_len, sel, axis=1)
  toks = jnp.where(jnp.arange(N)[None, None] < lengths[:, :, None], toks, pad_id)
  toks = jnp.where(toks < 0, pad_id, toks)
  return (toks, score, jnp.take_along_axis(all_raw, sel, axis=1), lengths,
          jnp.take_along_axis(all_fin, sel, axis=1))


class Sampler:
  """Generation for a Gemma3 model (see the module docstring for the conventions).

  Args:
    model: a :class:`~userllm_jax.models.gemma.Gemma3` (possibly sharded, possibly with LoRA
      or cross-attention blocks).  Its current weights are read at every call.
    eos_id / pad_id: tokenizer ids (Gemma: eos 1, pad 0).
  """

  def __init__(self, model: nnx.Module, *, eos_id: int = 1, pad_id: int = 0):
    self.model = model
    self.eos_id = int(eos_id)
    self.pad_id = int(pad_id)

  def _inputs(self, prompts: Prompts, prefix_embeds_BxPxD, prefix_mask_BxP, media_BxMxD,
              media_mask_BxM):
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
      tokens, mask = _left_align(prompts[0], prompts[1], self.pad_id)
    else:
      tokens, mask = pad_prompts(prompts, self.pad_id)
    B = tokens.shape[0]
    for name, x in (("prefix_embeds_BxPxD", prefix_embeds_BxPxD),
                    ("prefix_mask_BxP", prefix_mask_BxP), ("media_BxMxD", media_BxMxD),
                    ("media_mask_BxM", media_mask_BxM)):
      if x is not None and np.shape(x)[0] != B:
        raise ValueError(f"Sampler: {name} has batch {np.shape(x)[0]}, prompts have {B}")
    if prefix_embeds_BxPxD is not None and prefix_mask_BxP is None:
      prefix_mask_BxP = jnp.ones(np.shape(prefix_embeds_BxPxD)[:2], bool)
    if media_BxMxD is not None and media_mask_BxM is None:
      media_mask_BxM = jnp.ones(np.shape(media_BxMxD)[:2], bool)
    return (jnp.asarray(tokens), jnp.asarray(mask), prefix_embeds_BxPxD, prefix_mask_BxP,
            media_BxMxD, media_mask_BxM)

  def _stop_ids(self, stop_tokens: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({self.eos_id, *(int(t) for t in stop_tokens)}))

  def generate(self, prompts: Prompts, *, max_new_tokens: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, rng: Optional[jax.Array] = None,
               stop_tokens: Sequence[int] = (), prefix_embeds_BxPxD=None, prefix_mask_BxP=None,
               media_BxMxD=None, media_mask_BxM=None,
               logits_processor: Optional[LogitsProcessor] = None) -> GenerateOutput:
    """Greedy (``temperature=0``) or sampled generation.

    ``prompts``: a list of token-id lists, or ``(tokens_BxL, mask_BxL)`` arrays.
    Sampling (``temperature > 0``) needs an explicit ``rng`` key; ``top_k=0`` and
    ``top_p=1.0`` switch those filters off.
    """
    if max_new_tokens < 1:
      raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = self.model.cfg.vocab_size
    if temperature < 0 or not 0.0 < top_p <= 1.0 or not 0 <= top_k <= vocab:
      raise ValueError(f"generate: bad sampling settings temperature={temperature}, "
                       f"top_k={top_k}, top_p={top_p}")
    if temperature > 0 and rng is None:
      raise ValueError("generate: sampling (temperature > 0) needs an explicit rng key")
    if rng is None:
      rng = jax.random.key(0)
    args = self._inputs(prompts, prefix_embeds_BxPxD, prefix_mask_BxP, media_BxMxD,
                        media_mask_BxM)
    graphdef, state = nnx.split(self.model)
    out, lengths, logp, done = _generate_jit(
        graphdef, state, *args, rng, jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k),
        jnp.float32(top_p), max_new=int(max_new_tokens), sample=temperature > 0,
        use_top_k=top_k > 0, use_top_p=top_p < 1.0, stop_ids=self._stop_ids(stop_tokens), pad_id=self.pad_id, processor=logits_processor)
    return GenerateOutput(np.asarray(out), np.asarray(lengths), np.asarray(logp),
                          np.asarray(done))

  def beam_search(self, prompts: Prompts, *, num_beams: int, max_new_tokens: int,
                  length_penalty: float = 0.0, stop_tokens: Sequence[int] = (),
                  prefix_embeds_BxPxD=None, prefix_mask_BxP=None, media_BxMxD=None,
                  media_mask_BxM=None,
                  logits_processor: Optional[LogitsProcessor] = None) -> BeamOutput:
    """The ``num_beams`` best continuations per prompt, best first."""
    if num_beams < 1 or max_new_tokens < 1:
      raise ValueError(f"beam_search: num_beams={num_beams} and max_new_tokens="
                       f"{max_new_tokens} must be >= 1")
    args = self._inputs(prompts, prefix_embeds_BxPxD, prefix_mask_BxP, media_BxMxD,
                        media_mask_BxM)
    vocab = self.model.cfg.vocab_size
    if 2 * num_beams > vocab:
      raise ValueError(f"beam_search: 2 * num_beams = {2 * num_beams} > vocab {vocab}")
    graphdef, state = nnx.split(self.model)
    toks, score, raw, lengths, fin = _beam_jit(
        graphdef, state, *args, num_beams=int(num_beams), max_new=int(max_new_tokens),
        length_penalty=float(length_penalty), stop_ids=self._stop_ids(stop_tokens),
        pad_id=self.pad_id, processor=logits_processor)
    return BeamOutput(np.asarray(toks), np.asarray(score), np.asarray(raw),
                      np.asarray(lengths), np.asarray(fin))


def generate_text(model, tokenizer, texts: Sequence[str], *, max_new_tokens: int,
                  **kw) -> list[str]:
  """Encodes ``texts`` with BOS, generates (greedy unless ``temperature`` is given), decodes
  the generated part up to (excluding) the stop token."""
  sampler = Sampler(model, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  prompts = [tokenizer.encode(t, add_bos=True) for t in texts]
  out = sampler.generate(prompts, max_new_tokens=max_new_tokens, **kw)
  texts_out = []
  for row, n, fin in zip(out.tokens_BxN, out.lengths_B, out.finished_B):
    ids = [int(t) for t in row[:n - 1 if fin else n]]
    texts_out.append(tokenizer.decode(ids))
  return texts_out
