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

Trie-normalised targets (``train.loss_vocab='trie'``, :class:`AnswerTries`): every closed
answer set (the catalogue titles, the genre names) is a trie, and the loss at each target
position is the target's log-probability renormalised over the tokens the *task's* trie
allows after the target's prefix -- exactly the per-step quantity the trie-constrained
decoders rank by (``models/sampler.py``), so training optimises what evaluation decodes.
A target is cut after the tokens that decide it (``TitleTrie.decisive_length``: two on
average for the 1,682 ml-100k titles of 11 tokens, one for a genre): at every later position
the trie allows a single token, a loss of exactly 0 with no gradient, so those positions are
not computed at all.  The batch then carries ``answer_allowed_BxNxK`` (the allowed tokens of
each target slot, over ``vocab_ids``; :meth:`AnswerTries.add_allowed`).

Batches are :func:`userllm_jax.data.tasks.tokenize_example` batches: ``tokens_BxL``,
``targets_BxL``, ``loss_mask_BxL``, ``input_mask_BxL``, ``prompt_len_B`` (+ the history;
+ ``answer_node_BxN`` and ``answer_allowed_BxNxK`` with trie-normalised targets).
"""

from __future__ import annotations

import bisect
from typing import Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from userllm_jax.eval import trie as trie_lib

Forward = Callable[..., jax.Array]
NEG_INF = -1e30


def answer_vocabulary(token_lists: Iterable[Sequence[int]], *, eos_id: int) -> np.ndarray:
  """Sorted unique token ids of all answers, EOS included (``int32 [K]``)."""
  ids = {int(eos_id)}
  for toks in token_lists:
    ids.update(int(t) for t in toks)
  return np.asarray(sorted(ids), np.int32)


LOSS_VOCABS = ("full", "answers", "trie")


def loss_vocabulary(config, answers, *, eos_id: int
                    ) -> tuple[Optional[np.ndarray], Optional["AnswerTries"]]:
  """``(vocab_ids, answer_tries)`` for ``config.train.loss_vocab``:

  * ``'full'``: ``(None, None)``, the softmax over every LLM token (free text: reviews);
  * ``'answers'``: the answer vocabulary (every answer token + EOS), no tries;
  * ``'trie'``: the same vocabulary and each task's answer trie (``answers.tries()``):
    trie-normalised targets (module docstring).
  """
  kind = str(config.train.get("loss_vocab", "full"))
  if kind not in LOSS_VOCABS:
    raise ValueError(f"config.train.loss_vocab: {kind!r}; known: {LOSS_VOCABS}")
  if kind == "full":
    return None, None
  if "review" in config.tasks.names:
    raise ValueError(f"config.train.loss_vocab={kind!r} cannot score free-text reviews "
                     "(task 'review'): use 'full'")
  vocab_ids = answer_vocabulary(answers.token_lists(), eos_id=eos_id)
  if kind == "answers":
    return vocab_ids, None
  return vocab_ids, AnswerTries(answers.tries(), vocab_ids)


def distill_weight(config) -> float:
  """``config.train.distill_weight`` (default 0: off; ``stage2/distill.py``), validated."""
  w = float(config.train.get("distill_weight", 0.0))
  if not 0.0 <= w <= 1.0:
    raise ValueError(f"config.train.distill_weight: expected a weight in [0, 1], got {w}")
  return w


class AnswerTries:
  """Each closed-answer task's trie (task -> :class:`~userllm_jax.eval.trie.TitleTrie`) over
  the answer vocabulary ``vocab_ids``: cuts targets to their deciding tokens and gives the
  allowed-token masks of the trie-normalised loss (module docstring).

  Node ids are global: task ``t``'s node ``n`` is ``offset[t] + n``.
  """

  def __init__(self, tries: Mapping[str, "trie_lib.TitleTrie"], vocab_ids: Sequence[int]):
    if not tries:
      raise ValueError("AnswerTries: no task tries")
    self.vocab_ids = np.asarray(vocab_ids, np.int32)
    if self.vocab_ids.ndim != 1 or np.any(np.diff(self.vocab_ids) <= 0):
      raise ValueError("AnswerTries: vocab_ids must be sorted and unique")
    self.tasks = tuple(sorted(tries))
    self._tries = dict(tries)
    self._starts, off = [], 0
    for task in self.tasks:
      self._starts.append(off)
      off += self._tries[task].num_nodes
    self._local: dict = {}   # node -> allowed indices; ('paths', task) -> item paths

  @property
  def num_tokens(self) -> int:
    return int(self.vocab_ids.shape[0])

  def cut(self, task: str, target_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(target_ids[:k], global node before each kept token)``; ``k`` the deciding length.

    Raises ValueError naming the task when it has no answer trie or the target is not one
    of its answers.
    """
    if task not in self._tries:
      raise ValueError(f"task {task!r} has no closed answer set (trie-normalised loss "
                       f"covers {list(self.tasks)}; free-text tasks need "
                       "train.loss_vocab='full')")
    trie = self._tries[task]
    ids = [int(t) for t in target_ids]
    try:
      k = trie.decisive_length(ids)
    except ValueError:
      raise ValueError(f"target {ids} is not an answer of task {task!r}'s trie") from None
    off = self._starts[self.tasks.index(task)]
    return ids[:k], [off + n for n in trie.nodes_along(ids[:k])]

  def _allowed_local(self, node: int) -> np.ndarray:
    """Indices into ``vocab_ids`` of the tokens global ``node`` allows (cached)."""
    got = self._local.get(node)
    if got is None:
      i = bisect.bisect_right(self._starts, node) - 1
      task = self.tasks[i]
      toks = np.asarray(self._tries[task].children_tokens(node - self._starts[i]), np.int64)
      got = np.searchsorted(self.vocab_ids, toks)
      if np.any(got >= len(self.vocab_ids)) or np.any(self.vocab_ids[np.minimum(
          got, len(self.vocab_ids) - 1)] != toks):
        raise ValueError(f"AnswerTries: task {task!r}'s trie uses tokens outside vocab_ids")
      self._local[node] = got
    return got

  def allowed(self, node_BxN: np.ndarray) -> np.ndarray:
    """``bool [B, N, K]``: the tokens each slot's node allows (none where the node is -1)."""
    node_BxN = np.asarray(node_BxN)
    out = np.zeros(node_BxN.shape + (self.num_tokens,), bool)
    for idx in zip(*np.nonzero(node_BxN >= 0)):
      out[idx][self._allowed_local(int(node_BxN[idx]))] = True
    return out

  def _item_paths(self, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(item_ids_I, node_IxD, token_IxD)`` of ``task``'s answers: each answer's item id,
    the global node before each of its tokens and that token's index into ``vocab_ids``
    (-1 past its end); cached."""
    key = ("paths", task)
    got = self._local.get(key)
    if got is None:
      paths = self._tries[task].item_paths()
      depth = max(len(t) for _, _, t in paths)
      off = self._starts[self.tasks.index(task)]
      items = np.asarray([i for i, _, _ in paths], np.int64)
      node = np.full((len(paths), depth), -1, np.int64)
      tok = np.full((len(paths), depth), -1, np.int64)
      for r, (_, nodes, toks) in enumerate(paths):
        node[r, :len(nodes)] = np.asarray(nodes) + off
        tok[r, :len(toks)] = np.searchsorted(self.vocab_ids, toks)
      got = self._local[key] = (items, node, tok)
    return got

  def soft_targets(self, probs_BxI: np.ndarray, node_BxN: np.ndarray) -> np.ndarray:
    """``float32 [B, N, K]``: a distribution over answers (``probs_BxI``, indexed by the
    answers' item ids) as the target of each slot: at slot ``j`` (node ``n``), the mass of the
    answers below each token ``n`` allows, renormalised over the answers below ``n`` -- what a
    model whose answer distribution *is* ``probs`` would give there.  Zero where the node is -1
    or no mass lies below it."""
    probs_BxI = np.asarray(probs_BxI, np.float64)
    node_BxN = np.asarray(node_BxN)
    out = np.zeros(node_BxN.shape + (self.num_tokens,), np.float32)
    for b, j in zip(*np.nonzero(node_BxN >= 0)):
      n = int(node_BxN[b, j])
      task = self.tasks[bisect.bisect_right(self._starts, n) - 1]
      items, node, tok = self._item_paths(task)
      if j >= node.shape[1]:
        continue
      below = node[:, j] == n
      if not np.any(below):
        raise ValueError(f"AnswerTries.soft_targets: slot {j} holds node {n}, which is not at "
                         f"depth {j} of task {task!r}'s trie")
      mass = np.bincount(tok[below, j], weights=probs_BxI[b, items[below]],
                         minlength=self.num_tokens)
      total = mass.sum()
      if total > 0:
        out[b, j] = mass / total
    return out

  def add_allowed(self, batch: dict) -> dict:
    """``batch`` + ``answer_allowed_BxNxK`` from its ``answer_node_BxN`` (a Grain batch map);
    a batch with soft targets (``teacher_BxI``) gets ``answer_teacher_BxNxK``
    (:meth:`soft_targets`) in their place."""
    out = dict(batch)
    out["answer_allowed_BxNxK"] = self.allowed(batch["answer_node_BxN"])
    if "teacher_BxI" in out:
      out["answer_teacher_BxNxK"] = self.soft_targets(out.pop("teacher_BxI"),
                                                      batch["answer_node_BxN"])
    return out


def target_positions(prompt_len_B: jax.Array, length: int, max_target_tokens: int):
  """``(positions_BxN, in_range_BxN)``: the N target slots from ``prompt_len - 1`` on."""
  start_B = jnp.asarray(prompt_len_B).astype(jnp.int32) - 1
  raw = start_B[:, None] + jnp.arange(max_target_tokens, dtype=jnp.int32)[None, :]
  return jnp.clip(raw, 0, length - 1), raw < length


def next_token_loss(forward: Forward, batch: Mapping[str, jax.Array], *,
                    max_target_tokens: int,
                    vocab_ids: Optional[jax.Array] = None,
                    distill_weight: float = 0.0) -> tuple[jax.Array, dict]:
  """Mean next-token NLL over the target tokens (+EOS) of the batch; metrics too.

  With ``vocab_ids`` every loss-masked target must be one of them (an answer token);
  a target outside raises at trace time only if detectable, so build ``vocab_ids`` from the
  same examples with :func:`answer_vocabulary`.  With ``answer_allowed_BxNxK`` in the batch
  (trie-normalised targets, over ``vocab_ids``) each slot's softmax covers only its allowed
  tokens, and ``N`` is that array's.

  Soft targets (``answer_teacher_BxNxK``, :meth:`AnswerTries.soft_targets`) with
  ``distill_weight`` w > 0: a slot that has one scores ``(1 - w) * NLL + w * CE(teacher,
  model)``, the cross-entropy of the model's trie-normalised distribution against the
  teacher's (``stage2/distill.py``); ``nll`` (always) and ``distill_ce`` are reported apart.
  """
  for key in ("tokens_BxL", "targets_BxL", "loss_mask_BxL", "input_mask_BxL", "prompt_len_B"):
    if key not in batch:
      raise KeyError(f"next_token_loss: batch lacks {key!r}; keys: {sorted(batch)}")
  tokens = jnp.asarray(batch["tokens_BxL"])
  L = tokens.shape[1]
  allowed = batch.get("answer_allowed_BxNxK")
  # A batch padded shorter than the longest target (one task per batch) has fewer slots.
  n_slots = min(max_target_tokens, L) if allowed is None else int(allowed.shape[1])
  if allowed is not None and (vocab_ids is None or allowed.shape[-1] != np.shape(vocab_ids)[0]):
    raise ValueError(f"next_token_loss: answer_allowed_BxNxK {tuple(allowed.shape)} needs "
                     f"vocab_ids of {allowed.shape[-1]} tokens (got "
                     f"{None if vocab_ids is None else np.shape(vocab_ids)})")
  lp_BxN, in_range_BxN = target_positions(batch["prompt_len_B"], L, n_slots)
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
  if allowed is not None:
    logits = jnp.where(jnp.asarray(allowed, bool), logits, NEG_INF)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll_BxN = -jnp.take_along_axis(logp, targets_BxN[..., None].astype(jnp.int32), axis=-1)[..., 0]
  denom = jnp.maximum(mask_BxN.sum(), 1.0)
  nll = (nll_BxN * mask_BxN).sum() / denom
  loss = nll
  acc = ((jnp.argmax(logits, -1) == targets_BxN) * mask_BxN).sum() / denom
  metrics = {"loss": loss, "nll": nll, "token_accuracy": acc, "num_tokens": mask_BxN.sum()}
  teacher = batch.get("answer_teacher_BxNxK")
  if teacher is not None and distill_weight > 0:
    if allowed is None:
      raise ValueError("next_token_loss: answer_teacher_BxNxK needs answer_allowed_BxNxK")
    q = jnp.asarray(teacher, jnp.float32)
    has_BxN = (q.sum(-1) > 0) * mask_BxN
    ce_BxN = -jnp.sum(q * jnp.where(jnp.asarray(allowed, bool), logp, 0.0), axis=-1)
    w = float(distill_weight)
    per_BxN = jnp.where(has_BxN > 0, (1.0 - w) * nll_BxN + w * ce_BxN, nll_BxN)
    loss = (per_BxN * mask_BxN).sum() / denom
    metrics.update(loss=loss,
                   distill_ce=(ce_BxN * has_BxN).sum() / jnp.maximum(has_BxN.sum(), 1.0))
  if vocab_ids is not None:
    metrics["targets_outside_vocab"] = outside
  return loss, metrics
