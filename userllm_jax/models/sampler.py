"""Generation for :class:`~userllm_jax.models.gemma.Gemma3`: greedy, sampling, beam search,
and exact scoring of a closed answer set.

Two jitted calls per decode: a prefill of the whole prompt (soft prompt + tokens) into a
fixed-length KV cache, timed on its own (``output.timing.prefill_s``: time to the first
token's logits, after ``block_until_ready``), then a ``lax.while_loop`` of one-token decode
steps that stops early once every sequence (or beam set) is finished
(``output.timing.total_s``: end to end).  The first call per shape includes compilation.

Compile once per shape: prompts are left-padded to a multiple of ``Sampler(prompt_bucket=)``
tokens (default 16), so prompt lengths in the same bucket share one compiled program per
(batch, bucket, beams, max_new_tokens, settings).  :data:`TRACE_COUNTS` counts the traces
(= compilations) of each jitted function.

Padding: prompts are **left-padded** (``pad_prompts``; arrays with any other padding are
re-aligned to the left).  Padded slots are masked out of attention and do not advance RoPE
positions, so every example of a padded batch produces the tokens it produces alone.
Prompts must hold at least one token (normally BOS).

Stop tokens: ``eos_id`` plus ``stop_tokens``.  A finished sequence keeps its stop token and
is followed by ``pad_id``; ``lengths`` count generated tokens including the stop token.

Constraints, two ways:

* ``trie=``: a :class:`~userllm_jax.eval.trie.TrieConstraint` (duck-typed here: models do not
  import eval).  Each row carries its trie node; with ``restrict_vocab=True`` (default) the
  logits are computed only against the ``K`` tokens the trie can ever allow
  (``Gemma3(..., logits_vocab_ids=trie.vocab_ids)``), masked inside that small vocabulary,
  and the chosen local index is mapped back to the real token id.  ``restrict_vocab=False``
  is the full-vocabulary reference (``V`` logits, then the same mask).  Both give the same
  tokens and, up to float32 rounding, the same scores.
* ``logits_processor(tokens_so_far_BxN, logits_BxV)``: called inside the jit before every
  token choice over the full vocabulary.  ``tokens_so_far_BxN`` (int32) holds the tokens
  generated so far by each row (for beam search: each live beam, rows ``b * K + k``), ``-1``
  where nothing was generated yet; ``N = max_new_tokens``.  It returns new float logits, or a
  boolean mask of allowed tokens.  It must be traceable by JAX and hashable (a plain
  function is).

Constrained scores are "mask, then log-softmax over the allowed tokens": disallowed tokens
get ``-1e30`` before the log-softmax, so each step's probabilities are renormalised over
what the constraint allows.  This is why the restricted and the full-vocabulary versions
compute the same quantity.

Beam search keeps ``K`` live beams and a pool of ``K`` finished hypotheses (T5X style): each
step the ``2K`` best extensions of live beams are split into finished ones (ending in a stop
token) and the best ``K`` unfinished ones.  Scores are summed log-probabilities; with
``length_penalty=a`` the ranking score is ``sum_logprob / length ** a`` (``a = 0``: none).
At ``max_new_tokens`` live beams join the finished pool.  With a ``trie=`` (and
``finish_forced=True``, the default) an extension that reaches a *forced* trie node -- one
path left down to EOS, e.g. a title after the tokens that tell it from every other title --
joins the finished pool at once, its path written out and its score final (each later token
is the only one allowed: log-probability exactly 0).  Its live slot goes to the next-best
extension, and the loop ends as soon as no live beam can still win, typically a few steps
after the decisive tokens instead of at the longest title's EOS.

:func:`score_candidates` / :meth:`Sampler.score_candidates`: the log-probability of every
sequence of a fixed candidate list (e.g. genre names + EOS) for every prompt, from one
prefill and one batched teacher-forced forward over ``B * C`` rows.

Multi-host: ``Sampler(place_inputs=)`` turns each host array of the batch (prompt tokens and
mask) into the device array the model runs on -- for a model sharded over a mesh that
spans processes, a global array whose batch rows are split over the data-parallel devices
(``train/mesh.host_to_global``); every process passes the same batch.  Outputs come back as
numpy on every process (gathered across hosts where a result is spread over them).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LogitsProcessor = Callable[[jax.Array, jax.Array], jax.Array]
Prompts = Union[Sequence[Sequence[int]], tuple[np.ndarray, np.ndarray]]
_NEG = -1e30  # "minus infinity" that survives arithmetic without NaNs
DEFAULT_PROMPT_BUCKET = 16

# Traces (= compilations) per jitted function name; incremented while tracing.
TRACE_COUNTS: collections.Counter = collections.Counter()


def _host(x) -> np.ndarray:
  """``x`` as numpy on this process; an array spread over other processes' devices is
  gathered (every process gets the whole of it)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


