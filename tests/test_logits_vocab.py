"""Gemma3 ``logits_vocab_ids``: logits against a subset of the tied embedding rows equal the
matching columns of the full logits (float32 tolerance: a different XLA graph), alone, with
``logits_positions``, with a KV cache, per-row ``[B, K]`` ids, and bad shapes raise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from userllm_jax.models import gemma

TOL = dict(atol=2e-5, rtol=2e-5)


def _model():
  return gemma.Gemma3(gemma.tiny(), rngs=nnx.Rngs(3))


def test_vocab_ids_equal_sliced_full_logits():
  m = _model()
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 9)))
  full = np.asarray(m(toks))
  ids = np.array([5, 1, 127, 64, 5], np.int32)   # any order, repeats allowed
  sub = np.asarray(m(toks, logits_vocab_ids=jnp.asarray(ids)))
  assert sub.shape == (2, 9, 5)
  np.testing.assert_allclose(sub, full[..., ids], **TOL)
  # composes with logits_positions
  pos = jnp.array([[8, 2], [0, 5]])
  both = np.asarray(m(toks, logits_positions=pos, logits_vocab_ids=jnp.asarray(ids)))
  assert both.shape == (2, 2, 5)
  np.testing.assert_allclose(both[0], full[0, [8, 2]][:, ids], **TOL)
  np.testing.assert_allclose(both[1], full[1, [0, 5]][:, ids], **TOL)
  # per-row ids [B, K]
  ids_BxK = np.array([[3, 4, 9], [100, 0, 1]], np.int32)
  rows = np.asarray(m(toks, logits_positions=pos, logits_vocab_ids=jnp.asarray(ids_BxK)))
  assert rows.shape == (2, 2, 3)
  for b in range(2):
    np.testing.assert_allclose(rows[b], full[b, np.asarray(pos[b])][:, ids_BxK[b]], **TOL)
  # the logits() method directly, and under jit
  hidden = m(toks, return_hidden=True)
  np.testing.assert_allclose(np.asarray(m.logits(hidden, jnp.asarray(ids))), full[..., ids],
                             **TOL)
  graphdef, state = nnx.split(m)
  jitted = jax.jit(lambda s, t, i: nnx.merge(graphdef, s)(t, logits_vocab_ids=i))
  np.testing.assert_allclose(np.asarray(jitted(state, toks, jnp.asarray(ids))),
                             full[..., ids], **TOL)


def test_vocab_ids_with_cache():
  m = _model()
  toks = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 6)))
  ids = jnp.array([7, 8, 9, 1], jnp.int32)
  full, _ = m(toks, cache=m.init_cache(2, 8))
  sub, cache = m(toks, cache=m.init_cache(2, 8), logits_vocab_ids=ids)
  np.testing.assert_allclose(np.asarray(sub), np.asarray(full)[..., np.asarray(ids)], **TOL)
  nxt = jnp.array([[3], [4]])
  full2, _ = m(nxt, cache=cache)
  sub2, _ = m(nxt, cache=cache, logits_vocab_ids=ids)
  np.testing.assert_allclose(np.asarray(sub2), np.asarray(full2)[..., np.asarray(ids)], **TOL)


def test_vocab_ids_bad_input_raises():
  m = _model()
  toks = jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match="logits_vocab_ids"):
    m(toks, logits_vocab_ids=jnp.zeros((3, 4), jnp.int32))     # batch 3 != 2
  with pytest.raises(ValueError, match="logits_vocab_ids"):
    m(toks, logits_vocab_ids=jnp.zeros((2, 2, 2), jnp.int32))
  with pytest.raises(ValueError, match="vocab_ids"):
    m.logits(jnp.zeros((2, 3, 32)), jnp.zeros((4,), jnp.float32))
