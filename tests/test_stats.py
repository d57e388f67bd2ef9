"""Confidence intervals against hand-computed values."""

import math

import numpy as np
import pytest

from userllm_jax.eval import stats


def test_wilson_interval_hand_computed():
  # 50 / 100 at 95%: z = 1.959964; centre 0.5; half = z*sqrt(.25/100 + z^2/40000)/(1+z^2/100)
  z = 1.959963984540054
  half = z * math.sqrt(0.0025 + z * z / 40000) / (1 + z * z / 100)
  lo, hi = stats.proportion_ci(50, 100)
  assert lo == pytest.approx(0.5 - half, abs=1e-12) and hi == pytest.approx(0.5 + half, abs=1e-12)
  assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)   # the textbook value
  # Edge cases stay inside [0, 1] and are not degenerate.
  lo, hi = stats.proportion_ci(0, 20)
  assert lo == pytest.approx(0.0, abs=1e-12) and 0.1 < hi < 0.2
  lo, hi = stats.proportion_ci(20, 20)
  assert hi == 1.0 and 0.8 < lo < 0.9
  with pytest.raises(ValueError, match="successes"):
    stats.proportion_ci(5, 4)


def test_mean_interval_hand_computed():
  v = [0.0, 1.0, 0.5, 0.5]
  m, sd = 0.5, np.std(v, ddof=1)
  lo, hi = stats.mean_ci(v, 0.9)
  z = 1.6448536269514722
  assert lo == pytest.approx(m - z * sd / 2) and hi == pytest.approx(m + z * sd / 2)
  assert stats.mean_ci([0.3]) == (0.3, 0.3)