@dataclasses.dataclass
class Timing:
  """Wall-clock seconds of one call, each phase ended by ``block_until_ready``.

  ``prefill_s``: host inputs to the first token's logits (time to first token);
  ``total_s``: the whole call, until the outputs are on the host.  The first call for a
  shape includes compilation.
  """
  prefill_s: float
  total_s: float


@dataclasses.dataclass
class GenerateOutput:
  tokens_BxN: np.ndarray     # generated tokens (pad_id after a stop token / unused steps)
  lengths_B: np.ndarray      # generated tokens including the stop token
  logprobs_BxN: np.ndarray   # log p(token) under the (processed, untempered) model; 0 at pad
  finished_B: np.ndarray     # True where a stop token was produced
  timing: Optional[Timing] = None


@dataclasses.dataclass
class BeamOutput:
  tokens_BxKxN: np.ndarray   # best first
  scores_BxK: np.ndarray     # ranking score (length-normalised if length_penalty > 0)
  logprobs_BxK: np.ndarray   # summed log-probability of each sequence
  lengths_BxK: np.ndarray
  finished_BxK: np.ndarray   # ended with a stop token (False: hit max_new_tokens)
  timing: Optional[Timing] = None
  steps: Optional[int] = None   # decode-loop iterations run (each one forward at most)


@dataclasses.dataclass
class ScoreOutput:
  logprobs_BxC: np.ndarray   # summed log-probability of each candidate (see score_candidates)
  timing: Optional[Timing] = None


def bucket_length(n: int, bucket: Optional[int]) -> int:
  """``n`` rounded up to a multiple of ``bucket`` (``bucket`` 0 / None: ``n``)."""
  if not bucket:
    return int(n)
  if bucket < 0:
    raise ValueError(f"bucket_length: bucket must be >= 0, got {bucket}")
  return int(-(-n // bucket) * bucket)


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


def _prompt_rows(prompts: Prompts) -> list[np.ndarray]:
  """The real tokens of each prompt (token lists, or ``(tokens_BxL, mask_BxL)`` arrays)."""
  if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
    tokens_BxL = np.asarray(prompts[0])
    mask_BxL = np.asarray(prompts[1]).astype(bool)
    if tokens_BxL.shape != mask_BxL.shape:
      raise ValueError(f"prompts: tokens {tokens_BxL.shape} and mask {mask_BxL.shape} must be "
                       "equal [B, L] shapes")
    return [row[m] for row, m in zip(tokens_BxL, mask_BxL)]
  return [np.asarray(p, np.int32).reshape(-1) for p in prompts]
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


def _vocab_ids(trie, restrict: bool):
  return trie.vocab_ids if (trie is not None and restrict) else None


def _prefill(model, tokens, mask, prefix, pmask, media, mmask, extra, vocab_ids):
  """Prefill into a cache of ``P + L + extra`` slots; logits of the last prompt token."""
  B, L = tokens.shape
  P = 0 if prefix is None else prefix.shape[1]
  cache = model.init_cache(B, P + L + extra)
  logits, cache = model(tokens, input_mask_BxL=mask, prefix_embeds_BxPxD=prefix,
                        prefix_mask_BxP=pmask, media_BxMxD=media, media_mask_BxM=mmask,
                        cache=cache, logits_positions=jnp.full((B, 1), L - 1, jnp.int32),
                        logits_vocab_ids=vocab_ids)
  return logits[:, 0].astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "extra"))
def _prefill_jit(graphdef, state, tokens, mask, prefix, pmask, media, mmask, vocab_ids, *,
                 extra):
  TRACE_COUNTS["prefill"] += 1
  return _prefill(nnx.merge(graphdef, state), tokens, mask, prefix, pmask, media, mmask, extra,
                  vocab_ids)


def _constrain(trie, restrict, processor, tokens_so_far, node_B, logits):
  """Masked logits: the trie's allowed set (carried node ids), else the processor's."""
  if trie is not None:
    allowed = trie.allowed(node_B, restrict)
    if allowed.shape != logits.shape:
      raise ValueError(f"trie: allowed mask {allowed.shape} does not match logits "
                       f"{logits.shape} (a trie built for another vocab_size?)")
    return jnp.where(allowed, logits, _NEG)
  return _apply_processor(processor, tokens_so_far, logits)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new", "sample", "use_top_k", "use_top_p", "stop_ids",
                     "pad_id", "processor", "restrict"))
