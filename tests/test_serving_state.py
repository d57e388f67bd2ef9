"""User state (window rule), the SQLite store (versions, SIGKILL mid-write) and recomputation
of a state written with another encoder."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from flax import nnx

from userllm_jax.models import encoder as enc
from userllm_jax.serving import engine as engine_lib
from userllm_jax.serving import state as state_lib
from userllm_jax.serving import store as store_lib
from userllm_jax.serving import tiny

G = np.array([[0, 0], [0, 0]] + [[2 + i % 4, 2 + (i + 1) % 4 if i % 3 else 0]
                                  for i in range(38)], np.int32)


ALL = ("item", "genre", "rating", "timegap")


def _encoder(position="learned", fusion="early", seed=0, features=ALL):
  cfg = enc.EncoderConfig(num_items=40, num_genres=6, num_ratings=7, num_timegap_buckets=37,
                          features=features, embed_dim=16, num_layers=2, num_heads=2,
                          dropout=0.0, max_len=8, position=position, fusion=fusion,
                          combine="concat" if fusion == "late" and len(features) > 1 else "sum")
  return enc.UserEncoder(cfg, rngs=nnx.Rngs(seed))


_encode = nnx.jit(lambda encoder, batch: encoder(batch)[0])


def _full(encoder, events: state_lib.Events):
  """A full encode of ``events`` (padded to max_len: one compiled program per encoder)."""
  n = len(events)
  pad = lambda x: np.pad(x, [(0, 8 - n)] + [(0, 0)] * (x.ndim - 1))[None]
  batch = {"item_BxT": pad(events.item), "rating_BxT": pad(events.rating),
           "timegap_BxT": pad(events.timegap), "genre_BxTxG": pad(G[events.item])}
  return np.asarray(_encode(encoder, batch)[0, :n])


def test_next_window_rule():
  assert state_lib.next_window(3, 2, 8, 4) == (5, True)
  assert state_lib.next_window(8, 1, 8, 4) == (4, False)
  assert state_lib.next_window(6, 7, 8, 4) == (7, False)
  assert state_lib.next_window(6, 20, 8, 4) == (8, False)


# every encoder feature set, both fusions, both position kinds (test_serving_encoder.py has
# the full product within one window)
@pytest.mark.parametrize("position,fusion,features,chunks", [
    ("learned", "early", ALL, [1] * 19),
    ("rotary", "late", ALL, [3, 2, 5, 1, 9, 4]),
    ("learned", "late", ("item",), [5, 4, 1, 1, 2]),
    ("rotary", "early", ("item", "genre"), [2, 7, 3, 8]),
    ("rotary", "late", ("item", "rating"), [6, 3, 1, 4]),
    ("learned", "early", ("item", "timegap"), [4, 4, 1, 9]),
])
def test_appends_across_max_len_equal_full_encode_of_the_rule_window(position, fusion, features,
                                                                      chunks):
  encoder = _encoder(position, fusion, features=features)
  inc = state_lib.IncrementalEncoder(encoder, G)
  assert (inc.capacity, inc.refill) == (8, 4)
  rng = np.random.default_rng(0)
  ev = state_lib.Events.empty()
  cache, wlen, t = None, 0, 1000
  kinds = []
  for k in chunks:
    stamps = t + np.cumsum(rng.integers(0, 5000, k))
    t = int(stamps[-1])
    ev = ev.extend(rng.integers(2, 40, k), rng.integers(2, 7, k), stamps)
    want_len, want_incr = state_lib.next_window(wlen, k, 8, 4)
    cache, wlen, incr = inc.apply(cache, wlen, ev, k)
    assert (wlen, incr) == (want_len, want_incr)
    kinds.append(incr)
    # the window the rule defines, with the whole history's time gaps
    np.testing.assert_allclose(cache["h"], _full(encoder, ev.tail(wlen)), atol=2e-5, rtol=1e-4)
  assert len(ev) > 8 and True in kinds and False in kinds
  assert ev.timegap[0] == 2 and set(ev.timegap[1:]) <= set(range(3, 38))


@pytest.mark.parametrize("mode,use_perceiver,fusion,features", [
    ("xattn", True, "late", ("item", "genre", "rating", "timegap")),
    ("soft_prompt", False, "early", ("item", "rating", "timegap")),
])
def test_engine_user_tokens_equal_those_of_a_full_reencode(mode, use_perceiver, fusion,
                                                           features):
  """Both fusions into the LLM: the user tokens the engine computes from the cached window
  outputs (appends crossing max_len) equal UserLLM.llm_inputs of a full encode."""
  model, tok, catalog = tiny.tiny_parts(0, mode=mode, use_perceiver=use_perceiver,
                                        fusion=fusion, features=features)
  eng = engine_lib.Engine(model, tok, catalog, store_lib.MemoryStore())
  rng = np.random.default_rng(2)
  t = 1000
  for k in (3, 4, 6, 1):      # 7, then a restart (6), then 7: crosses max_len = 8
    stamps = t + np.cumsum(rng.integers(0, 5000, k))
    t = int(stamps[-1])
    eng.append("u", [{"item_id": int(i), "timestamp": int(s), "rating": int(r)}
                     for i, s, r in zip(rng.integers(2, 40, k), stamps, rng.integers(1, 6, k))])
  st = eng.load_state("u")
  assert st.window_len == 7 and st.total_events == 14
  states = [st, eng.load_state("cold")]
  got = eng.user_llm_inputs(states, 2)
  w = st.events.tail(st.window_len)
  pad = lambda x: np.pad(np.asarray(x, np.int32)[None], [(0, 1), (0, 8 - len(w))]
                         + [(0, 0)] * (np.ndim(x) - 1))
  hist = {"item_BxT": pad(w.item), "rating_BxT": pad(w.rating), "timegap_BxT": pad(w.timegap),
          "genre_BxTxG": pad(catalog.item_genres[w.item]), "position_BxT": pad(np.arange(7)),
          "segment_BxT": pad(np.ones(7))}
  want = nnx.jit(lambda m, h: m.llm_inputs(h))(model, hist)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), atol=1e-4,
                               rtol=1e-4, err_msg=key)
  mask = np.asarray(got["media_mask_BxM" if mode == "xattn" else "prefix_mask_BxP"])
  assert mask[0].any() and not mask[1].any()      # the cold row is fully masked
  if not use_perceiver:
    assert mask[0].sum() == 7


def _state(user, fp, n=5, seed=0):
  rng = np.random.default_rng(seed)
  ev = state_lib.Events.empty().extend(rng.integers(2, 40, n), rng.integers(2, 7, n),
                                       np.arange(n) * 10)
  cache = {"k": rng.normal(size=(1, 2, n, 2, 8)).astype(np.float32),
           "v": rng.normal(size=(1, 2, n, 2, 8)).astype(np.float32),
           "h": rng.normal(size=(n, 16)).astype(np.float32)}
  return state_lib.UserState(user, fp, 0, ev, n, n, cache)


def test_sqlite_store_roundtrip_versions_and_conflicts(tmp_path):
  s = store_lib.SQLiteStore(str(tmp_path / "u.sqlite"))
  assert s.get("a") is None
  st = s.put(_state("a", "fp1"), None)
  assert st.version == 1
  got = s.get("a")
  assert got.version == 1 and got.fingerprint == "fp1"
  np.testing.assert_array_equal(got.events.item, st.events.item)
  np.testing.assert_array_equal(got.cache["h"], st.cache["h"])
  with pytest.raises(store_lib.VersionConflict):
    s.put(_state("a", "fp1"), None)        # exists already
  with pytest.raises(store_lib.VersionConflict):
    s.put(_state("a", "fp1"), 7)           # stale version
  assert s.put(_state("a", "fp2", n=3), 1).version == 2
  assert s.get("a").fingerprint == "fp2" and len(s.get("a").events) == 3
  assert s.count() == 1
  # a second handle (another process would do the same) reads the committed state
  s2 = store_lib.SQLiteStore(str(tmp_path / "u.sqlite"))
  assert s2.get("a").version == 2
  assert s.delete("a") and s2.get("a") is None
  s.close()
  s2.close()


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, sys.argv[2])
    from userllm_jax.serving import state as S, store as T
    s = T.SQLiteStore(sys.argv[1])
    big = np.random.default_rng(1).normal(size=(4_000_000,)).astype(np.float32)  # 16 MB
    v = s.get("u").version
    print("writing", flush=True)
    while True:
      st = s.get("u")
      st.cache = {"h": big.reshape(-1, 16)}
      s.put(st, st.version)
""")


