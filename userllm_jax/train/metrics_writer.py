"""Scalar metrics to TensorBoard event files and a JSON-lines log; process 0 only.

``WORKDIR/tb/`` holds tensorboardX event files; ``WORKDIR/metrics.jsonl`` one
JSON object per written step (``{"step": n, "train/loss": ...}``), appended
across restarts (a resumed run re-logs the steps after its checkpoint, so for
a step that appears twice the last line wins; see :func:`read_metrics`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional

import jax


class MetricsWriter:
  """Writes scalars on process 0; a no-op on the others."""

  def __init__(self, workdir: str, *, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for name, value in scalars.items():
      value = float(value)
      self._tb.add_scalar(name, value, global_step=int(step))
      row[name] = value if math.isfinite(value) else str(value)
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


def read_metrics(workdir: str) -> dict[int, dict[str, float]]:
  """``metrics.jsonl`` as {step: {name: value}}; a later line for a step wins."""
  out: dict[int, dict[str, float]] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
      step = row.pop("step")
      out.setdefault(step, {}).update(row)
  return out