def _generate_jit(graphdef, state, cache, logits, media, mmask, trie, rng, temperature, top_k,
                  top_p, *, max_new, sample, use_top_k, use_top_p, stop_ids, pad_id, processor,
                  restrict):
  TRACE_COUNTS["generate"] += 1
  model = nnx.merge(graphdef, state)
  B = logits.shape[0]
  vocab_ids = _vocab_ids(trie, restrict)
  to_real = (lambda t: t) if vocab_ids is None else (lambda t: vocab_ids[t])
  stops = jnp.asarray(stop_ids, jnp.int32)
  node0 = trie.init_state(B) if trie is not None else jnp.zeros((B,), jnp.int32)

  def cond(c):
    step, _, _, _, _, done, _ = c
    return (step < max_new) & ~jnp.all(done)

  def body(c):
    step, cache, logits, out, logp_out, done, node = c
    logits = _constrain(trie, restrict, processor, out, node, logits)
    loc = _select(logits, jax.random.fold_in(rng, step), sample, use_top_k, use_top_p,
                  temperature, top_k, top_p)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), loc[:, None], 1)[:, 0]
    chosen = jnp.take_along_axis(logits, loc[:, None], 1)[:, 0]
    lp = jnp.where(chosen <= _NEG / 2, _NEG, lp)   # the constraint allowed nothing
    if trie is not None:
      node = jnp.where(done, node, trie.advance(node, loc, restrict))
    tok = jnp.where(done, pad_id, to_real(loc))
    lp = jnp.where(done, 0.0, lp)
    out = out.at[:, step].set(tok)
    logp_out = logp_out.at[:, step].set(lp)
    done = done | jnp.isin(tok, stops)

    def forward(cache):
      new_logits, cache = model(tok[:, None], media_BxMxD=media, media_mask_BxM=mmask,
                                cache=cache, logits_vocab_ids=vocab_ids)
      return new_logits[:, 0].astype(jnp.float32), cache

    # No forward after the last token (N tokens = the prompt pass + N - 1 decode steps).
    logits, cache = jax.lax.cond((step + 1 < max_new) & ~jnp.all(done), forward,
                                 lambda cache: (logits, cache), cache)
    return step + 1, cache, logits, out, logp_out, done, node

  init = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((B, max_new), -1, jnp.int32),
          jnp.zeros((B, max_new), jnp.float32), jnp.zeros((B,), bool), node0)
  step, _, _, out, logp_out, done, _ = jax.lax.while_loop(cond, body, init)
  generated = out >= 0
  is_stop = jnp.isin(out, stops) & generated
  # length: up to and including the first stop token, else the steps taken
  first_stop = jnp.argmax(is_stop, axis=1)
  lengths = jnp.where(done, first_stop + 1, step)
  keep = jnp.arange(max_new)[None] < lengths[:, None]
  out = jnp.where(keep, out, pad_id)
  return out, lengths, jnp.where(keep, logp_out, 0.0), done


def _gather_beams(tree, idx_BxK, K_src: int, start: int = 0):
  """Reorders the batch (b * K_src + k) axis of every cache leaf by parent beam indices.

  Slots before ``start`` (the prefilled prompt, identical across the beams of one example)
  are left in place: only the generated region ``[start, S)`` is gathered.
  """
  B, K = idx_BxK.shape
  flat = (jnp.arange(B)[:, None] * K_src + idx_BxK).reshape(-1)

  def g(x):
    if x.ndim == 0:
      return x
    if start == 0:
      return jnp.take(x, flat, axis=0)
    return jax.lax.dynamic_update_slice_in_dim(x, jnp.take(x[:, start:], flat, axis=0), start,
                                               axis=1)
  return jax.tree.map(g, tree)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "num_beams", "max_new", "length_penalty", "stop_ids",
                     "pad_id", "processor", "restrict", "finish_forced"))
