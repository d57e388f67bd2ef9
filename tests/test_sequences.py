"""Tests for data/sequences.py: order, vocabularies, filtering, splits."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from userllm_jax.data import sequences as sq
from userllm_jax.data.schema import DataError, Interaction, ReadReport


def I(user, item, ts, rating=None, title=None, genres=(), review=None):  # pylint: disable=invalid-name
  return Interaction(str(user), str(item), ts, rating, title, tuple(genres),
                     review)


def user_items(seq, u):
  vocab = seq.vocabs["item"]
  return [vocab.tokens[i] for i in seq.user_arrays(u)["item"]]


def test_chronological_with_ties_in_source_order():
  rows = [I("a", "x", 30), I("b", "y", 5), I("a", "y", 10), I("a", "z", 30),
          I("a", "w", 10), I("a", "v", 1)]
  seq = sq.build_sequences(rows)
  assert seq.users == ["a", "b"]  # first appearance in the source
  # Sorted by time; x before z (both t=30) and y before w (both t=10) as in
  # the source.
  assert user_items(seq, 0) == ["v", "y", "w", "x", "z"]
  np.testing.assert_array_equal(seq.user_arrays(0)["timestamp"],
                                [1, 10, 10, 30, 30])
  assert user_items(seq, 1) == ["y"]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 6),
                          st.integers(0, 5)), min_size=1, max_size=60))
def test_order_matches_naive_stable_sort(triples):
  rows = [I(u, it, t) for u, it, t in triples]
  seq = sq.build_sequences(rows)
  for k, user in enumerate(seq.users):
    mine = [r for r in rows if r.user == user]
    want = [r.item for r in sorted(mine, key=lambda r: r.timestamp)]
    assert user_items(seq, k) == want
  assert seq.num_interactions == len(rows)
  assert sorted(seq.users) == sorted({r.user for r in rows})


def test_vocabularies():
  rows = [I(1, "m1", 1, 4.0, "Movie 1", ("Drama", "Comedy")),
          I(1, "m2", 2, 3.5, "Movie 2", ("Comedy",)),
          I(2, "m2", 3, None, "Movie 2 again", ("Horror",)),
          I(2, "m3", 4, 4.0, None, ()),
          I(3, "m2", 5, 1, "x")]
  seq = sq.build_sequences(rows)
  iv = seq.vocabs["item"]
  # PAD, OOV, then by count desc (m2: 3), ties by string (m1 < m3).
  assert iv.tokens == ["<pad>", "<oov>", "m2", "m1", "m3"]
  assert iv.id("nope") == sq.OOV and iv.id("m3") == 4
  assert seq.num_items == 3
  # Genres by number of items carrying them (Comedy: m1, m2), ties by name.
  gv = seq.vocabs["genre"]
  assert gv.tokens == ["<pad>", "<oov>", "Comedy", "Drama"]
  rv = seq.vocabs["rating"]
  assert rv.tokens == ["<pad>", "<oov>", "1", "3.5", "4"]
  # Ratings; a missing rating is OOV.
  np.testing.assert_array_equal(seq.user_arrays(1)["rating"],
                                [sq.OOV, rv.id("4")])
  # Item tables: first non-empty title / genre list seen.
  assert seq.item_titles == ["", "", "Movie 2", "Movie 1", ""]
  assert seq.item_genres.shape == (5, 2)
  np.testing.assert_array_equal(seq.item_genres[iv.id("m1")],
                                [gv.id("Drama"), gv.id("Comedy")])
  np.testing.assert_array_equal(seq.item_genres[iv.id("m2")],
                                [gv.id("Comedy"), 0])
  np.testing.assert_array_equal(seq.item_genres[:2], 0)
  np.testing.assert_array_equal(
      seq.user_arrays(0)["genre"], seq.item_genres[[iv.id("m1"),
                                                    iv.id("m2")]])


def test_max_genres_truncates_with_note():
  report = ReadReport()
  seq = sq.build_sequences([I(1, "a", 1, genres=("g1", "g2", "g3")),
                            I(1, "b", 2, genres=("g2",))], max_genres=2,
                           report=report)
  assert seq.item_genres.shape[1] == 2
  assert any("max_genres=2" in n and "1 items" in n for n in report.notes)


def test_timegap_buckets_hand_computed():
  ts = np.array([100, 100, 101, 103, 107, 108, 108 + 1000, 108 + 1000 + 2**40])
  got = sq.timegap_ids(ts)
  # gaps: -, 0, 1, 2, 4, 1, 1000 (2^9 <= 1000 < 2^10 -> k=10), 2^40 (capped)
  want = [sq.TIMEGAP_FIRST, 3, 3 + 1, 3 + 2, 3 + 3, 3 + 1, 3 + 10, 3 + 34]
  np.testing.assert_array_equal(got, want)
  voc = sq.timegap_vocab()
  assert voc.tokens[3 + 10] == "[512,1024)s"
  assert voc.size == 3 + 1 + 34
  with pytest.raises(ValueError, match="negative gap"):
    sq.timegap_ids(np.array([5, 4]))


def test_min_counts_and_k_core_report():
  # Items: i1 x3, i2 x2, i3 x1. Users: u1 [i1 i2 i3], u2 [i1 i2], u3 [i1].
  rows = [I("u1", "i1", 1), I("u1", "i2", 2), I("u1", "i3", 3),
          I("u2", "i1", 1), I("u2", "i2", 2), I("u3", "i1", 1)]
  report = ReadReport()
  seq = sq.build_sequences(rows, min_item_count=2, min_user_count=2,
                           report=report)
  # One pass: i3 dropped, then u3 (1 interaction) dropped.
  assert seq.users == ["u1", "u2"]
  assert seq.vocabs["item"].tokens[2:] == ["i1", "i2"]
  assert seq.num_interactions == 4
  assert len(report.notes) == 1
  assert "removed 1 of 3 users, 1 of 3 items and 2 of 6 interactions" in (
      report.notes[0])
  # k-core with min 3: pass 1 removes i2, i3 then users < 3 (everyone) ->
  # nothing left -> a clear error.
  with pytest.raises(DataError, match="filtering left no interactions"):
    sq.build_sequences(rows, min_item_count=3, min_user_count=3, k_core=True)


def test_k_core_iterates():
  # min 2: pass 1 drops item c (1x) -> user y then has 1 interaction -> drop
  # y -> item b drops to 1 -> with k_core, b and then user x... see counts.
  rows = [I("x", "a", 1), I("x", "b", 2), I("y", "b", 1), I("y", "c", 2),
          I("z", "a", 1), I("z", "d", 2), I("w", "a", 1), I("w", "d", 2)]
  one = sq.build_sequences(rows, min_item_count=2, min_user_count=2)
  assert sorted(one.users) == ["w", "x", "z"]  # y dropped after c
  assert "b" in one.vocabs["item"].tokens  # b still there (count now 1)
  report = ReadReport()
  core = sq.build_sequences(rows, min_item_count=2, min_user_count=2,
                            k_core=True, report=report)
  assert sorted(core.users) == ["w", "z"]
  assert core.vocabs["item"].tokens[2:] == ["a", "d"]
  lengths = core.lengths()
  assert lengths.min() >= 2
  counts = np.bincount(core.item_N)
  assert counts[2:].min() >= 2
  assert "rounds=3" in report.notes[0]


def test_bad_settings():
  with pytest.raises(ValueError, match="min_user_count"):
    sq.build_sequences([I(1, 1, 1)], min_user_count=0)
  with pytest.raises(DataError, match="no interactions"):
    sq.build_sequences([])


def _lengths_seq(lengths, start_time=0):
  rows = []
  for u, n in enumerate(lengths):
    rows += [I(f"u{u}", f"i{k}", start_time + 10 * k) for k in range(n)]
  return sq.build_sequences(rows)


def test_leave_one_out():
  seq = _lengths_seq([5, 2, 3])
  s = sq.leave_one_out(seq)
  assert s.train == [sq.Window(0, 0, 3), sq.Window(2, 0, 1)]
  assert s.valid == [sq.Window(0, 0, 4), sq.Window(2, 0, 2)]
  assert s.test == [sq.Window(0, 0, 5), sq.Window(2, 0, 3)]
  assert s.valid[0].target == 3 and s.test[0].target == 4
  assert s.sizes()["users_qualified"] == 2
  with pytest.raises(DataError, match=r"2 of 3 users qualified.*at least 5"):
    sq.leave_one_out(seq, min_users=5)


def test_userllm_windows_hand_case():
  # T = 9, window 3, stride 2: test [6,9), valid [5,8); train stops at
  # 7, 5, 3 -> windows [4,7), [2,5), [0,3).
  s = sq.userllm_windows([9, 4, 5], window=3, stride=2)
  assert s.test[0] == sq.Window(0, 6, 9) and s.valid[0] == sq.Window(0, 5, 8)
  u0 = [w for w in s.train if w.user == 0]
  assert u0 == [sq.Window(0, 0, 3), sq.Window(0, 2, 5), sq.Window(0, 4, 7)]
  # T = 5 = window + 2 qualifies with exactly one train window; T = 4 does not.
  assert [w for w in s.train if w.user == 2] == [sq.Window(2, 0, 3)]
  assert {w.user for w in s.test} == {0, 2}
  with pytest.raises(DataError, match=r"0 of 3 users qualified \(>= window\+2 = 52"):
    sq.userllm_windows([9, 4, 5])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8),
       st.integers(2, 6), st.integers(1, 7))
def test_splits_never_leak_the_future(lengths, window, stride):
  for s in [sq.leave_one_out(lengths, min_users=0),
            sq.userllm_windows(lengths, window, stride=stride, min_users=0)]:
    valid = {w.user: w for w in s.valid}
    test = {w.user: w for w in s.test}
    assert valid.keys() == test.keys()
    for w in s.train:
      assert 0 <= w.start < w.stop
      # Training data ends strictly before the validation target.
      assert w.stop - 1 < valid[w.user].target < test[w.user].target
    for u, w in test.items():
      assert w.stop == lengths[u] and valid[u].stop == lengths[u] - 1
      if s.name == "userllm":
        assert w.stop - w.start == window == valid[u].stop - valid[u].start


def test_time_cutoff():
  # u0 at 0,10,20,30; u1 at 100,110; u2 at 0,10.
  rows = ([I("u0", f"a{k}", 10 * k) for k in range(4)]
          + [I("u1", f"b{k}", 100 + 10 * k) for k in range(2)]
          + [I("u2", f"c{k}", 10 * k) for k in range(2)])
  seq = sq.build_sequences(rows)
  s = sq.time_cutoff(seq, test_time=25, valid_time=15)
  # Train strictly before valid_time.
  assert s.train == [sq.Window(0, 0, 2), sq.Window(2, 0, 2)]
  for w in s.train:
    assert seq.user_arrays(w.user)["timestamp"][w.stop - 1] < 15
  assert s.valid == [sq.Window(0, 0, 3)]  # item at t=20 in [15, 25)
  assert s.test == [sq.Window(0, 0, 4)]   # first item at t >= 25
  assert s.users_qualified == 1
  with pytest.raises(DataError, match="0 of 3 users qualified"):
    sq.time_cutoff(seq, test_time=1000)
  with pytest.raises(ValueError, match="valid_time"):
    sq.time_cutoff(seq, test_time=5, valid_time=10)


def test_flat_timegaps_match_per_user_reference():
  rng = np.random.default_rng(4)
  rows = [I(f"u{rng.integers(6)}", f"i{rng.integers(9)}",
            int(rng.integers(0, 2**20))) for _ in range(200)]
  seq = sq.build_sequences(rows)
  for u in range(seq.num_users):
    a = seq.user_arrays(u)
    np.testing.assert_array_equal(a["timegap"], sq.timegap_ids(a["timestamp"]))
    assert a["timegap"][0] == sq.TIMEGAP_FIRST
