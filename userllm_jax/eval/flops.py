"""Inference cost of User-LLM vs the text-prompt (TP) baseline: FLOPs and wall-clock.

FLOPs come from XLA's cost analysis of the *compiled* forward pass
(``jax.jit(fwd).lower(*abstract_args).compile().cost_analysis()['flops']``), built on
abstract shapes (``nnx.eval_shape`` + ``jax.ShapeDtypeStruct``), so no weights are loaded
and nothing is executed.  The protocol, per example (batch 1, no padding):

* **User-LLM** = the user encoder over the history (T items) + the Perceiver + the projector
  + the LLM over the task prompt only (no history text), with the user tokens entering
  through gated cross-attention ('xattn') or as a soft prompt ('soft_prompt').
* **TP** = the bare LLM over the prompt that contains the serialized history.
* For both, logits are computed at the **last position only** (what a prefill before
  generation needs: the first generated token), not over the whole prompt; the tied
  262k-entry output projection would otherwise dominate short prompts.

XLA counts a multiply-add as 2 FLOPs; gathers (embedding look-ups) count ~0.  The number
depends a little on the backend's fusion decisions (CPU vs GPU/TPU), much less than on
the shapes.  ``cost_analysis()`` returns a dict in JAX 0.10/0.11 and a list with one dict
per computation in some older versions: both are accepted.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from userllm_jax.models.encoder import EncoderConfig
from userllm_jax.models.gemma import Gemma3, GemmaConfig
from userllm_jax.models.userllm import UserLLMConfig, init_userllm


def cost_analysis_flops(compiled) -> float:
  """``flops`` of a ``jax.stages.Compiled`` (dict, or list of per-computation dicts)."""
  ca = compiled.cost_analysis()
  if ca is None:
    raise RuntimeError("cost_analysis() returned None on this backend: no FLOP count")
  if isinstance(ca, Mapping):
    ca = [ca]
  total = 0.0
  found = False
  for entry in ca:
    if entry and "flops" in entry:
      total += float(entry["flops"])
      found = True
  if not found:
    raise RuntimeError(f"cost_analysis() has no 'flops' entry: keys {[sorted(e) for e in ca]}")
  return total


def compiled_flops(fn: Callable, *args) -> float:
  """FLOPs of ``jax.jit(fn)(*args)``; ``args`` may be ``jax.ShapeDtypeStruct`` pytrees."""
  return cost_analysis_flops(jax.jit(fn).lower(*args).compile())


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def history_spec(encoder_cfg: EncoderConfig, batch: int, length: int,
                 num_genres_per_item: int = 3) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract history batch with every field the encoder's features need."""
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  spec = {"item_BxT": i32(batch, length), "segment_BxT": i32(batch, length),
          "position_BxT": i32(batch, length)}
  if "genre" in encoder_cfg.features:
    spec["genre_BxTxG"] = i32(batch, length, num_genres_per_item)
  if "rating" in encoder_cfg.features:
    spec["rating_BxT"] = i32(batch, length)
  if "timegap" in encoder_cfg.features:
    spec["timegap_BxT"] = i32(batch, length)
  return spec