def _beam_jit(graphdef, state, cache, logits, media, mmask, trie, *, num_beams, max_new,
              length_penalty, stop_ids, pad_id, processor, restrict, finish_forced):
  TRACE_COUNTS["beam_search"] += 1
  model = nnx.merge(graphdef, state)
  B, K, N = logits.shape[0], num_beams, max_new
  vocab_ids = _vocab_ids(trie, restrict)
  to_real = (lambda t: t) if vocab_ids is None else (lambda t: vocab_ids[t])
  rep = lambda x: None if x is None else jnp.repeat(x, K, axis=0)
  prompt_slots = cache["pos"].shape[1] - N   # prefix + prompt: the same in every beam
  cache = jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, K, axis=0), cache)
  logits = jnp.repeat(logits, K, axis=0)
  media_k, mmask_k = rep(media), rep(mmask)
  stops = jnp.asarray(stop_ids, jnp.int32)
  node0 = trie.init_state(B * K) if trie is not None else jnp.zeros((B * K,), jnp.int32)

  def norm(raw, length):
    if length_penalty == 0.0:
      return raw
    return raw / jnp.maximum(length, 1).astype(jnp.float32) ** length_penalty

  def more(step, alive_raw, fin_score):
    """Whether step ``step`` runs: a live beam could still beat a finished one."""
    best_alive = norm(jnp.max(alive_raw, axis=1), jnp.full((B,), N))
    worst_fin = jnp.min(fin_score, axis=1)
    done = (worst_fin > _NEG / 2) & (best_alive <= worst_fin)
    return (step < N) & ~jnp.all(done)

  def cond(c):
    step, _, _, _, alive_raw, _, fin_score, _, _, _ = c
    return more(step, alive_raw, fin_score)

  def body(c):
    step, cache, logits, alive_tok, alive_raw, fin_tok, fin_score, fin_raw, fin_len, node = c
    W = logits.shape[-1]   # V, or K' for a restricted vocabulary
    logits = _constrain(trie, restrict, processor, alive_tok.reshape(B * K, N), node, logits)
    logp = jax.nn.log_softmax(logits, axis=-1)
    # disallowed tokens (and rows where the constraint allows nothing) are impossible, not
    # uniform: a fully masked row would otherwise get log(1/W) everywhere
    logp = jnp.where(logits <= _NEG / 2, _NEG, logp).reshape(B, K, W)
    cand = (alive_raw[:, :, None] + logp).reshape(B, K * W)
    vals, idx = jax.lax.top_k(cand, 2 * K)                      # [B, 2K]
    parent, loc = idx // W, (idx % W).astype(jnp.int32)
    tok = to_real(loc)
    cand_tok = jnp.take_along_axis(alive_tok, parent[:, :, None], axis=1)
    cand_tok = cand_tok.at[:, :, step].set(tok)
    is_stop = jnp.isin(tok, stops)
    cand_len = jnp.full((B, 2 * K), step + 1, jnp.int32)
    if trie is not None:   # each candidate's trie node
      pflat = (jnp.arange(B)[:, None] * K + parent).reshape(-1)
      cnode = trie.advance(node[pflat], loc.reshape(-1), restrict)
    if trie is not None and finish_forced:
      # A candidate at a forced trie node (one path left down to EOS) has its final score
      # now: every later token is the only one allowed, a log-probability of exactly 0.  It
      # joins the finished pool with its path written out, and frees its live slot.
      done_tok, added = trie.complete(cnode, cand_tok.reshape(B * 2 * K, N),
                                      jnp.full((B * 2 * K,), step + 1, jnp.int32))
      forced = (trie.forced(cnode) & (added > 0) & (step + 1 + added <= N)).reshape(B, 2 * K)
      forced = forced & ~is_stop & (vals > _NEG / 2)
      cand_tok = jnp.where(forced[:, :, None], done_tok.reshape(B, 2 * K, N), cand_tok)
      cand_len = jnp.where(forced, cand_len + added.reshape(B, 2 * K), cand_len)
      is_stop = is_stop | forced
    # finished pool: old finished + new stop-terminated candidates, best K by score
    new_fin_raw = jnp.where(is_stop, vals, _NEG)
    new_fin_score = jnp.where(is_stop & (vals > _NEG / 2), norm(vals, cand_len), _NEG)
    all_score = jnp.concatenate([fin_score, new_fin_score], 1)
    all_tok = jnp.concatenate([fin_tok, cand_tok], 1)
    all_raw = jnp.concatenate([fin_raw, new_fin_raw], 1)
    all_len = jnp.concatenate([fin_len, cand_len], 1)
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
    if trie is not None:
      node = jnp.take_along_axis(cnode.reshape(B, 2 * K), asel, axis=1).reshape(-1)

    def forward(cache):
      cache = _gather_beams(cache, alive_parent, K, start=prompt_slots)
      new_logits, cache = model(last, media_BxMxD=media_k, media_mask_BxM=mmask_k, cache=cache,
                                logits_vocab_ids=vocab_ids)
      return new_logits[:, 0].astype(jnp.float32), cache

    # No forward when the loop ends here (last step, or no live beam can win any more).
    logits, cache = jax.lax.cond(more(step + 1, alive_raw, fin_score), forward,
                                 lambda cache: (logits, cache), cache)
    return (step + 1, cache, logits, alive_tok, alive_raw,
            fin_tok, fin_score, fin_raw, fin_len, node)

  alive_raw = jnp.full((B, K), _NEG).at[:, 0].set(0.0)
  init = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((B, K, N), -1, jnp.int32),
          alive_raw, jnp.full((B, K, N), -1, jnp.int32), jnp.full((B, K), _NEG),
          jnp.full((B, K), _NEG), jnp.zeros((B, K), jnp.int32), node0)
  (step, _, _, alive_tok, alive_raw, fin_tok, fin_score, fin_raw,
   fin_len, _) = jax.lax.while_loop(cond, body, init)
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
          jnp.take_along_axis(all_fin, sel, axis=1), step)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_jit(graphdef, state, cache, logits0_BxW, media, mmask, vocab_ids, cand_CxT,
               cand_len_C, target_CxT, allowed_CxTxW):
  """Summed log-probabilities [B, C] of every candidate after every (prefilled) prompt.

  ``cand_CxT``: real token ids (right-padded); ``target_CxT``: the same tokens as columns of
  the logits (local ids when ``vocab_ids`` restricts them); ``allowed_CxTxW``: the per-step
  mask of the normalisation set, or None (every logit column).
  """
  TRACE_COUNTS["score_candidates"] += 1
  model = nnx.merge(graphdef, state)
  B = logits0_BxW.shape[0]
  C, T = cand_CxT.shape
  rep = lambda x: None if x is None else jnp.repeat(x, C, axis=0)   # row b * C + c
  logits_RxTxW = rep(logits0_BxW)[:, None]
  if T > 1:
    cache = jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, C, axis=0), cache)
    inputs_RxT1 = jnp.tile(cand_CxT[:, :T - 1], (B, 1))
    rest, _ = model(inputs_RxT1, media_BxMxD=rep(media), media_mask_BxM=rep(mmask),
                    cache=cache, logits_vocab_ids=vocab_ids)
    logits_RxTxW = jnp.concatenate([logits_RxTxW, rest.astype(jnp.float32)], axis=1)
  if allowed_CxTxW is not None:
    allowed = jnp.tile(allowed_CxTxW, (B, 1, 1))
    logits_RxTxW = jnp.where(allowed, logits_RxTxW, _NEG)
  logp_RxTxW = jax.nn.log_softmax(logits_RxTxW, axis=-1)
  target_RxT = jnp.tile(target_CxT, (B, 1))
  logp_RxT = jnp.take_along_axis(logp_RxTxW, target_RxT[:, :, None], axis=2)[:, :, 0]
  valid_RxT = jnp.arange(T)[None, :] < jnp.tile(cand_len_C, B)[:, None]
  return jnp.sum(jnp.where(valid_RxT, logp_RxT, 0.0), axis=1).reshape(B, C)


