"""Full-ranking metrics against hand-computed answers and a brute-force numpy reference."""

import math

import numpy as np
import pytest

from userllm_jax.eval import ranking


def test_target_ranked_third_hand_computed():
  # Items 0, 1 are PAD/OOV (never candidates, even with huge scores).
  scores = np.array([[100., 100., 0.9, 0.8, 0.5, 0.1, 0.7]])
  # Target = item 4 (score 0.5); items 2 (0.9), 3 (0.8) and 6 (0.7) rank above it -> rank 4.
  # Exclude item 6 as seen -> rank 3.
  rank = ranking.ranks_from_scores(scores, np.array([4]), np.array([[6, 0, 0]]))
  assert int(rank[0]) == 3
  m = ranking.metrics_from_ranks(np.asarray(rank), ks=(1, 5))
  assert m["hr@1"] == 0.0
  assert m["hr@5"] == 1.0
  assert m["ndcg@5"] == pytest.approx(1 / math.log2(4))
  assert m["ndcg@1"] == 0.0
  assert m["mrr"] == pytest.approx(1 / 3)
  assert int(ranking.ranks_from_scores(scores, np.array([4]))[0]) == 4


def test_metrics_average_over_users():
  m = ranking.metrics_from_ranks(np.array([1, 2, 11]), ks=(1, 10))
  assert m["hr@1"] == pytest.approx(1 / 3)
  assert m["hr@10"] == pytest.approx(2 / 3)
  assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
  assert m["mrr"] == pytest.approx((1 + 0.5 + 1 / 11) / 3)


def test_ties_pessimistic_and_optimistic():
  scores = np.zeros((1, 7))  # a constant scorer: 5 candidates (ids 2..6) all tied
  assert int(ranking.ranks_from_scores(scores, np.array([3]))[0]) == 5
  assert int(ranking.ranks_from_scores(scores, np.array([3]), ties="optimistic")[0]) == 1
  with pytest.raises(ValueError, match="ties"):
    ranking.ranks_from_scores(scores, np.array([3]), ties="average")


def test_seen_exclusion_ignores_target_duplicates_and_padding():
  scores = np.array([[0., 0., 5., 4., 3., 2., 1.]])
  # target 5 (score 2); seen lists the target itself, duplicates, PAD and OOV.
  seen = np.array([[5, 2, 2, 0, 1, 3]])
  # Candidates above: 2, 3, 4; seen removes 2 and 3 (once each) -> rank 2.
  assert int(ranking.ranks_from_scores(scores, np.array([5]), seen)[0]) == 2
  user = np.array([[1.0]])
  table = scores[0][:, None]
  r = ranking.ranks_from_embeddings(user, table, np.array([5]), seen, chunk=3)
  assert int(r[0]) == 2


def _brute_rank(s, t, seen, pessimistic=True):
  above = 0
  for j in range(2, len(s)):
    if j == t or j in seen:
      continue
    if s[j] > s[t] or (pessimistic and s[j] == s[t]):
      above += 1
  return above + 1


@pytest.mark.parametrize("chunk", [4, 7, 1000])
def test_chunked_embedding_ranks_match_bruteforce(chunk):
  rng = np.random.default_rng(0)
  B, N, D, S = 9, 23, 4, 6
  user = rng.normal(size=(B, D)).astype(np.float32)
  table = np.round(rng.normal(size=(N, D)), 1).astype(np.float32)
  table[5] = table[7]  # an exact tie
  target = rng.integers(2, N, B)
  target[0] = 5
  seen = rng.integers(0, N, (B, S))
  scores = user @ table.T
  want = [_brute_rank(scores[b], target[b], set(seen[b]) - {target[b]}) for b in range(B)]
  got_full = ranking.ranks_from_scores(scores, target, seen)
  got_chunk = ranking.ranks_from_embeddings(user, table, target, seen, chunk=chunk)
  np.testing.assert_array_equal(np.asarray(got_full), want)
  np.testing.assert_array_equal(np.asarray(got_chunk), want)
  want_opt = [_brute_rank(scores[b], target[b], set(), False) for b in range(B)]
  got_opt = ranking.ranks_from_embeddings(user, table, target, chunk=chunk, ties="optimistic")
  np.testing.assert_array_equal(np.asarray(got_opt), want_opt)


def test_popularity_baseline():
  counts = ranking.item_counts([[2, 3, 3, 4, 4, 4], [4, 0, 1]], num_items=6)
  np.testing.assert_array_equal(counts, [0, 0, 1, 2, 4, 0])
  # Popularity order: 4 > 3 > 2 > 5 (count 0).
  m = ranking.popularity_baseline(counts, np.array([4, 3, 5]), ks=(1, 3))
  assert m["hr@1"] == pytest.approx(1 / 3)
  assert m["hr@3"] == pytest.approx(2 / 3)
  assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
  # Excluding seen item 4 for the second user moves item 3 to rank 1.
  m2 = ranking.popularity_baseline(counts, np.array([3]), np.array([[4, 0]]), ks=(1,))
  assert m2["hr@1"] == 1.0


def test_accumulator_and_errors():
  acc = ranking.RankingAccumulator(ks=(1,))
  acc.add(np.array([1, 3]))
  acc.add(np.array([2, 9]), valid_B=np.array([True, False]))
  r = acc.result()
  assert r["num_users"] == 3
  assert r["hr@1"] == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match="empty"):
    ranking.RankingAccumulator().result()
  with pytest.raises(ValueError, match=">= 1"):
    ranking.metrics_from_ranks(np.array([0]))


def test_chance_levels():
  assert ranking.chance_hr(10, 1000) == pytest.approx(0.01)
  assert ranking.chance_ndcg(1, 4) == pytest.approx(0.25)
