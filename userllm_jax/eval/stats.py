"""Confidence intervals for the metrics the jobs report.

* :func:`proportion_ci`: Wilson score interval of a binomial proportion (accuracy, Recall@K:
  one 0/1 outcome per test user); it stays inside [0, 1] and is sound for small n.
* :func:`mean_ci`: normal-approximation interval of a mean (ROUGE-L per example).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np


def _z(confidence: float) -> float:
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def proportion_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """Wilson score interval ``(low, high)`` of ``successes / n``."""
  if n <= 0:
    raise ValueError(f"proportion_ci: n must be > 0, got {n}")
  if not 0 <= successes <= n:
    raise ValueError(f"proportion_ci: successes={successes} outside [0, {n}]")
  z = _z(confidence)
  p = successes / n
  denom = 1.0 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  """``mean -/+ z * sd / sqrt(n)`` (sample sd, ddof=1; a single value gives a zero width)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    raise ValueError("mean_ci: no values")
  m = float(v.mean())
  if v.size == 1:
    return m, m
  half = _z(confidence) * float(v.std(ddof=1)) / math.sqrt(v.size)
  return m - half, m + half
