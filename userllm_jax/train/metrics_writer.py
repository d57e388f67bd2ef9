"""Scalar metrics to TensorBoard event files and a JSON-lines log; process 0 only.

``WORKDIR/tb/`` holds tensorboardX event files; ``WORKDIR/metrics.jsonl`` one
JSON object per written step (``{"step": n, "train/loss": ...}``), appended
across restarts (a resumed run re-logs the steps after its checkpoint, so for
a step that appears twice the last line wins; see :func:`read_metrics`).

The workdir is any :mod:`userllm_jax.paths` location. On a local disk both files
are written in place (the JSON lines flushed per row). On an object store, which
has neither append nor partial writes, tensorboardX writes into a local staging
directory and the event files and the whole ``metrics.jsonl`` (the rows found there
at start plus this run's) are uploaded as single objects on :meth:`flush`, on
:meth:`close` and at most every ``upload_every_s`` seconds in between.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from typing import Mapping, Optional

import jax

from userllm_jax import paths


class MetricsWriter:
  """Writes scalars on process 0; a no-op on the others."""

  def __init__(self, workdir: str, *, enabled: Optional[bool] = None,
               upload_every_s: float = 60.0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    self._remote = paths.is_remote(workdir)
    self._upload_every_s = upload_every_s
    self._last_upload = time.time()
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._workdir = paths.makedirs(workdir)
    if self._remote:
      self._stage = tempfile.mkdtemp(prefix="userllm-tb-")
      # Event file names hold the second and the host only: a suffix keeps a restarted
      # run's file from overwriting the previous one's in the bucket.
      self._tb = SummaryWriter(self._stage, filename_suffix=f".{uuid.uuid4().hex[:8]}")
      old = self._workdir / "metrics.jsonl"
      self._lines = [old.read_text(encoding="utf-8")] if old.exists() else []
    else:
      self._tb = SummaryWriter(os.fspath(self._workdir / "tb"))
      self._jsonl = open(os.fspath(self._workdir / "metrics.jsonl"), "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for name, value in scalars.items():
      value = float(value)
      self._tb.add_scalar(name, value, global_step=int(step))
      row[name] = value if math.isfinite(value) else str(value)
    line = json.dumps(row) + "\n"
    if self._remote:
      self._lines.append(line)
      if time.time() - self._last_upload >= self._upload_every_s:
        self.flush()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()

  def _upload(self) -> None:
    paths.write_atomic(self._workdir / "metrics.jsonl", "".join(self._lines))
    paths.upload_tree(self._stage, self._workdir / "tb")
    self._last_upload = time.time()

  def flush(self) -> None:
    if not self.enabled:
      return
    self._tb.flush()
    if self._remote:
      self._upload()
    else:
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      if self._remote:
        self._upload()
        shutil.rmtree(self._stage, ignore_errors=True)
      else:
        self._jsonl.close()
      self.enabled = False


def read_metrics(workdir: str) -> dict[int, dict[str, float]]:
  """``metrics.jsonl`` as {step: {name: value}}; a later line for a step wins."""
  out: dict[int, dict[str, float]] = {}
  path = paths.path(workdir) / "metrics.jsonl"
  for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
    step = row.pop("step")
    out.setdefault(step, {}).update(row)
  return out
