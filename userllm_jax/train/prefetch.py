"""Device prefetch: the next batches are read and placed on the devices while a step runs.

:class:`DevicePrefetcher` wraps a host iterator (a Grain ``DatasetIterator``, or any
iterator of numpy batches) and a ``transfer`` function (the loop's
``jax.make_array_from_process_local_data`` onto the batch sharding).  A background thread
runs ``next()`` + ``transfer`` up to ``size`` batches ahead, so the host's data work and the
host-to-device copy overlap the running step (``size=0``: synchronous, in the caller's
thread).

Checkpoints stay exact: the thread records the host iterator's ``get_state()`` right after
each ``next()``, and :meth:`position` gives the state *of the last batch handed out*, not of
the batches still waiting in the queue, so a resumed run neither skips nor repeats them.
Restore the host iterator (``set_state``) before the first ``next()``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional

_END = object()


class _Raised:
  def __init__(self, exc: BaseException):
    self.exc = exc


class DataPosition:
  """A frozen iterator position that Grain's Orbax handler can save (``get_state()``).

  Grain's handler saves ``json.dumps(get_state())`` for a ``DatasetIterator`` and
  ``get_state().decode()`` otherwise; this object returns the same JSON text as bytes, so the
  checkpoint file is the one the wrapped iterator would have written and restores into it.
  """

  def __init__(self, state: Any):
    self._state = state

  def get_state(self) -> bytes:
    if isinstance(self._state, bytes):
      return self._state
    return json.dumps(self._state, indent=4).encode()


class DevicePrefetcher:
  """Iterator of transferred batches, ``size`` ahead of the consumer (see module doc)."""

  def __init__(self, iterator: Iterator, transfer: Callable[[Any], Any], size: int = 2, *,
               first: Any = None):
    """``first``: a batch already taken from ``iterator`` (handed out first, transferred in
    the caller's thread); the iterator's current state is then the position after it."""
    if size < 0:
      raise ValueError(f"prefetch size must be >= 0; got {size}")
    self._it = iterator
    self._transfer = transfer
    self._size = int(size)
    self._has_state = hasattr(iterator, "get_state")
    self._state = iterator.get_state() if self._has_state else None
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, self._size))
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._done = False
    self._first = first
    self.wait_s = 0.0       # seconds the consumer spent blocked in __next__ (reset by caller)

  # -- producer -------------------------------------------------------------------------
  def _read_one(self):
    local = next(self._it)
    state = self._it.get_state() if self._has_state else None
    return self._transfer(local), state

  def _produce(self) -> None:
    try:
      while not self._stop.is_set():
        try:
          item = self._read_one()
        except StopIteration:
          item = _END
        self._put(item)
        if item is _END:
          return
    except BaseException as e:  # pylint: disable=broad-except
      self._put(_Raised(e))

  def _put(self, item) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  # -- consumer -------------------------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    t0 = time.perf_counter()
    try:
      if self._first is not None:
        batch, state = self._transfer(self._first), self._state
        self._first = None
      elif self._size == 0:
        try:
          batch, state = self._read_one()
        except StopIteration:
          self._done = True
          raise
      else:
        if self._thread is None:
          self._thread = threading.Thread(target=self._produce, name="device-prefetch",
                                          daemon=True)
          self._thread.start()
        item = self._queue.get()
        if item is _END:
          self._done = True
          raise StopIteration
        if isinstance(item, _Raised):
          self._done = True
          raise item.exc
        batch, state = item
    finally:
      self.wait_s += time.perf_counter() - t0
    self._state = state
    return batch

  def position(self) -> Optional[DataPosition]:
    """The host iterator's state after the last batch handed out (None: not checkpointable)."""
    return DataPosition(self._state) if self._has_state else None

  def close(self) -> None:
    """Stops the thread (batches in the queue are dropped; the position is kept)."""
    self._stop.set()
    if self._thread is not None:
      deadline = time.monotonic() + 30.0   # a next() stuck in the source: leave the daemon
      while self._thread.is_alive() and time.monotonic() < deadline:
        try:
          self._queue.get(timeout=0.05)
        except queue.Empty:
          pass
        self._thread.join(timeout=0.05)
      self._thread = None