def tp_forward_flops(gemma_cfg: GemmaConfig, prompt_tokens: int, *, batch: int = 1) -> float:
  """FLOPs per example of the bare LLM over ``prompt_tokens`` tokens, logits at the last one."""
  gemma_cfg = gemma_cfg.replace(cross_attention_layers=(), lora=None)
  abstract = nnx.eval_shape(lambda: Gemma3(gemma_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)

  def fwd(state, tokens_BxL):
    model = nnx.merge(graphdef, state)
    last = jnp.full((tokens_BxL.shape[0], 1), tokens_BxL.shape[1] - 1, jnp.int32)
    return model(tokens_BxL, logits_positions=last)

  tokens = jax.ShapeDtypeStruct((batch, prompt_tokens), jnp.int32)
  return compiled_flops(fwd, _abstract(state), tokens) / batch


def userllm_forward_flops(cfg: UserLLMConfig, encoder_cfg: EncoderConfig,
                          gemma_cfg: GemmaConfig, history_length: int, prompt_tokens: int, *,
                          batch: int = 1, num_genres_per_item: int = 3) -> float:
  """FLOPs per example of User-LLM: encoder(history) + perceiver + projector + LLM(prompt).

  Logits at the last prompt position only.  ``encoder_cfg.max_len`` is raised to the
  history length when needed (learned positions; no FLOPs change).
  """
  if encoder_cfg.position == "learned" and encoder_cfg.max_len < history_length:
    encoder_cfg = dataclasses.replace(encoder_cfg, max_len=history_length)
  gemma_cfg = gemma_cfg.replace(cross_attention_layers=(), lora=None)
  abstract = nnx.eval_shape(
      lambda: init_userllm(cfg, encoder_cfg, gemma_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)

  def fwd(state, history, tokens_BxL):
    model = nnx.merge(graphdef, state)
    last = jnp.full((tokens_BxL.shape[0], 1), tokens_BxL.shape[1] - 1, jnp.int32)
    return model(history, tokens_BxL, logits_positions=last)

  hist = history_spec(encoder_cfg, batch, history_length, num_genres_per_item)
  tokens = jax.ShapeDtypeStruct((batch, prompt_tokens), jnp.int32)
  return compiled_flops(fwd, _abstract(state), hist, tokens) / batch


def component_flops(cfg: UserLLMConfig, encoder_cfg: EncoderConfig, gemma_cfg: GemmaConfig,
                    history_length: int, prompt_tokens: int) -> dict[str, float]:
  """Where User-LLM's FLOPs go (per example): encoder, perceiver+projector, LLM body, logits.

  Each part is compiled on its own, so the parts add up to the whole only approximately
  (fusion differs).  'llm_logits' is the tied output projection at one position.
  """
  if encoder_cfg.position == "learned" and encoder_cfg.max_len < history_length:
    encoder_cfg = dataclasses.replace(encoder_cfg, max_len=history_length)
  gemma_cfg = gemma_cfg.replace(cross_attention_layers=(), lora=None)
  abstract = nnx.eval_shape(
      lambda: init_userllm(cfg, encoder_cfg, gemma_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  hist = history_spec(encoder_cfg, 1, history_length)
  tokens = jax.ShapeDtypeStruct((1, prompt_tokens), jnp.int32)
  st = _abstract(state)

  def encoder_fwd(state, history):
    return nnx.merge(graphdef, state).encoder(history)[0]

  def embed_fwd(state, history):
    return nnx.merge(graphdef, state).embed_users(history)[0]

  def hidden_fwd(state, history, tokens_BxL):
    model = nnx.merge(graphdef, state)
    last = jnp.full((1, 1), tokens_BxL.shape[1] - 1, jnp.int32)
    return model(history, tokens_BxL, logits_positions=last, return_hidden=True)

  enc = compiled_flops(encoder_fwd, st, hist)
  emb = compiled_flops(embed_fwd, st, hist)
  hid = compiled_flops(hidden_fwd, st, hist, tokens)
  logits = 2.0 * gemma_cfg.embed_dim * gemma_cfg.vocab_size
  return {"encoder": enc, "perceiver_projector": emb - enc, "llm_body": hid - emb,
          "llm_logits": logits}


def ms_per_example(fn: Callable, *args, batch: int = 1, warmup: int = 2, iters: int = 10
                   ) -> dict[str, float]:
  """Wall-clock of ``jax.jit(fn)(*args)`` (concrete args): median / min ms per example.

  Compiles and runs ``warmup`` times first; each timed call is synchronised with
  ``jax.block_until_ready``.
  """
  if iters < 1:
    raise ValueError(f"ms_per_example: iters must be >= 1, got {iters}")
  jfn = jax.jit(fn)
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(jfn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(jfn(*args))
    times.append(time.perf_counter() - t0)
  times_ms = np.asarray(times) * 1e3 / batch
  return {"median_ms": float(np.median(times_ms)), "min_ms": float(times_ms.min()),
          "iters": iters, "batch": batch}
