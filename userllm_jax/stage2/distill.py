"""The stage-1 encoder's next-item distribution as a soft target of stage 2 (optional).

    examples = distill.attach_teacher(config, encoder, examples)   # train.distill_weight > 0

Next-item supervision gives one title per example: the bridge (Perceiver, projector,
cross-attention) would have to learn from a few answers per title which user-embedding
direction means which of the catalogue's titles.  The stage-1 encoder already ranks the whole
catalogue from the same history.  Each next-item training example therefore carries the
encoder's distribution over items (``softmax(scores / train.distill_temperature)``, the
history's own items removed, as in the encoder top-K baseline), and the stage-2 loss adds,
at every target slot, the cross-entropy of the LLM's trie-normalised distribution against
that distribution's mass below each allowed token (``loss.AnswerTries.soft_targets``;
``loss.next_token_loss(distill_weight=w)``): every example teaches the ranking of all titles,
not one.  Only User-LLM methods get it (TP has no encoder); the encoder is the stage-1 one,
fixed, so the targets do not move while stage 2 trains the encoder's copy.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from userllm_jax.data import tasks as tasks_lib
from userllm_jax.stage2 import baselines as baselines_lib

TASK = "next_item"


def item_distributions(encoder, examples: Sequence[tasks_lib.Example], *,
                       temperature: float = 1.0) -> list[np.ndarray]:
  """``softmax(scores / temperature)`` of the stage-1 encoder over item ids from each
  example's history, the history's items excluded (``float32 [num_items]`` each)."""
  if temperature <= 0:
    raise ValueError(f"config.train.distill_temperature: expected > 0, got {temperature}")
  out = []
  for scores in baselines_lib.encoder_scores(encoder, list(examples)):
    z = scores / temperature
    z = z - np.max(z, axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    out.extend(p.astype(np.float32))
  return out


def attach_teacher(config, encoder, examples: Sequence[tasks_lib.Example]
                   ) -> list[tasks_lib.Example]:
  """``examples`` with every next-item example carrying the encoder's distribution
  (``Example.teacher``); other tasks' examples unchanged."""
  if str(config.train.get("loss_vocab", "full")) != "trie":
    raise ValueError("config.train.distill_weight > 0 needs config.train.loss_vocab='trie' "
                     "(the soft targets live on the answer trie)")
  idx = [i for i, e in enumerate(examples) if e.task == TASK]
  probs = item_distributions(encoder, [examples[i] for i in idx],
                             temperature=float(config.train.get("distill_temperature", 1.0)))
  out = list(examples)
  for i, p in zip(idx, probs):
    out[i] = dataclasses.replace(examples[i], teacher=p)
  return out
