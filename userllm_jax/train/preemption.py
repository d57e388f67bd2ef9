"""Preemption for a whole job: SIGTERM is a request to stop at the next safe point.

``main.py`` runs every job inside :func:`scope`; stages poll :func:`requested` (or call
:func:`exit_if_requested`) at their safe points: the train loop at every step boundary
(it checkpoints first), the evaluations between batches, the jobs between stages and
methods.  A stop is ``SystemExit(0)``: the scheduler sees a clean exit and the re-run in
the same workdir continues from what is on disk (checkpoints, finished results files).

* Single process: a Python SIGTERM handler sets a flag (installed for the whole scope, so
  a SIGTERM during evaluation or data preparation no longer kills the process).
* Multi-process: JAX's preemption sync point (the coordination service hears the notice
  on any host and all hosts agree on the stopping point).  Every safe point of the job
  is one call with a job-wide, increasing id (every process passes the same safe points
  in the same order, as SPMD code does).  Caveat: Orbax's ``CheckpointManager.save``
  also reports its step to the same sync point; a notice that lands during a save can
  make the agreed id one that this counter has passed, and then the job runs on until
  the scheduler kills it (the last checkpoint stays usable).

Outside a scope (library use, tests calling ``train/loop.run_training`` directly) the
train loop opens its own for the duration of the training.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

import jax
from absl import logging


class Preemption:
  """The stop request of one job (see the module docstring)."""

  def __init__(self):
    self._flag = False
    self._prev = None
    self._sync_id = 0
    self._multi = jax.process_count() > 1

  def install(self) -> None:
    if self._multi:
      return   # JAX's runtime listens for SIGTERM and runs the sync protocol
    if threading.current_thread() is threading.main_thread():
      self._prev = signal.signal(signal.SIGTERM, self._handler)
    else:
      logging.warning("preemption: not on the main thread; SIGTERM is not handled")

  def uninstall(self) -> None:
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)
      self._prev = None

  def _handler(self, signum, frame):
    del frame
    logging.warning("received signal %d: stopping at the next safe point", signum)
    self._flag = True

  def request(self) -> None:
    """Ask for a stop as SIGTERM would (tests, or a job's own time limit)."""
    self._flag = True

  def requested(self) -> bool:
    """True once a stop was requested; multi-process: all processes agree (sync point)."""
    if not self._multi:
      return self._flag
    self._sync_id += 1
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      return bool(multihost_utils.reached_preemption_sync_point(self._sync_id)) or self._flag
    except RuntimeError:   # the preemption service is disabled (jax_enable_preemption_service)
      return self._flag


_ACTIVE: Optional[Preemption] = None


@contextlib.contextmanager
def scope() -> Iterator[Preemption]:
  """Handle SIGTERM as a stop request for the duration of the block.

  Nested scopes share the outermost one (the train loop inside a job's scope).
  """
  global _ACTIVE
  if _ACTIVE is not None:
    yield _ACTIVE
    return
  p = Preemption()
  p.install()
  _ACTIVE = p
  try:
    yield p
  finally:
    p.uninstall()
    _ACTIVE = None


def requested() -> bool:
  """Whether the job should stop now (False outside a :func:`scope`)."""
  return _ACTIVE is not None and _ACTIVE.requested()


def exit_if_requested(where: str) -> None:
  """``SystemExit(0)`` at a safe point when a stop was requested; ``where`` is logged."""
  if requested():
    logging.warning("preempted %s: what is finished is on disk; exiting (status 0)", where)
    raise SystemExit(0)
