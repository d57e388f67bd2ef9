"""Full-ranking next-item metrics: HR@K, NDCG@K, MRR, and a popularity baseline.

Protocol: the held-out item of each user is ranked against the *whole* catalogue (no sampled
candidates).  Ids 0 (PAD) and 1 (OOV) are never candidates.  Optionally the items already in
the user's history are removed from the candidates (the target itself never is).

Rank of the target (1 = best)::

  rank = 1 + #{candidates j != target : s_j > s_target} + ties

``ties='pessimistic'`` (default) counts every other candidate with an equal score as ranked
above the target, so a constant scorer gets the worst rank (no credit for ties);
``'optimistic'`` counts none of them.  Then, averaged over users::

  HR@K = [rank <= K],  NDCG@K = [rank <= K] / log2(rank + 1),  MRR = 1 / rank

(one relevant item, so IDCG = 1).  For large catalogues :func:`ranks_from_embeddings` scores
the catalogue in chunks (memory O(B * chunk)) and never materialises [B, N].
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NUM_SPECIAL = 2  # ids 0 = PAD and 1 = OOV are not candidates


def _tie_term(ties: str):
  if ties not in ("pessimistic", "optimistic"):
    raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
  return ties == "pessimistic"


def _dedup_seen(seen_BxS: jax.Array, target_B: jax.Array) -> jax.Array:
  """Seen ids with duplicates, specials and the target itself replaced by -1."""
  s = jnp.sort(seen_BxS, axis=1)
  dup = jnp.concatenate([jnp.zeros_like(s[:, :1], bool), s[:, 1:] == s[:, :-1]], axis=1)
  bad = dup | (s < NUM_SPECIAL) | (s == target_B[:, None])
  return jnp.where(bad, -1, s)


def ranks_from_scores(scores_BxN: jax.Array, target_B: jax.Array,
                      seen_BxS: Optional[jax.Array] = None, *,
                      ties: str = "pessimistic") -> jax.Array:
  """1-based rank of ``target_B`` among items >= 2 by ``scores_BxN`` (higher is better).

  ``seen_BxS``: ids (0-padded) to exclude from the candidates (the target never is).
  """
  pess = _tie_term(ties)
  scores_BxN = jnp.asarray(scores_BxN, jnp.float32)
  target_B = jnp.asarray(target_B, jnp.int32)
  B, N = scores_BxN.shape
  cand_BxN = jnp.broadcast_to(jnp.arange(N) >= NUM_SPECIAL, (B, N))
  cand_BxN = cand_BxN & (jnp.arange(N)[None] != target_B[:, None])
  if seen_BxS is not None:
    seen = _dedup_seen(jnp.asarray(seen_BxS, jnp.int32), target_B)
    drop_BxN = jnp.zeros((B, N), bool).at[jnp.arange(B)[:, None], jnp.maximum(seen, 0)].max(
        seen >= 0)
    cand_BxN = cand_BxN & ~drop_BxN
  t_B = jnp.take_along_axis(scores_BxN, target_B[:, None], axis=1)
  above = scores_BxN > t_B
  if pess:
    above = above | (scores_BxN == t_B)
  return 1 + jnp.sum(above & cand_BxN, axis=1)


def ranks_from_embeddings(user_BxD: jax.Array, table_NxD: jax.Array, target_B: jax.Array,
                          seen_BxS: Optional[jax.Array] = None, *, chunk: int = 65536,
                          ties: str = "pessimistic", bias_N: Optional[jax.Array] = None
                          ) -> jax.Array:
  """Like :func:`ranks_from_scores` with scores ``user @ table.T (+ bias)``, chunked over the
  catalogue so [B, N] is never materialised."""
  pess = _tie_term(ties)
  user = jnp.asarray(user_BxD, jnp.float32)
  table = jnp.asarray(table_NxD, jnp.float32)
  target_B = jnp.asarray(target_B, jnp.int32)
  N = table.shape[0]
  B = user.shape[0]
  bias = None if bias_N is None else jnp.asarray(bias_N, jnp.float32)

  def chunk_scores(start, stop):
    s_BxC = user @ table[start:stop].T
    if bias is not None:
      s_BxC = s_BxC + bias[start:stop][None]
    return s_BxC

  # Pass 1: the target's score, computed by exactly the op that scores its chunk in pass 2
  # (so exact ties stay exact ties).
  t_B = jnp.zeros((B,), jnp.float32)
  for start in range(0, N, chunk):
    stop = min(start + chunk, N)
    s_BxC = chunk_scores(start, stop)
    in_chunk = (target_B >= start) & (target_B < stop)
    t_B = t_B + jnp.where(
        in_chunk, jnp.take_along_axis(s_BxC, jnp.clip(target_B - start, 0, stop - start - 1)[:, None],
                                      axis=1)[:, 0], 0.0)
  seen = None
  if seen_BxS is not None:
    seen = _dedup_seen(jnp.asarray(seen_BxS, jnp.int32), target_B)
  count_B = jnp.zeros((B,), jnp.int32)
  for start in range(0, N, chunk):
    stop = min(start + chunk, N)
    s_BxC = chunk_scores(start, stop)
    ids_C = jnp.arange(start, stop)
    above = (s_BxC > t_B[:, None]) | ((s_BxC == t_B[:, None]) if pess else False)
    above = above & (ids_C >= NUM_SPECIAL)[None] & (ids_C[None] != target_B[:, None])
    if seen is not None:
      # Ids outside this chunk go to index C (out of bounds, dropped); negative indices would
      # wrap around, so they must not reach the scatter.
      in_chunk = (seen >= start) & (seen < stop)
      local = jnp.where(in_chunk, seen - start, stop - start)
      drop_BxC = jnp.zeros(s_BxC.shape, bool).at[jnp.arange(B)[:, None], local].set(
          True, mode="drop")
      above = above & ~drop_BxC
    count_B = count_B + jnp.sum(above, axis=1)
  return 1 + count_B


def metrics_from_ranks(rank_B, ks: Sequence[int] = (1, 5, 10, 20)) -> dict[str, float]:
  """HR@K, NDCG@K for each K and MRR, averaged over the users in ``rank_B``."""
  r = np.asarray(rank_B, np.float64)
  if r.size == 0:
    raise ValueError("metrics_from_ranks: no ranks (empty evaluation set)")
  if np.any(r < 1):
    raise ValueError(f"metrics_from_ranks: ranks must be >= 1, got min {r.min()}")
  out = {}
  for k in ks:
    hit = r <= k
    out[f"hr@{k}"] = float(hit.mean())
    out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0).mean())
  out["mrr"] = float((1.0 / r).mean())
  return out


class RankingAccumulator:
  """Collects ranks over batches; ``result()`` gives the metrics over all users seen."""

  def __init__(self, ks: Sequence[int] = (1, 5, 10, 20)):
    self.ks = tuple(int(k) for k in ks)
    self._ranks: list[np.ndarray] = []

  def add(self, rank_B, valid_B=None) -> None:
    r = np.asarray(rank_B)
    if valid_B is not None:
      r = r[np.asarray(valid_B, bool)]
    self._ranks.append(r)

  @property
  def count(self) -> int:
    return int(sum(r.size for r in self._ranks))

  def ranks(self) -> np.ndarray:
    return np.concatenate(self._ranks) if self._ranks else np.zeros((0,), np.int64)

  def result(self) -> dict[str, float]:
    out = metrics_from_ranks(self.ranks(), self.ks)
    out["num_users"] = float(self.count)
    return out


def item_counts(sequences: Iterable[Sequence[int]], num_items: int) -> np.ndarray:
  """Training-split frequency of every item id ([num_items] int64)."""
  counts = np.zeros((num_items,), np.int64)
  for seq in sequences:
    ids = np.asarray(seq, np.int64)
    ids = ids[(ids >= NUM_SPECIAL) & (ids < num_items)]
    np.add.at(counts, ids, 1)
  return counts


def popularity_ranks(counts_N, target_B, seen_BxS=None, *, ties: str = "pessimistic"):
  """Ranks under the popularity baseline (score = training-split frequency)."""
  counts = jnp.asarray(counts_N, jnp.float32)
  target = jnp.asarray(target_B, jnp.int32)
  scores = jnp.broadcast_to(counts[None], (target.shape[0], counts.shape[0]))
  return ranks_from_scores(scores, target, seen_BxS, ties=ties)


def popularity_baseline(counts_N, target_B, seen_BxS=None, *, ks=(1, 5, 10, 20),
                        ties: str = "pessimistic", batch_size: int = 1024) -> dict[str, float]:
  """HR/NDCG/MRR of ranking every user's candidates by training frequency."""
  target = np.asarray(target_B)
  acc = RankingAccumulator(ks)
  for i in range(0, target.shape[0], batch_size):
    seen = None if seen_BxS is None else np.asarray(seen_BxS)[i:i + batch_size]
    acc.add(popularity_ranks(counts_N, target[i:i + batch_size], seen, ties=ties))
  return acc.result()


def chance_hr(k: int, num_candidates: int) -> float:
  """Expected HR@K of a random ranking over ``num_candidates`` items."""
  return min(k, num_candidates) / num_candidates


def chance_ndcg(k: int, num_candidates: int) -> float:
  """Expected NDCG@K of a random ranking over ``num_candidates`` items."""
  return sum(1.0 / math.log2(r + 1) for r in range(1, min(k, num_candidates) + 1)) / num_candidates
