"""The one stage-2 loss: at target positions only, over the full or the answer vocabulary."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from userllm_jax.models import gemma as gemma_lib
from userllm_jax.stage2 import loss as loss_lib


def _setup():
  cfg = gemma_lib.tiny(vocab_size=48, num_layers=2, embed_dim=16, mlp_dim=32,
                       sliding_window=64)
  model = gemma_lib.Gemma3(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(5)
  B, P, Tt = 3, 4, 3
  L = P + Tt
  tokens = rng.integers(3, 48, (B, L)).astype(np.int32)
  prompt_len = np.array([4, 2, 3], np.int32)
  targets = np.roll(tokens, -1, 1)
  loss_mask = np.zeros((B, L), np.int32)
  for b in range(B):
    loss_mask[b, prompt_len[b] - 1:prompt_len[b] + 1] = 1
  batch = dict(tokens_BxL=tokens, targets_BxL=targets, loss_mask_BxL=loss_mask,
               input_mask_BxL=np.ones((B, L), np.int32), prompt_len_B=prompt_len)
  fwd = lambda t, m, lp, v: model(t, input_mask_BxL=m, logits_positions=lp,
                                  **({} if v is None else {"logits_vocab_ids": v}))
  return model, batch, fwd


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_equals_a_direct_computation_over_the_full_vocabulary():
  model, batch, fwd = _setup()
  loss, m = loss_lib.next_token_loss(fwd, batch, max_target_tokens=3)
  logits = np.asarray(model(jnp.asarray(batch["tokens_BxL"])), np.float64)
  nll = -np.take_along_axis(_log_softmax(logits), batch["targets_BxL"][..., None], -1)[..., 0]
  mask = batch["loss_mask_BxL"]
  np.testing.assert_allclose(float(loss), (nll * mask).sum() / mask.sum(), rtol=1e-5)
  assert float(m["num_tokens"]) == mask.sum()
  with pytest.raises(KeyError, match="tokens_BxL"):
    loss_lib.next_token_loss(fwd, {}, max_target_tokens=3)


def test_answer_vocabulary_loss_is_the_softmax_renormalised_over_the_answers():
  model, batch, fwd = _setup()
  mask = batch["loss_mask_BxL"].astype(bool)
  answers = [batch["targets_BxL"][mask].tolist(), [7, 9]]
  vocab = loss_lib.answer_vocabulary(answers, eos_id=1)
  assert list(vocab) == sorted(set(vocab.tolist())) and 1 in vocab
  loss, m = loss_lib.next_token_loss(fwd, batch, max_target_tokens=3, vocab_ids=vocab)
  assert float(m["targets_outside_vocab"]) == 0
  logits = np.asarray(model(jnp.asarray(batch["tokens_BxL"])), np.float64)[..., vocab]
  logp = _log_softmax(logits)
  local = np.searchsorted(vocab, batch["targets_BxL"])
  nll = -np.take_along_axis(logp, np.clip(local, 0, len(vocab) - 1)[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), (nll * mask).sum() / mask.sum(), rtol=1e-5)
  # A target outside the answer vocabulary is counted, not silently scored.
  small = loss_lib.answer_vocabulary([[7]], eos_id=1)
  _, m = loss_lib.next_token_loss(fwd, batch, max_target_tokens=3, vocab_ids=small)
  assert float(m["targets_outside_vocab"]) > 0


def test_trie_normalised_loss_on_cut_targets_equals_the_whole_targets_constrained_nll():
  """Two tasks' answer tries: the loss on targets cut to their deciding tokens equals the
  trie-constrained NLL of the *whole* targets (every later token is forced: log-prob 0),
  computed by hand from full forwards with each step renormalised over the allowed tokens."""
  from userllm_jax.eval import trie as trie_lib
  cfg = gemma_lib.tiny(vocab_size=48, num_layers=2, embed_dim=16, mlp_dim=32,
                       sliding_window=64)
  model = gemma_lib.Gemma3(cfg, rngs=nnx.Rngs(0))
  EOS = 1
  titles = [[5, 6, 7, 8, EOS], [5, 6, 9, EOS], [10, 11, 12, EOS], [5, 13, EOS]]
  genres = [[20, EOS], [21, 22, EOS], [23, EOS]]
  tries = {"next_item": trie_lib.TitleTrie(titles, eos_id=EOS),
           "fav_genre": trie_lib.TitleTrie(genres, eos_id=EOS)}
  vocab = loss_lib.answer_vocabulary(titles + genres, eos_id=EOS)
  at = loss_lib.AnswerTries(tries, vocab)
  assert at.cut("next_item", titles[0])[0] == [5, 6, 7]   # 5 6 branches into 7 / 9
  assert at.cut("next_item", titles[2])[0] == [10]
  assert at.cut("fav_genre", genres[1])[0] == [21]
  with pytest.raises(ValueError, match="not an answer of task 'fav_genre'"):
    at.cut("fav_genre", [20, 5, EOS])
  with pytest.raises(ValueError, match="no closed answer set"):
    at.cut("review", [5, EOS])

  rows = [([2, 30, 31], "next_item", titles[0]), ([2, 32], "next_item", titles[1]),
          ([2, 33, 34, 35], "fav_genre", genres[1]), ([2, 36], "next_item", titles[2])]
  B, N = len(rows), 3
  L = 4 + N
  batch = {k: np.zeros((B, L), np.int32) for k in ("tokens_BxL", "targets_BxL",
                                                   "loss_mask_BxL", "input_mask_BxL")}
  batch["prompt_len_B"] = np.array([len(p) for p, _, _ in rows], np.int32)
  nodes = np.full((B, N), -1, np.int32)
  for b, (p, task, target) in enumerate(rows):
    kept, nd = at.cut(task, target)
    seq = p + kept
    batch["tokens_BxL"][b, :len(seq)] = seq
    batch["targets_BxL"][b, :len(seq) - 1] = seq[1:]
    batch["loss_mask_BxL"][b, len(p) - 1:len(seq) - 1] = 1
    batch["input_mask_BxL"][b, :len(seq)] = 1
    nodes[b, :len(nd)] = nd
  batch["answer_node_BxN"] = nodes
  batch = at.add_allowed(batch)
  assert batch["answer_allowed_BxNxK"].shape == (B, N, len(vocab))
  fwd = lambda t, m, lp, v: model(t, input_mask_BxL=m, logits_positions=lp,
                                  **({} if v is None else {"logits_vocab_ids": v}))
  loss, m = loss_lib.next_token_loss(fwd, batch, max_target_tokens=N, vocab_ids=vocab)
  n_kept = int(batch["loss_mask_BxL"].sum())
  assert float(m["num_tokens"]) == n_kept == 3 + 3 + 1 + 1

  total = 0.0
  for p, task, target in rows:                 # whole targets, one full forward each
    seq = np.asarray([p + target], np.int32)
    logits = np.asarray(model(jnp.asarray(seq)), np.float64)[0]
    for j, t in enumerate(target):
      allowed = tries[task].allowed(target[:j])
      lp = _log_softmax(logits[len(p) - 1 + j][allowed])
      total -= lp[allowed.index(t)]
  np.testing.assert_allclose(float(loss) * n_kept, total, rtol=1e-4)
  with pytest.raises(ValueError, match="needs vocab_ids"):
    loss_lib.next_token_loss(fwd, batch, max_target_tokens=N)


def test_soft_targets_and_distillation_loss_by_hand():
  """An answer distribution as the target of each slot: the mass below each allowed token,
  renormalised below the slot's node; the loss mixes NLL and that cross-entropy."""
  from userllm_jax.eval import trie as trie_lib
  EOS = 1
  titles = [[5, 6, EOS], [5, 7, EOS], [8, EOS], [5, 6, 9, EOS]]   # items 11, 12, 13, 14
  tries = {"next_item": trie_lib.TitleTrie(titles, eos_id=EOS, item_ids=[11, 12, 13, 14])}
  vocab = loss_lib.answer_vocabulary(titles, eos_id=EOS)          # [1, 5, 6, 7, 8, 9]
  at = loss_lib.AnswerTries(tries, vocab)
  col = {int(t): k for k, t in enumerate(vocab)}
  probs = np.zeros((1, 16))
  probs[0, [11, 12, 13, 14]] = [0.4, 0.2, 0.3, 0.1]
  kept, nodes = at.cut("next_item", titles[0])         # 5 6 then EOS / 9 branch
  assert kept == [5, 6, EOS]
  q = at.soft_targets(probs, np.asarray([nodes]))[0]
  want = np.zeros((3, len(vocab)))
  want[0, col[5]], want[0, col[8]] = 0.7, 0.3           # items below '5': 11, 12, 14
  want[1, col[6]], want[1, col[7]] = 0.5 / 0.7, 0.2 / 0.7
  want[2, col[EOS]], want[2, col[9]] = 0.4 / 0.5, 0.1 / 0.5
  np.testing.assert_allclose(q, want, rtol=1e-6)
  with pytest.raises(ValueError, match="not at depth 1"):
    at.soft_targets(probs, np.asarray([[0, 0]]))

  # The loss on a batch of that one example, from fixed logits over the answer vocabulary.
  B, N, P = 1, 3, 2
  L = P + N
  batch = {"tokens_BxL": np.asarray([[2, 30, 5, 6, EOS]], np.int32),
           "targets_BxL": np.asarray([[30, 5, 6, EOS, 0]], np.int32),
           "loss_mask_BxL": np.asarray([[0, 1, 1, 1, 0]], np.int32),
           "input_mask_BxL": np.ones((B, L), np.int32), "prompt_len_B": np.asarray([P]),
           "answer_node_BxN": np.asarray([nodes], np.int32),
           "teacher_BxI": probs.astype(np.float32)}
  batch = at.add_allowed(batch)
  assert "teacher_BxI" not in batch and batch["answer_teacher_BxNxK"].shape == (B, N, len(vocab))
  logits = np.random.default_rng(0).normal(size=(B, N, len(vocab)))
  fwd = lambda t, m, lp, v: jnp.asarray(logits, jnp.float32)
  w = 0.25
  loss, m = loss_lib.next_token_loss(fwd, batch, max_target_tokens=N, vocab_ids=vocab,
                                     distill_weight=w)
  nll = ce = 0.0
  for j in range(N):
    allowed = np.flatnonzero(batch["answer_allowed_BxNxK"][0, j])
    lp = _log_softmax(logits[0, j, allowed])
    nll -= lp[list(allowed).index(col[kept[j]])]
    ce -= (want[j, allowed] * lp).sum()
  np.testing.assert_allclose(float(m["nll"]), nll / N, rtol=1e-5)
  np.testing.assert_allclose(float(m["distill_ce"]), ce / N, rtol=1e-5)
  np.testing.assert_allclose(float(loss), ((1 - w) * nll + w * ce) / N, rtol=1e-5)
  # weight 0: the teacher is ignored, the loss is the NLL
  loss0, _ = loss_lib.next_token_loss(fwd, batch, max_target_tokens=N, vocab_ids=vocab)
  np.testing.assert_allclose(float(loss0), nll / N, rtol=1e-5)