def test_sigkill_mid_write_leaves_the_previous_state(tmp_path):
  path = str(tmp_path / "u.sqlite")
  s = store_lib.SQLiteStore(path)
  first = s.put(_state("u", "fp", n=6), None)
  s.close()
  proc = subprocess.Popen([sys.executable, "-c", _WRITER, path, os.getcwd()],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    time.sleep(1.5)                     # some 16 MB writes are in flight by now
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  s = store_lib.SQLiteStore(path)       # opens cleanly (WAL recovery)
  got = s.get("u")                      # checksum verified: never a torn record
  assert got is not None and got.version >= first.version
  np.testing.assert_array_equal(got.events.item, first.events.item)
  if got.version == first.version:
    np.testing.assert_array_equal(got.cache["h"], first.cache["h"])
  else:
    assert got.cache["h"].shape == (250_000, 16)
  assert s._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"  # pylint: disable=protected-access
  s.close()


def test_fingerprint_changes_with_any_parameter():
  e = _encoder()
  fp = state_lib.fingerprint(e, capacity=8, refill=4)
  assert fp == state_lib.fingerprint(e, capacity=8, refill=4)
  assert fp != state_lib.fingerprint(e, capacity=8, refill=3)
  e.stack.blocks[0].up_bias[...] = e.stack.blocks[0].up_bias[...] + 1e-3
  assert fp != state_lib.fingerprint(e, capacity=8, refill=4)
