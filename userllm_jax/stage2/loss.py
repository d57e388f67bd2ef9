"""The stage-2 loss: next-token cross-entropy on the answer tokens (User-LLM and TP alike).

    loss, metrics = next_token_loss(forward, batch, max_target_tokens=T, vocab_ids=ids)

``forward(tokens_BxL, input_mask_BxL, logits_positions_BxN, vocab_ids_K) -> logits_BxNxK``
runs the model (a :class:`~userllm_jax.models.userllm.UserLLM` with the batch's history, or
the TP baseline's Gemma) and returns logits only at the ``N = max_target_tokens`` positions
from ``prompt_len - 1`` on, where the loss lives, and only over ``vocab_ids`` when given.

Answer vocabulary (``vocab_ids``, sorted, unique; see :func:`answer_vocabulary`): the softmax
runs over the tokens that any training or evaluation answer uses (catalogue titles, genre
names, EOS) instead of all 262,144 Gemma tokens.  This is the distribution the
trie-constrained decoders renormalise over at evaluation (every answer is a catalogue
title or a genre name), and it removes the 640 x 262,144 output projection that made a
stage-2 step cost ~3.4 s on 2 CPU cores.  ``vocab_ids=None`` gives the full-vocabulary
loss (free-text tasks such as reviews need it).

Batches are :func:`userllm_jax.data.tasks.tokenize_example` batches: ``tokens_BxL``,
``targets_BxL``, ``loss_mask_BxL``, ``input_mask_BxL``, ``prompt_len_B`` (+ the history).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Forward = Callable[..., jax.Array]


def answer_vocabulary(token_lists: Iterable[Sequence[int]], *, eos_id: int) -> np.ndarray:
  """Sorted unique token ids of all answers, EOS included (``int32 [K]``)."""
  ids = {int(eos_id)}
  for toks in token_lists:
    ids.update(int(t) for t in toks)
  return np.asarray(sorted(ids), np.int32)


def target_positions(prompt_len_B: jax.Array, length: int, max_target_tokens: int):
  """``(positions_BxN, in_range_BxN)``: the N target slots from ``prompt_len - 1`` on."""
  start_B = jnp.asarray(prompt_len_B).astype(jnp.int32) - 1
  raw = start_B[:, None] + jnp.arange(max_target_tokens, dtype=jnp.int32)[None, :]
  return jnp.clip(raw, 0, length - 1), raw < length


def next_token_loss(forward: Forward, batch: Mapping[str, jax.Array], *,
                    max_target_tokens: int,
                    vocab_ids: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """Mean next-token NLL over the target tokens (+EOS) of the batch; metrics too.

  With ``vocab_ids`` every loss-masked target must be one of them (an answer token);
  a target outside raises at trace time only if detectable, so build ``vocab_ids`` from the
  same examples with :func:`answer_vocabulary`.
  """
  for key in ("tokens_BxL", "targets_BxL", "loss_mask_BxL", "input_mask_BxL", "prompt_len_B"):
    if key not in batch:
      raise KeyError(f"next_token_loss: batch lacks {key!r}; keys: {sorted(batch)}")
  tokens = jnp.asarray(batch["tokens_BxL"])
  L = tokens.shape[1]
  # A batch padded shorter than the longest target (one task per batch) has fewer slots.
  lp_BxN, in_range_BxN = target_positions(batch["prompt_len_B"], L, min(max_target_tokens, L))
  targets_BxN = jnp.take_along_axis(jnp.asarray(batch["targets_BxL"]), lp_BxN, axis=1)
  mask_BxN = (jnp.take_along_axis(jnp.asarray(batch["loss_mask_BxL"]), lp_BxN, axis=1)
              .astype(jnp.float32) * in_range_BxN)
  input_mask = jnp.asarray(batch["input_mask_BxL"]).astype(bool)
  if vocab_ids is not None:
    vocab_ids = jnp.asarray(vocab_ids, jnp.int32)
    idx_BxN = jnp.clip(jnp.searchsorted(vocab_ids, targets_BxN), 0, vocab_ids.shape[0] - 1)
    found_BxN = vocab_ids[idx_BxN] == targets_BxN
    # A masked target outside the answer vocabulary would be silently mis-scored: count it.
    outside = jnp.sum((~found_BxN) * mask_BxN)
    targets_BxN = idx_BxN
  logits = forward(tokens, input_mask, lp_BxN, vocab_ids).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll_BxN = -jnp.take_along_axis(logp, targets_BxN[..., None].astype(jnp.int32), axis=-1)[..., 0]
  denom = jnp.maximum(mask_BxN.sum(), 1.0)
  loss = (nll_BxN * mask_BxN).sum() / denom
  acc = ((jnp.argmax(logits, -1) == targets_BxN) * mask_BxN).sum() / denom
  metrics = {"loss": loss, "token_accuracy": acc, "num_tokens": mask_BxN.sum()}
  if vocab_ids is not None:
    metrics["targets_outside_vocab"] = outside
  return loss, metrics
