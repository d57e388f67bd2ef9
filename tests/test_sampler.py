"""Generation: KV-cache decoding vs full recomputation, padding, beam search, sampling, stop
tokens, logits processors, soft prompt and cross-attention inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from userllm_jax.models import gemma
from userllm_jax.models.sampler import Sampler, pad_prompts

V = 64


@functools.lru_cache(maxsize=None)
def _model(cross=()):
  # 2 layers: layer 0 local (window 4), layer 1 global; prompts + outputs exceed the window.
  cfg = gemma.tiny(vocab_size=V, num_layers=2, global_every=2, cross_attention_layers=cross)
  m = gemma.Gemma3(cfg, rngs=nnx.Rngs(7))
  rng = np.random.default_rng(0)
  for path, var in nnx.iter_graph(m):
    if isinstance(var, nnx.Param) and path and path[-1] == "scale":
      var[...] = jnp.asarray(rng.normal(0, 0.3, var.shape), jnp.float32)
  for x in m.xattn.values():
    x.attn_gate[...] = jnp.array(0.8)
  return m


@functools.partial(jax.jit, static_argnames="graphdef")
def _full(graphdef, state, tokens, prefix=None, pmask=None, media=None):
  return nnx.merge(graphdef, state)(tokens, prefix_embeds_BxPxD=prefix, prefix_mask_BxP=pmask,
                                    media_BxMxD=media)


FULL_LEN = 24


def full_logprobs(m, seq, **kw):
  """log-softmax logits [len(seq), V] recomputed without cache and without padding masks.

  The sequence is right-filled to FULL_LEN with token 0 (one compilation for every length):
  with causal attention the trailing tokens cannot affect the earlier rows.
  """
  graphdef, state = nnx.split(m)
  padded = np.zeros((1, FULL_LEN), np.int32)
  padded[0, :len(seq)] = seq
  out = _full(graphdef, state, jnp.asarray(padded), **kw)
  return np.asarray(jax.nn.log_softmax(out))[0, :len(seq)]


PROMPTS = [[2, 5, 9, 11, 3, 17, 40], [2, 33], [2, 8, 8, 8, 1 + 20]]


def test_greedy_matches_full_recomputation():
  m = _model()
  out = Sampler(m, eos_id=1).generate(PROMPTS, max_new_tokens=8)
  assert out.tokens_BxN.shape == (3, 8)
  for i, p in enumerate(PROMPTS):
    n = out.lengths_B[i]
    seq = list(p) + list(out.tokens_BxN[i, :n])
    lp = full_logprobs(m, seq)
    for t in range(n):
      row = lp[len(p) - 1 + t]
      assert out.tokens_BxN[i, t] == row.argmax()
      np.testing.assert_allclose(out.logprobs_BxN[i, t], row.max(), atol=1e-4)
    assert np.all(out.tokens_BxN[i, n:] == 0)


def test_padded_batch_equals_each_prompt_alone():
  m = _model()
  s = Sampler(m)
  batch = s.generate(PROMPTS, max_new_tokens=8)
  for i in (1, 2):   # the padded ones
    p = PROMPTS[i]
    alone = s.generate([p], max_new_tokens=8)
    np.testing.assert_array_equal(batch.tokens_BxN[i], alone.tokens_BxN[0])
    np.testing.assert_allclose(batch.logprobs_BxN[i], alone.logprobs_BxN[0], atol=1e-5)
  # right-padded arrays are re-aligned: same result
  toks, mask = np.zeros((3, 7), np.int32), np.zeros((3, 7), bool)
  for i, p in enumerate(PROMPTS):
    toks[i, :len(p)], mask[i, :len(p)] = p, True
  again = s.generate((toks, mask), max_new_tokens=8)
  np.testing.assert_array_equal(again.tokens_BxN, batch.tokens_BxN)


def test_pad_prompts_left_pads_and_rejects_empty():
  t, mk = pad_prompts([[5, 6], [7]], pad_id=0)
  np.testing.assert_array_equal(t, [[5, 6], [0, 7]])
  np.testing.assert_array_equal(mk, [[True, True], [False, True]])
  with pytest.raises(ValueError, match="empty"):
    pad_prompts([[1], []])


def test_beam_search_k1_equals_greedy_and_scores_are_logprobs():
  m = _model()
  s = Sampler(m, eos_id=1)
  g = s.generate(PROMPTS, max_new_tokens=8)
  b = s.beam_search(PROMPTS, num_beams=1, max_new_tokens=8)
  np.testing.assert_array_equal(b.tokens_BxKxN[:, 0], g.tokens_BxN)
  np.testing.assert_allclose(b.logprobs_BxK[:, 0], g.logprobs_BxN.sum(1), atol=1e-4)
  b4 = s.beam_search(PROMPTS, num_beams=4, max_new_tokens=8)
  assert b4.tokens_BxKxN.shape == (3, 4, 8)
  for i, p in enumerate(PROMPTS):
    # scores sorted, best >= greedy, distinct sequences, scores = recomputed log-probs
    assert np.all(np.diff(b4.scores_BxK[i]) <= 1e-6)
    assert b4.scores_BxK[i, 0] >= g.logprobs_BxN[i].sum() - 1e-4
    assert len({tuple(r) for r in b4.tokens_BxKxN[i]}) == 4
    for k in range(4):
      n = b4.lengths_BxK[i, k]
      gen = b4.tokens_BxKxN[i, k, :n]
      lp = full_logprobs(m, list(p) + list(gen))
      want = sum(lp[len(p) - 1 + t, gen[t]] for t in range(n))
      np.testing.assert_allclose(b4.logprobs_BxK[i, k], want, atol=1e-4)


def test_beam_search_finds_exhaustive_best_on_a_peaked_case():
  """With vocabulary restricted to 4 tokens and 3 steps, K=16 beams keep every prefix of
  length <= 2 alive, so the best beam is the exhaustive argmax over 64 sequences."""
  m = _model()
  allowed = jnp.zeros((V,), bool).at[jnp.array([5, 6, 7, 9])].set(True)
  proc = lambda toks, logits: jnp.broadcast_to(allowed, logits.shape)
  p = PROMPTS[0]
  b = Sampler(m, eos_id=1).beam_search([p], num_beams=16, max_new_tokens=3,
                                       logits_processor=proc)
  best, best_seq = -np.inf, None
  toks = [5, 6, 7, 9]
  for a in toks:
    for c in toks:
      for d in toks:
        lp = full_logprobs(m, list(p) + [a, c, d])
        # renormalised over the allowed set, as the mask does
        n = lambda row: row - np.log(np.exp(row[toks]).sum())
        sc = (n(lp[len(p) - 1])[a] + n(lp[len(p)])[c] + n(lp[len(p) + 1])[d])
        if sc > best:
          best, best_seq = sc, [a, c, d]
  np.testing.assert_array_equal(b.tokens_BxKxN[0, 0], best_seq)
  np.testing.assert_allclose(b.scores_BxK[0, 0], best, atol=1e-4)
  assert set(b.tokens_BxKxN[0].ravel()) <= set(toks)


def test_stop_tokens_and_processor_hook():
  m = _model()
  s = Sampler(m, eos_id=1)

  def force(toks, logits):  # emit 30 at step 0, 31 at step 1, then the stop token 50
    step = jnp.sum(toks >= 0, axis=1)
    target = jnp.where(step == 0, 30, jnp.where(step == 1, 31, 50))
    return jnp.arange(V)[None] == target[:, None]   # boolean allowed-token mask

  out = s.generate(PROMPTS, max_new_tokens=8, stop_tokens=[50], logits_processor=force)
  np.testing.assert_array_equal(out.tokens_BxN, [[30, 31, 50, 0, 0, 0, 0, 0]] * 3)
  np.testing.assert_array_equal(out.lengths_B, [3, 3, 3])
  assert out.finished_B.all()
  # eos also stops; beams respect stops and the processor too
  b = s.beam_search(PROMPTS, num_beams=2, max_new_tokens=8, stop_tokens=[50],
                    logits_processor=force)
  np.testing.assert_array_equal(b.tokens_BxKxN[:, 0], [[30, 31, 50, 0, 0, 0, 0, 0]] * 3)
  assert b.finished_BxK[:, 0].all() and (b.lengths_BxK[:, 0] == 3).all()


def test_sampling_settings():
  m = _model()
  s = Sampler(m)
  g = s.generate(PROMPTS, max_new_tokens=8)
  with pytest.raises(ValueError, match="rng"):
    s.generate(PROMPTS, max_new_tokens=8, temperature=1.0)
  k = jax.random.key(3)
  # top_k=1 and a tiny top_p are greedy whatever the temperature
  np.testing.assert_array_equal(
      s.generate(PROMPTS, max_new_tokens=8, temperature=2.0, top_k=1, rng=k).tokens_BxN,
      g.tokens_BxN)
  np.testing.assert_array_equal(
      s.generate(PROMPTS, max_new_tokens=8, temperature=2.0, top_p=1e-6, rng=k).tokens_BxN,
      g.tokens_BxN)
  a = s.generate(PROMPTS, max_new_tokens=8, temperature=1.0, rng=k).tokens_BxN
  np.testing.assert_array_equal(a, s.generate(PROMPTS, max_new_tokens=8, temperature=1.0,
                                              rng=k).tokens_BxN)
  assert np.any(a != s.generate(PROMPTS, max_new_tokens=8, temperature=1.0,
                                rng=jax.random.key(4)).tokens_BxN)


def test_sampling_distribution_first_token():
  """Empirical first-token frequencies match softmax(logits / T) (and top-k truncation)."""
  m = _model()
  s = Sampler(m)
  p = PROMPTS[1]
  n = 4000
  lp = full_logprobs(m, p)[-1]
  out = s.generate([p] * n, max_new_tokens=1, temperature=0.7, rng=jax.random.key(0))
  probs = np.exp(lp / 0.7 - np.logaddexp.reduce(lp / 0.7))
  freq = np.bincount(out.tokens_BxN[:, 0], minlength=V) / n
  assert np.abs(freq - probs).max() < 4 * np.sqrt(probs.max() / n) + 1e-3
  out = s.generate([p] * n, max_new_tokens=1, temperature=1.0, top_k=3, rng=jax.random.key(1))
  top3 = set(np.argsort(-lp)[:3])
  assert set(out.tokens_BxN[:, 0]) <= top3
  q = np.exp(lp[sorted(top3)] - np.logaddexp.reduce(lp[sorted(top3)]))
  freq = np.bincount(out.tokens_BxN[:, 0], minlength=V)[sorted(top3)] / n
  assert np.abs(freq - q).max() < 4 * np.sqrt(0.25 / n)
  # top-p keeps the smallest prefix of the sorted distribution with mass >= p
  pr = np.exp(lp)
  order = np.argsort(-pr)
  cut = int(np.searchsorted(np.cumsum(pr[order]), 0.5) + 1)
  out = s.generate([p] * n, max_new_tokens=1, temperature=1.0, top_p=0.5,
                   rng=jax.random.key(2))
  assert set(out.tokens_BxN[:, 0]) <= set(order[:cut])


def test_soft_prompt_and_media_in_generation():
  m = _model(cross=(0,))
  rng = np.random.default_rng(5)
  prefix = rng.normal(0, 1, (1, 3, 32)).astype(np.float32)
  media = rng.normal(0, 1, (1, 2, 32)).astype(np.float32)
  s = Sampler(m)
  p = PROMPTS[0]
  ref = s.generate([p], max_new_tokens=6, prefix_embeds_BxPxD=prefix, media_BxMxD=media)
  # batch: example 0 = the same with 2 padded prefix slots; example 1 = another prompt
  pre_b = np.concatenate([np.concatenate([prefix[0], rng.normal(0, 9, (2, 32))], 0)[None],
                          rng.normal(0, 1, (1, 5, 32))], 0).astype(np.float32)
  pmask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  med_b = np.concatenate([media, rng.normal(0, 1, (1, 2, 32)).astype(np.float32)], 0)
  out = s.generate([p, PROMPTS[1]], max_new_tokens=6, prefix_embeds_BxPxD=pre_b,
                   prefix_mask_BxP=pmask, media_BxMxD=med_b)
  np.testing.assert_array_equal(out.tokens_BxN[0], ref.tokens_BxN[0])
  # and the tokens are what full recomputation (prefix + media) picks
  seq = list(p) + list(ref.tokens_BxN[0])
  graphdef, state = nnx.split(m)
  lp = np.asarray(_full(graphdef, state, jnp.asarray(seq)[None], jnp.asarray(prefix),
                        jnp.ones((1, 3), bool), jnp.asarray(media)))[0]
  np.testing.assert_array_equal(lp[len(p) - 1:-1].argmax(-1), ref.tokens_BxN[0])
  b = s.beam_search([p], num_beams=1, max_new_tokens=6, prefix_embeds_BxPxD=prefix,
                    media_BxMxD=media)
  np.testing.assert_array_equal(b.tokens_BxKxN[0, 0], ref.tokens_BxN[0])


def test_dead_end_processor_gives_impossible_beams():
  """A processor that allows nothing after the first token must not yield finite scores."""
  m = _model()

  def dead_end(toks, logits):
    step = jnp.sum(toks >= 0, axis=1)
    allowed = (step == 0)[:, None] & (jnp.arange(V)[None] < 3)
    return jnp.broadcast_to(allowed, logits.shape)

  b = Sampler(m, eos_id=1).beam_search(PROMPTS, num_beams=2, max_new_tokens=8,
                                       logits_processor=dead_end)
  # only the eos-terminated single-token hypothesis (token 1 allowed at step 0) is possible
  np.testing.assert_array_equal(b.tokens_BxKxN[:, 0, :2], [[1, 0]] * 3)
  assert b.finished_BxK[:, 0].all() and np.all(b.scores_BxK[:, 0] > -1e3)
  assert np.all(b.scores_BxK[:, 1] < -1e29)