def _prefix_sets(cands: list[list[int]]) -> list[list[set]]:
  """allowed[c][t]: the tokens at step t of the candidates sharing candidate c's first t."""
  out = []
  for c in cands:
    row = []
    for t in range(len(c)):
      row.append({d[t] for d in cands if len(d) > t and d[:t] == c[:t]})
    out.append(row)
  return out


class Sampler:
  """Generation for a Gemma3 model (see the module docstring for the conventions).

  Args:
    model: a :class:`~userllm_jax.models.gemma.Gemma3` (possibly sharded, possibly with LoRA
      or cross-attention blocks).  Its current weights are read at every call.
    eos_id / pad_id: tokenizer ids (Gemma: eos 1, pad 0).
    prompt_bucket: prompts are left-padded to a multiple of this many tokens so that
      different prompt lengths share a compiled program (0: no bucketing).
    place_inputs: host array -> device array for the prompt tokens and mask (default
      ``jnp.asarray``); see the module docstring (multi-host).
  """

  def __init__(self, model: nnx.Module, *, eos_id: int = 1, pad_id: int = 0,
               prompt_bucket: int = DEFAULT_PROMPT_BUCKET,
               place_inputs: Optional[Callable[[np.ndarray], jax.Array]] = None):
    if not isinstance(prompt_bucket, (int, np.integer)) or prompt_bucket < 0:
      raise ValueError(f"Sampler: prompt_bucket must be an int >= 0, got {prompt_bucket!r}")
    self.model = model
    self.eos_id = int(eos_id)
    self.pad_id = int(pad_id)
    self.prompt_bucket = int(prompt_bucket)
    self.place_inputs = place_inputs or jnp.asarray

  def _inputs(self, prompts: Prompts, prefix_embeds_BxPxD, prefix_mask_BxP, media_BxMxD,
              media_mask_BxM):
    rows = _prompt_rows(prompts)
    if not rows:
      raise ValueError("Sampler: prompts is empty")
    L = bucket_length(max(len(r) for r in rows), self.prompt_bucket)
    tokens, mask = pad_prompts(rows, self.pad_id, L)
    B = tokens.shape[0]
    for name, x in (("prefix_embeds_BxPxD", prefix_embeds_BxPxD),
                    ("prefix_mask_BxP", prefix_mask_BxP), ("media_BxMxD", media_BxMxD),
                    ("media_mask_BxM", media_mask_BxM)):
      if x is not None and np.shape(x)[0] != B:
        raise ValueError(f"Sampler: {name} has batch {np.shape(x)[0]}, prompts have {B}")
    if prefix_embeds_BxPxD is not None and prefix_mask_BxP is None:
      prefix_mask_BxP = self.place_inputs(np.ones(np.shape(prefix_embeds_BxPxD)[:2], bool))
    if media_BxMxD is not None and media_mask_BxM is None:
      media_mask_BxM = self.place_inputs(np.ones(np.shape(media_BxMxD)[:2], bool))
    return (self.place_inputs(tokens), self.place_inputs(mask), prefix_embeds_BxPxD,
            prefix_mask_BxP,
            media_BxMxD, media_mask_BxM)

  def _stop_ids(self, stop_tokens: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({self.eos_id, *(int(t) for t in stop_tokens)}))

  def _check_trie(self, trie, logits_processor, restrict_vocab, num_beams: int = 1):
    if trie is None:
      return
    if logits_processor is not None:
      raise ValueError("Sampler: give trie= or logits_processor=, not both")
    for attr in ("vocab_ids", "allowed", "advance", "init_state"):
      if not hasattr(trie, attr):
        raise ValueError(f"Sampler: trie must be an eval.trie.TrieConstraint (make_constraint / "
                         f"TitleTrie.to_constraint), got {type(trie).__name__} without "
                         f".{attr}")
    k = int(trie.vocab_ids.shape[0])
    if restrict_vocab and k < 2:
      raise ValueError(f"Sampler: trie.vocab_ids has {k} tokens; need >= 2")
    if int(trie.full.vocab_size) > self.model.cfg.vocab_size:
      raise ValueError(f"Sampler: trie built for vocab_size {trie.full.vocab_size} > model "
                       f"vocab {self.model.cfg.vocab_size}")

  def _prefill(self, graphdef, state, args, extra, vocab_ids):
    logits, cache = _prefill_jit(graphdef, state, *args, vocab_ids, extra=int(extra))
    return jax.block_until_ready(logits), cache

  def generate(self, prompts: Prompts, *, max_new_tokens: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, rng: Optional[jax.Array] = None,
               stop_tokens: Sequence[int] = (), prefix_embeds_BxPxD=None, prefix_mask_BxP=None,
               media_BxMxD=None, media_mask_BxM=None,
               logits_processor: Optional[LogitsProcessor] = None,
               trie: Any = None, restrict_vocab: bool = True) -> GenerateOutput:
    """Greedy (``temperature=0``) or sampled generation.

    ``prompts``: a list of token-id lists, or ``(tokens_BxL, mask_BxL)`` arrays.
    Sampling (``temperature > 0``) needs an explicit ``rng`` key; ``top_k=0`` and
    ``top_p=1.0`` switch those filters off.  ``trie``: a ``TrieConstraint``; with
    ``restrict_vocab`` the logits cover only its tokens (see the module docstring).
    """
    t0 = time.perf_counter()
    if max_new_tokens < 1:
      raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = self.model.cfg.vocab_size
    if temperature < 0 or not 0.0 < top_p <= 1.0 or not 0 <= top_k <= vocab:
      raise ValueError(f"generate: bad sampling settings temperature={temperature}, "
                       f"top_k={top_k}, top_p={top_p}")
    if temperature > 0 and rng is None:
      raise ValueError("generate: sampling (temperature > 0) needs an explicit rng key")
    self._check_trie(trie, logits_processor, restrict_vocab)
    if rng is None:
      rng = jax.random.key(0)
    restrict = bool(restrict_vocab) and trie is not None
    if restrict:
      top_k = min(top_k, int(trie.vocab_ids.shape[0]))
    args = self._inputs(prompts, prefix_embeds_BxPxD, prefix_mask_BxP, media_BxMxD,
                        media_mask_BxM)
    graphdef, state = nnx.split(self.model)
    logits, cache = self._prefill(graphdef, state, args, max_new_tokens,
                                  _vocab_ids(trie, restrict))
    t1 = time.perf_counter()
    out, lengths, logp, done = _generate_jit(
        graphdef, state, cache, logits, args[4], args[5], trie, rng,
        jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p),
        max_new=int(max_new_tokens), sample=temperature > 0, use_top_k=top_k > 0,
        use_top_p=top_p < 1.0, stop_ids=self._stop_ids(stop_tokens), pad_id=self.pad_id,
        processor=logits_processor, restrict=restrict)
    res = GenerateOutput(_host(out), _host(lengths), _host(logp), _host(done))
    res.timing = Timing(prefill_s=t1 - t0, total_s=time.perf_counter() - t0)
    return res

  def beam_search(self, prompts: Prompts, *, num_beams: int, max_new_tokens: int,
                  length_penalty: float = 0.0, stop_tokens: Sequence[int] = (),
                  prefix_embeds_BxPxD=None, prefix_mask_BxP=None, media_BxMxD=None,
                  media_mask_BxM=None,
                  logits_processor: Optional[LogitsProcessor] = None,
                  trie: Any = None, restrict_vocab: bool = True,
                  finish_forced: bool = True) -> BeamOutput:
    """The ``num_beams`` best continuations per prompt, best first.

    ``trie``: a ``TrieConstraint``; with ``restrict_vocab`` the logits cover only its tokens
    (see the module docstring); ``restrict_vocab=False`` is the full-vocabulary reference.
    ``finish_forced``: beams at a forced trie node finish at once (module docstring);
    ``False`` decodes them token by token (the plain beam search).
    """
    t0 = time.perf_counter()
    if num_beams < 1 or max_new_tokens < 1:
      raise ValueError(f"beam_search: num_beams={num_beams} and max_new_tokens="
                       f"{max_new_tokens} must be >= 1")
    self._check_trie(trie, logits_processor, restrict_vocab, num_beams)
    restrict = bool(restrict_vocab) and trie is not None
    vocab = self.model.cfg.vocab_size
    if not restrict and 2 * num_beams > vocab:
      raise ValueError(f"beam_search: 2 * num_beams = {2 * num_beams} > vocab {vocab}")
    args = self._inputs(prompts, prefix_embeds_BxPxD, prefix_mask_BxP, media_BxMxD,
                        media_mask_BxM)
    graphdef, state = nnx.split(self.model)
    logits, cache = self._prefill(graphdef, state, args, max_new_tokens,
                                  _vocab_ids(trie, restrict))
    t1 = time.perf_counter()
    toks, score, raw, lengths, fin, steps = _beam_jit(
        graphdef, state, cache, logits, args[4], args[5], trie, num_beams=int(num_beams),
        max_new=int(max_new_tokens), length_penalty=float(length_penalty),
        stop_ids=self._stop_ids(stop_tokens), pad_id=self.pad_id, processor=logits_processor,
        restrict=restrict, finish_forced=bool(finish_forced) and trie is not None)
    res = BeamOutput(_host(toks), _host(score), _host(raw), _host(lengths), _host(fin),
                     steps=int(_host(steps)))
    res.timing = Timing(prefill_s=t1 - t0, total_s=time.perf_counter() - t0)
    return res

  def score_candidates(self, prompts: Prompts, candidates: Sequence[Sequence[int]], *,
                       prefix_embeds_BxPxD=None, prefix_mask_BxP=None, media_BxMxD=None,
                       media_mask_BxM=None, normalize: str = "union") -> ScoreOutput:
    """Log-probabilities ``[B, C]`` of whole candidate sequences; see :func:`score_candidates`."""
    t0 = time.perf_counter()
    if normalize not in ("union", "trie", "full"):
      raise ValueError(f"score_candidates: normalize must be 'union', 'trie' or 'full', got "
                       f"{normalize!r}")
    vocab = self.model.cfg.vocab_size
    cands = [[int(t) for t in np.asarray(c).reshape(-1)] for c in candidates]
    if not cands:
      raise ValueError("score_candidates: candidates is empty")
    for i, c in enumerate(cands):
      if not c:
        raise ValueError(f"score_candidates: candidates[{i}] is empty")
      bad = [t for t in c if not 0 <= t < vocab]
      if bad:
        raise ValueError(f"score_candidates: candidates[{i}] has token ids {bad} outside "
                         f"[0, {vocab})")
    C, T = len(cands), max(len(c) for c in cands)
    cand_CxT = np.full((C, T), self.pad_id, np.int32)
    for i, c in enumerate(cands):
      cand_CxT[i, :len(c)] = c
    lens_C = np.asarray([len(c) for c in cands], np.int32)
    allowed = None
    if normalize == "full":
      vocab_ids, target_CxT = None, cand_CxT
    else:
      vocab_np = np.unique(np.concatenate([np.asarray(c, np.int32) for c in cands]))
      vocab_ids = jnp.asarray(vocab_np.astype(np.int32))
      target_CxT = np.searchsorted(vocab_np, cand_CxT).clip(0, len(vocab_np) - 1)
      target_CxT = target_CxT.astype(np.int32)
      if normalize == "trie":
        sets = _prefix_sets(cands)
        allowed = np.ones((C, T, len(vocab_np)), bool)
        for i, row in enumerate(sets):
          for t, s in enumerate(row):
            allowed[i, t] = np.isin(vocab_np, list(s))
        allowed = jnp.asarray(allowed)
    args = self._inputs(prompts, prefix_embeds_BxPxD, prefix_mask_BxP, media_BxMxD,
                        media_mask_BxM)
    graphdef, state = nnx.split(self.model)
    logits, cache = self._prefill(graphdef, state, args, T - 1, vocab_ids)
    t1 = time.perf_counter()
    out = _score_jit(graphdef, state, cache, logits, args[4], args[5], vocab_ids,
                     jnp.asarray(cand_CxT), jnp.asarray(lens_C), jnp.asarray(target_CxT),
                     allowed)
    out = _host(out)
    return ScoreOutput(out, Timing(prefill_s=t1 - t0, total_s=time.perf_counter() - t0))


