"""Restricted-vocabulary constrained decoding, closed-set scoring, compile-once-per-shape and
the prefill / total timing split (models/sampler.py with eval/trie.TrieConstraint).

References: the full-vocabulary path (``restrict_vocab=False``: all V logits, then the trie
mask), the older ``logits_processor=make_sampler_processor`` path, and brute-force loops of
full forwards without cache.  Different XLA graphs: scores compared with float32 tolerances.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from userllm_jax.eval import trie as trie_lib
from userllm_jax.models import gemma
from userllm_jax.models import sampler as sampler_lib
from userllm_jax.models.sampler import Sampler, score_candidates

V, EOS, PAD = 64, 1, 0
PROMPTS = [[2, 5, 9, 11, 3, 17, 40], [2, 33], [2, 8, 8, 8, 21]]


@functools.lru_cache(maxsize=None)
def _model(cross=()):
  cfg = gemma.tiny(vocab_size=V, num_layers=2, global_every=2, cross_attention_layers=cross)
  m = gemma.Gemma3(cfg, rngs=nnx.Rngs(7))
  rng = np.random.default_rng(0)
  for path, var in nnx.iter_graph(m):
    if isinstance(var, nnx.Param) and path and path[-1] == "scale":
      var[...] = jnp.asarray(rng.normal(0, 0.3, var.shape), jnp.float32)
  for x in m.xattn.values():
    x.attn_gate[...] = jnp.array(0.8)
  return m


def _titles(n=14, seed=0):
  """Random 'titles' over tokens 3..29 (so the trie's token set is a strict subset of V),
  lengths 1..6, sharing prefixes, each + EOS."""
  rng = np.random.default_rng(seed)
  seqs = []
  while len(seqs) < n:
    base = seqs[rng.integers(len(seqs))][:-1] if seqs and rng.random() < 0.5 else []
    cut = rng.integers(0, len(base) + 1)
    s = list(base[:cut]) + [int(t) for t in rng.integers(3, 30, rng.integers(1, 4))]
    s = s[:6] + [EOS]
    if s not in seqs:
      seqs.append(s)
  return seqs


@pytest.fixture(scope="module")
def con():
  t = trie_lib.TitleTrie(_titles(), eos_id=EOS, pad_id=PAD)
  return t, t.to_constraint(V)


def test_constraint_views_agree(con):
  t, c = con
  vocab = np.asarray(c.vocab_ids)
  want = sorted({tok for s in _titles() for tok in s} | {EOS, PAD})
  np.testing.assert_array_equal(vocab, want)
  assert c.num_tokens == len(want) < V
  # from every reachable prefix, the local mask maps to the same real tokens as the full one
  for s in _titles():
    for n in range(len(s) + 1):
      node = jnp.zeros((1,), jnp.int32)
      node_f = node
      for tok in s[:n]:
        node = c.advance(node, jnp.array([int(np.searchsorted(vocab, tok))]), True)
        node_f = c.advance(node_f, jnp.array([tok]), False)
      assert int(node[0]) == int(node_f[0])
      full = np.nonzero(np.asarray(c.allowed(node_f, False))[0])[0]
      loc = vocab[np.asarray(c.allowed(node, True))[0]]
      np.testing.assert_array_equal(loc, full)
      np.testing.assert_array_equal(full, t.allowed(s[:n]))
  # from TrieArrays gives the same constraint
  c2 = trie_lib.make_constraint(t.to_arrays(V))
  np.testing.assert_array_equal(np.asarray(c2.vocab_ids), vocab)
  with pytest.raises(ValueError, match="vocab_size"):
    trie_lib.make_constraint(t)
  with pytest.raises(ValueError, match="trie"):
    trie_lib.make_constraint([1, 2])


def _live(b, i, k):
  return b.scores_BxK[i, k] > -1e29


def test_restricted_beam_search_equals_full_vocab(con):
  t, c = con
  s = Sampler(_model(), eos_id=EOS, pad_id=PAD)
  kw = dict(num_beams=4, max_new_tokens=8)
  r = s.beam_search(PROMPTS, trie=c, **kw)
  f = s.beam_search(PROMPTS, trie=c, restrict_vocab=False, **kw)
  p = s.beam_search(PROMPTS, logits_processor=trie_lib.make_sampler_processor(t.to_arrays(V)),
                    **kw)
  for ref in (f, p):
    np.testing.assert_array_equal(r.tokens_BxKxN, ref.tokens_BxKxN)
    np.testing.assert_array_equal(r.lengths_BxK, ref.lengths_BxK)
    np.testing.assert_array_equal(r.finished_BxK, ref.finished_BxK)
    np.testing.assert_allclose(r.scores_BxK, ref.scores_BxK, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(r.logprobs_BxK, ref.logprobs_BxK, rtol=1e-5, atol=1e-4)
  n_live = 0
  for i in range(len(PROMPTS)):
    for k in range(4):
      if _live(r, i, k):
        n_live += 1
        assert t.is_complete(r.tokens_BxKxN[i, k].tolist())
  assert n_live >= 8
  # with a length penalty too
  r2 = s.beam_search(PROMPTS, trie=c, length_penalty=1.0, **kw)
  f2 = s.beam_search(PROMPTS, trie=c, restrict_vocab=False, length_penalty=1.0, **kw)
  np.testing.assert_array_equal(r2.tokens_BxKxN, f2.tokens_BxKxN)
  np.testing.assert_allclose(r2.scores_BxK, f2.scores_BxK, rtol=1e-5, atol=1e-4)


def test_forced_beams_finish_early_with_their_exact_scores(con):
  """finish_forced (default): a beam at a forced trie node finishes at once, its path
  written out.  Its score is the sequence's exact trie-constrained log-probability (brute
  force: score_candidates), the loop runs fewer steps, and at every rank it scores at
  least what the plain token-by-token beam search finds (it keeps what the plain search may
  push out)."""
  t, c = con
  s = Sampler(_model(), eos_id=EOS, pad_id=PAD)
  kw = dict(num_beams=4, max_new_tokens=8, trie=c)
  fast = s.beam_search(PROMPTS, **kw)
  plain = s.beam_search(PROMPTS, finish_forced=False, **kw)
  full = s.beam_search(PROMPTS, restrict_vocab=False, **kw)
  np.testing.assert_array_equal(fast.tokens_BxKxN, full.tokens_BxKxN)
  assert fast.steps < plain.steps
  titles = _titles()
  exact = s.score_candidates(PROMPTS, titles, normalize="trie").logprobs_BxC
  for b in range(len(PROMPTS)):
    got = []
    for k in range(4):
      n = int(fast.lengths_BxK[b, k])
      row = fast.tokens_BxKxN[b, k, :n].tolist()
      assert fast.finished_BxK[b, k] and row in titles
      np.testing.assert_allclose(fast.logprobs_BxK[b, k], exact[b, titles.index(row)],
                                 atol=1e-4)
      got.append(row)
    assert len({tuple(r) for r in got}) == 4
    # the best title of the whole catalogue is found, and no rank is worse than plain's
    assert got[0] == titles[int(np.argmax(exact[b]))]
    assert np.all(fast.scores_BxK[b] >= plain.scores_BxK[b] - 1e-4)


def test_restricted_greedy_equals_full_vocab(con):
  t, c = con
  s = Sampler(_model(), eos_id=EOS, pad_id=PAD)
  r = s.generate(PROMPTS, max_new_tokens=8, trie=c)
  f = s.generate(PROMPTS, max_new_tokens=8, trie=c, restrict_vocab=False)
  np.testing.assert_array_equal(r.tokens_BxN, f.tokens_BxN)
  np.testing.assert_array_equal(r.lengths_B, f.lengths_B)
  np.testing.assert_allclose(r.logprobs_BxN, f.logprobs_BxN, rtol=1e-5, atol=1e-5)
  for row in r.tokens_BxN:
    assert t.is_complete(row.tolist())
  # beam search with one beam is greedy
  b = s.beam_search(PROMPTS, num_beams=1, max_new_tokens=8, trie=c)
  np.testing.assert_array_equal(b.tokens_BxKxN[:, 0], r.tokens_BxN)
  np.testing.assert_allclose(b.logprobs_BxK[:, 0], r.logprobs_BxN.sum(1), atol=1e-4)
  # sampling inside the restricted vocabulary stays on the trie
  smp = s.generate(PROMPTS, max_new_tokens=8, trie=c, temperature=1.0, top_k=5,
                   rng=jax.random.key(1))
  for row in smp.tokens_BxN:
    assert t.is_complete(row.tolist())


def test_trie_argument_errors(con):
  t, c = con
  s = Sampler(_model(), eos_id=EOS, pad_id=PAD)
  proc = trie_lib.make_sampler_processor(t.to_arrays(V))
  with pytest.raises(ValueError, match="not both"):
    s.generate(PROMPTS, max_new_tokens=2, trie=c, logits_processor=proc)
  with pytest.raises(ValueError, match="TrieConstraint"):
    s.beam_search(PROMPTS, num_beams=2, max_new_tokens=2, trie=t.to_arrays(V))
  with pytest.raises(ValueError, match="prompt_bucket"):
    Sampler(_model(), prompt_bucket=-1)
  with pytest.raises(ValueError, match="normalize"):
    s.score_candidates(PROMPTS, [[3, EOS]], normalize="softmax")
  with pytest.raises(ValueError, match=r"candidates\[1\]"):
    s.score_candidates(PROMPTS, [[3, EOS], []])
  with pytest.raises(ValueError, match=r"candidates\[0\]"):
    s.score_candidates(PROMPTS, [[3, V + 5]])


# ---------------------------------------------------------------------------------------------
# Closed answer sets.

CANDS = [[5, 6, EOS], [5, 7, EOS], [9, EOS], [12, 13, 14, EOS], [5, EOS]]


FULL_LEN = 16


@functools.partial(jax.jit, static_argnames="graphdef")
def _full(graphdef, state, tokens, prefix=None, media=None):
  return nnx.merge(graphdef, state)(tokens, prefix_embeds_BxPxD=prefix, media_BxMxD=media)


def _brute(m, prompts, cands, normalize, prefix=None, media=None):
  """Loop over (prompt, candidate): one full forward each (jitted, no cache, no padding
  masks; right-filled to FULL_LEN with token 0, which causal attention keeps out of the
  earlier rows), in float64 on the host from there."""
  union = sorted({t for cc in cands for t in cc})
  graphdef, state = nnx.split(m)
  out = np.zeros((len(prompts), len(cands)))
  for b, p in enumerate(prompts):
    for ci, cand in enumerate(cands):
      seq = np.zeros((1, FULL_LEN), np.int32)
      seq[0, :len(p) + len(cand)] = list(p) + list(cand)
      logits = np.asarray(_full(
          graphdef, state, jnp.asarray(seq),
          None if prefix is None else jnp.asarray(prefix[b:b + 1]),
          None if media is None else jnp.asarray(media[b:b + 1])), np.float64)[0]
      total = 0.0
      for t, tok in enumerate(cand):
        row = logits[len(p) - 1 + t]
        if normalize == "full":
          allowed = list(range(V))
        elif normalize == "union":
          allowed = union
        else:
          allowed = sorted({d[t] for d in cands if len(d) > t and d[:t] == cand[:t]})
        z = np.log(np.sum(np.exp(row[allowed] - row[allowed].max()))) + row[allowed].max()
        total += row[tok] - z
      out[b, ci] = total
  return out


@pytest.mark.parametrize("normalize", ["union", "trie", "full"])
def test_score_candidates_matches_brute_force(normalize):
  m = _model()
  got = score_candidates(m, PROMPTS, CANDS, normalize=normalize, pad_id=PAD)
  assert got.shape == (3, len(CANDS))
  np.testing.assert_allclose(got, _brute(m, PROMPTS, CANDS, normalize), rtol=1e-4, atol=1e-4)
  if normalize == "trie":   # a proper trie: the candidates' probabilities sum to 1
    np.testing.assert_allclose(np.exp(got).sum(1), 1.0, atol=1e-4)


def test_score_candidates_with_soft_prompt_and_media():
  m = _model(cross=(0,))
  rng = np.random.default_rng(3)
  prefix = rng.normal(0, 1, (3, 4, 32)).astype(np.float32)
  media = rng.normal(0, 1, (3, 2, 32)).astype(np.float32)
  got = score_candidates(m, PROMPTS, CANDS, prefix_embeds_BxPxD=prefix, media_BxMxD=media)
  want = _brute(m, PROMPTS, CANDS, "union", prefix=prefix, media=media)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # each conditioning input matters (else this test would not test it); float error ~1e-6
  no_media = score_candidates(m, PROMPTS, CANDS, prefix_embeds_BxPxD=prefix,
                              media_BxMxD=np.zeros_like(media))
  no_prefix = score_candidates(m, PROMPTS, CANDS, media_BxMxD=media)
  assert np.abs(no_media - got).max() > 1e-3
  assert np.abs(no_prefix - got).max() > 1e-3


def test_trie_scores_equal_constrained_beam_logprobs():
  """normalize='trie' is the quantity a trie-constrained beam search ranks by."""
  m = _model()
  t = trie_lib.TitleTrie(CANDS, eos_id=EOS, pad_id=PAD)
  s = Sampler(m, eos_id=EOS, pad_id=PAD)
  beams = s.beam_search(PROMPTS, num_beams=len(CANDS), max_new_tokens=5,
                        trie=t.to_constraint(V))
  scores = s.score_candidates(PROMPTS, CANDS, normalize="trie").logprobs_BxC
  for b in range(len(PROMPTS)):
    for k in range(len(CANDS)):
      row = beams.tokens_BxKxN[b, k, :beams.lengths_BxK[b, k]].tolist()
      np.testing.assert_allclose(beams.logprobs_BxK[b, k], scores[b, CANDS.index(row)],
                                 atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Compile once per shape; timing.


def test_prompt_lengths_in_one_bucket_compile_once(con):
  _, c = con
  s = Sampler(_model(), eos_id=EOS, pad_id=PAD, prompt_bucket=16)
  counts = sampler_lib.TRACE_COUNTS
  # warm the shapes with one prompt length (bucket 16), then two other lengths in it
  s.beam_search([[2] * 3, [2] * 5], num_beams=2, max_new_tokens=4, trie=c)
  s.score_candidates([[2] * 3, [2] * 5], CANDS)
  before = dict(counts)
  a = s.beam_search([[2, 5, 9], [2, 4, 4, 4, 4, 4, 4]], num_beams=2, max_new_tokens=4, trie=c)
  b = s.beam_search([[2] * 16, [2, 7]], num_beams=2, max_new_tokens=4, trie=c)
  s.score_candidates([[2, 5, 9, 9, 9, 9, 9, 9, 9, 9, 9], [2]], CANDS)
  assert dict(counts) == before, (before, dict(counts))
  assert a.tokens_BxKxN.shape == b.tokens_BxKxN.shape
  # a prompt past the bucket compiles a new program (once)
  s.beam_search([[2] * 17, [2]], num_beams=2, max_new_tokens=4, trie=c)
  assert counts["prefill"] == before["prefill"] + 1
  assert counts["beam_search"] == before["beam_search"] + 1
  # the bucket does not change results: same prompt with bucketing off
  s0 = Sampler(_model(), eos_id=EOS, pad_id=PAD, prompt_bucket=0)
  a0 = s0.beam_search([[2, 5, 9], [2, 4, 4, 4, 4, 4, 4]], num_beams=2, max_new_tokens=4,
                      trie=c)
  np.testing.assert_array_equal(a0.tokens_BxKxN, a.tokens_BxKxN)
  np.testing.assert_allclose(a0.scores_BxK, a.scores_BxK, atol=1e-4)


def test_timing_split(con):
  _, c = con
  s = Sampler(_model(), eos_id=EOS, pad_id=PAD)
  for out in (s.generate(PROMPTS, max_new_tokens=4, trie=c),
              s.beam_search(PROMPTS, num_beams=2, max_new_tokens=4, trie=c),
              s.score_candidates(PROMPTS, CANDS)):
    assert 0 < out.timing.prefill_s <= out.timing.total_s
