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
