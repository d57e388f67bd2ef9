"""Incremental encoding (models/encoder.py init_cache / encode_append) equals a full encode."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from userllm_jax.models import encoder as enc

FEATURE_SETS = [("item",), ("item", "genre"), ("item", "rating"), ("item", "timegap"),
                ("item", "genre", "rating", "timegap")]


def _cfg(features, fusion, position, combine="sum", max_len=12):
  return enc.EncoderConfig(num_items=40, num_genres=7, num_ratings=7, num_timegap_buckets=9,
                           features=features, embed_dim=16, num_layers=2, num_heads=2,
                           dropout=0.0, max_len=max_len, position=position, fusion=fusion,
                           combine=combine)


def _history(rng, T, G=3):
  return {"item_BxT": rng.integers(2, 40, (1, T)).astype(np.int32),
          "genre_BxTxG": np.where(rng.random((1, T, G)) < 0.7,
                                  rng.integers(2, 7, (1, T, G)), 0).astype(np.int32),
          "rating_BxT": rng.integers(2, 7, (1, T)).astype(np.int32),
          "timegap_BxT": rng.integers(2, 9, (1, T)).astype(np.int32)}


def _slice(h, a, b):
  return {k: v[:, a:b] for k, v in h.items()}


@pytest.mark.parametrize("features,fusion,position", [
    (f, fu, p) for f, fu, p in itertools.product(FEATURE_SETS, ("early", "late"),
                                                 ("learned", "rotary"))])
def test_incremental_equals_full_encode(features, fusion, position):
  combine = "concat" if len(features) > 1 and fusion == "late" else "sum"
  cfg = _cfg(features, fusion, position, combine)
  model = enc.UserEncoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  T = cfg.max_len
  hist = _history(rng, T)
  full_h, full_u = model(hist)
  cache = enc.init_cache(model, 1)
  done = 0
  for k in (1, 3, 2, 1, 5):   # chunks; the last one fills the window exactly
    k = min(k, T - done)
    cache = enc.encode_append(model, cache, _slice(hist, done, done + k))
    done += k
    if done == 4 and features == FEATURE_SETS[-1]:   # a partial window, checked once per combo
      np.testing.assert_allclose(np.asarray(cache.h_BxCxD[:, :done]),
                                 np.asarray(model(_slice(hist, 0, done))[0]), atol=2e-5,
                                 rtol=1e-4)
  assert done == T and int(cache.length_B[0]) == T
  np.testing.assert_allclose(np.asarray(cache.h_BxCxD), np.asarray(full_h), atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(enc.cache_user_vector(cache)), np.asarray(full_u),
                             atol=2e-5, rtol=1e-4)


def test_padded_appends_and_batch_rows_are_independent():
  cfg = _cfg(("item", "genre", "rating", "timegap"), "early", "rotary")
  model = enc.UserEncoder(cfg, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(2)
  a, b = _history(rng, 8), _history(rng, 8)
  both = {k: np.concatenate([a[k], b[k]]) for k in a}
  cache = enc.init_cache(model, 2)
  # row 0 appends 3 then 4, row 1 appends 5 then 2 (padded chunk of 5 / 4 columns)
  cache = enc.encode_append(model, cache, _slice(both, 0, 5), jnp.array([3, 5]))
  second = {k: np.concatenate([a[k][:, 3:7], np.pad(b[k][:, 5:7], [(0, 0), (0, 2)] +
                                                        [(0, 0)] * (b[k].ndim - 2))])
            for k in a}
  cache = enc.encode_append(model, cache, second, jnp.array([4, 2]))
  assert cache.length_B.tolist() == [7, 7]
  for row, h in ((0, a), (1, b)):
    want = np.asarray(model(_slice(h, 0, 7))[0])[0]
    np.testing.assert_allclose(np.asarray(cache.h_BxCxD[row, :7]), want, atol=2e-5, rtol=1e-4)
  assert not np.asarray(cache.h_BxCxD[:, 7:]).any()


def test_learned_capacity_beyond_max_len_raises():
  model = enc.UserEncoder(_cfg(("item",), "early", "learned"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_len"):
    enc.init_cache(model, 1, capacity=13)