def score_candidates(model: nnx.Module, prompts: Prompts, candidates: Sequence[Sequence[int]],
                     *, prefix_embeds_BxPxD=None, prefix_mask_BxP=None, media_BxMxD=None,
                     media_mask_BxM=None, normalize: str = "union", pad_id: int = 0,
                     prompt_bucket: int = DEFAULT_PROMPT_BUCKET) -> np.ndarray:
  """``[B, C]`` log-probabilities of each whole candidate (sum over its tokens) after each
  prompt, in one jitted call: the prompts are prefilled once into a KV cache, the cache is
  tiled over the ``C`` candidates, and all ``B * C`` candidate rows are scored in one batched
  teacher-forced forward.

  ``candidates``: token-id sequences as they would be generated (e.g. a genre name's tokens
  + EOS); ``prompts`` and the user conditioning (``prefix_embeds_BxPxD`` / ``prefix_mask_BxP``
  soft prompt, ``media_BxMxD`` / ``media_mask_BxM`` cross-attention) as for
  :meth:`Sampler.generate`.

  ``normalize`` chooses the set each step's softmax runs over (the same "mask, then
  log-softmax over the allowed tokens" rule as constrained decoding):

  * ``"union"`` (default): the union of all candidates' tokens, at every step; logits only
    against those embedding rows.  The candidates' probabilities then need not sum to 1.
  * ``"trie"``: the tokens the candidates' prefix trie allows after each candidate's prefix,
    i.e. exactly the score a ``trie=`` constrained beam search over the same candidates gives
    (the candidates' probabilities sum to 1 when no candidate is a prefix of another).
  * ``"full"``: the whole vocabulary (the model's own probability; ``V`` logits per row).

  Memory: the cache is tiled ``C`` times (``B * C`` rows of ``P + L + T - 1`` slots).
  """
  return Sampler(model, pad_id=pad_id, prompt_bucket=prompt_bucket).score_candidates(
      prompts, candidates, prefix_embeds_BxPxD=prefix_embeds_BxPxD,
      prefix_mask_BxP=prefix_mask_BxP, media_BxMxD=media_BxMxD, media_mask_BxM=media_mask_BxM,
      normalize=normalize).logprobs_BxC


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
