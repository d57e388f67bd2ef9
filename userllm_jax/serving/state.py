"""A user's state: the raw history and the incremental encoder cache of its window.

The window rule (histories longer than the encoder's capacity)
--------------------------------------------------------------
The encoder reads a *window*: the most recent ``window_len`` events of the history, with
window positions 0..window_len-1 (as stage 2 reads a left-aligned history window).  Its
capacity ``C`` is the encoder's ``max_len`` (learned positions end there) unless set lower.
Appending ``k`` events to a window of ``w`` events:

* ``w + k <= C``: incremental -- the ``k`` events are encoded at positions ``w..w+k-1``
  against the cached keys/values (cost: ``k`` positions);
* otherwise the window *restarts*: it becomes the most recent ``min(C, max(refill, k))``
  events (``refill`` defaults to ``C // 2``), encoded from scratch.

So the window always ends at the newest event and holds between ``refill`` and ``C`` events
once the history is that long; a restart costs ``refill`` positions once per ``C - refill``
appends (amortised ~2 positions per appended event with the default ``refill = C / 2``),
never a re-encode of the whole history.  The state equals a full encode of exactly that
window (``UserEncoder.__call__`` on ``events[-window_len:]``; tested).  Time gaps are those
of the whole history (the window's first event keeps its gap to the event before it), as
``data/tasks.history_window`` computes them.

A state is tied to the encoder it was computed with by a *fingerprint* (sha256 of the
encoder config, the parameters' bytes and the window rule); the engine recomputes a state
whose fingerprint differs and never uses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from userllm_jax.data import sequences as seqlib
from userllm_jax.models import encoder as enc


@dataclasses.dataclass
class Events:
  """Chronological interactions, oldest first (encoder vocab ids)."""
  item: np.ndarray        # int32 [n]
  rating: np.ndarray      # int32 [n] rating vocab ids (1 = OOV when unknown)
  timestamp: np.ndarray   # int64 [n] seconds
  timegap: np.ndarray     # int32 [n] timegap bucket ids (data/sequences.timegap_ids)

  @classmethod
  def empty(cls) -> "Events":
    return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64),
               np.zeros(0, np.int32))

  def __len__(self) -> int:
    return int(self.item.shape[0])

  def tail(self, n: int) -> "Events":
    n = max(0, min(int(n), len(self)))
    s = slice(len(self) - n, len(self))
    return Events(self.item[s], self.rating[s], self.timestamp[s], self.timegap[s])

  def extend(self, item, rating, timestamp) -> "Events":
    """``self`` plus new events (time gaps continue from the last stored timestamp)."""
    item = np.asarray(item, np.int32)
    timestamp = np.asarray(timestamp, np.int64)
    prev = self.timestamp[-1:] if len(self) else np.zeros(0, np.int64)
    gaps = seqlib.timegap_ids(np.concatenate([prev, timestamp]))[len(prev):]
    return Events(np.concatenate([self.item, item]),
                  np.concatenate([self.rating, np.asarray(rating, np.int32)]),
                  np.concatenate([self.timestamp, timestamp]),
                  np.concatenate([self.timegap, gaps.astype(np.int32)]))


@dataclasses.dataclass
class UserState:
  """What the store keeps per user.

  ``events``: the stored history (the most recent ``max_events``; ``total_events`` counts
  every event ever appended).  ``window_len``: the encoder window is ``events.tail(window_len)``.
  ``cache``: the window's encoder cache without the batch axis, trimmed to the window
  (``k``/``v``: [S, L, window_len, N, H]; ``h``: [window_len, D]); None for an empty history.
  """
  user_id: str
  fingerprint: str
  version: int
  events: Events
  total_events: int
  window_len: int
  cache: Optional[dict[str, np.ndarray]]
  updated_at: float = 0.0

  def metadata(self) -> dict[str, Any]:
    return {"user_id": self.user_id, "version": self.version,
            "total_events": self.total_events, "stored_events": len(self.events),
            "window_len": self.window_len, "encoder_fingerprint": self.fingerprint,
            "last_timestamp": int(self.events.timestamp[-1]) if len(self.events) else None,
            "updated_at": self.updated_at}


def next_window(window_len: int, k: int, capacity: int, refill: int) -> tuple[int, bool]:
  """``(new window_len, incremental?)`` after appending ``k`` events (module doc rule)."""
  if window_len + k <= capacity:
    return window_len + k, True
  return min(capacity, max(refill, k)), False


def fingerprint(encoder: enc.UserEncoder, *, capacity: int, refill: int) -> str:
  """sha256 of the encoder config, every parameter (path, dtype, shape, bytes) and the rule."""
  h = hashlib.sha256()
  h.update(repr(encoder.cfg).encode())
  h.update(json.dumps({"capacity": capacity, "refill": refill}).encode())
  flat = nnx.to_flat_state(nnx.state(encoder, nnx.Param))
  for path, var in sorted(flat, key=lambda kv: tuple(map(str, kv[0]))):
    x = np.asarray(jax.device_get(var[...]))
    h.update("/".join(map(str, path)).encode())
    h.update(f"{x.dtype}{x.shape}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def _bucket(k: int, cap: int) -> int:
  b = 1
  while b < k:
    b *= 2
  return min(b, cap)


class IncrementalEncoder:
  """Runs :func:`models.encoder.encode_append` for one user at a time, jitted per chunk bucket.

  ``item_genres[item_id]`` gives the genre ids of an item (``Catalog.item_genres``).
  """

  def __init__(self, encoder: enc.UserEncoder, item_genres: np.ndarray, *,
               capacity: Optional[int] = None, refill: Optional[int] = None):
    cfg = encoder.cfg
    self.cfg = cfg
    self.capacity = int(capacity or cfg.max_len)
    if cfg.position == "learned" and self.capacity > cfg.max_len:
      raise ValueError(f"serving capacity={self.capacity} > encoder max_len={cfg.max_len} "
                       "(learned positions)")
    self.refill = int(refill or max(1, self.capacity // 2))
    if not 1 <= self.refill <= self.capacity:
      raise ValueError(f"serving refill={self.refill} must be in [1, capacity="
                       f"{self.capacity}]")
    g = np.asarray(item_genres, np.int32)
    self.item_genres = g[:, None] if g.ndim == 1 else g
    self.encoder = encoder
    self.graphdef, self.params = nnx.split(encoder)
    self.fingerprint = fingerprint(encoder, capacity=self.capacity, refill=self.refill)
    graphdef = self.graphdef

    def _append(params, cache, batch, num_new):
      return enc.encode_append(nnx.merge(graphdef, params), cache, batch, num_new)

    self._append = jax.jit(_append)
    self._empty = enc.init_cache(encoder, 1, self.capacity)

  # -- conversions ------------------------------------------------------------------------------

  def _batch(self, ev: Events, K: int) -> dict[str, np.ndarray]:
    n = len(ev)
    pad = lambda x: np.pad(np.asarray(x, np.int32), [(0, K - n)] + [(0, 0)] * (x.ndim - 1))
    return {"item_BxT": pad(ev.item)[None], "rating_BxT": pad(ev.rating)[None],
            "timegap_BxT": pad(ev.timegap)[None],
            "genre_BxTxG": pad(self.item_genres[ev.item])[None]}

  def to_device(self, cache: Optional[dict[str, np.ndarray]], window_len: int
                ) -> enc.EncoderCache:
    if cache is None or window_len == 0:
      return self._empty
    C, w = self.capacity, window_len
    padkv = lambda x: np.pad(x, [(0, 0), (0, 0), (0, C - w), (0, 0), (0, 0)])[:, :, None]
    return enc.EncoderCache(jnp.asarray(padkv(cache["k"])), jnp.asarray(padkv(cache["v"])),
                            jnp.asarray(np.pad(cache["h"], [(0, C - w), (0, 0)])[None]),
                            jnp.asarray([w], jnp.int32))

  @staticmethod
  def to_host(cache: enc.EncoderCache) -> dict[str, np.ndarray]:
    # Whole arrays to the host, then sliced by numpy: a device slice to the window length
    # would compile an eager program per length, i.e. on nearly every append.
    w = int(np.asarray(cache.length_B)[0])
    return {"k": np.asarray(cache.k_SxLxBxCxNxH)[:, :, 0, :w].copy(),
            "v": np.asarray(cache.v_SxLxBxCxNxH)[:, :, 0, :w].copy(),
            "h": np.asarray(cache.h_BxCxD)[0, :w].copy()}

  # -- encoding ---------------------------------------------------------------------------------

  def append_device(self, cache: enc.EncoderCache, new: Events) -> enc.EncoderCache:
    """Appends ``new`` (fits the capacity) to a device cache: ``len(new)`` positions."""
    k = len(new)
    if k == 0:
      return cache
    K = _bucket(k, self.capacity)
    return self._append(self.params, cache, self._batch(new, K), jnp.asarray([k], jnp.int32))

  def encode_window(self, events: Events, window_len: int) -> enc.EncoderCache:
    """A fresh cache of the most recent ``window_len`` events (a full re-encode)."""
    return self.append_device(self._empty, events.tail(window_len))

  def apply(self, state_cache: Optional[dict[str, np.ndarray]], window_len: int,
            events: Events, k: int) -> tuple[dict[str, np.ndarray], int, bool]:
    """The cache after the last ``k`` of ``events`` were appended to a window of
    ``window_len``: ``(host cache, new window_len, incremental?)``."""
    new_len, incremental = next_window(window_len, k, self.capacity, self.refill)
    if incremental and (state_cache is not None or window_len == 0):
      dev = self.append_device(self.to_device(state_cache, window_len), events.tail(k))
    else:
      dev = self.encode_window(events, new_len)
    return self.to_host(dev), new_len, incremental


def new_state(user_id: str, fp: str) -> UserState:
  return UserState(user_id=user_id, fingerprint=fp, version=0, events=Events.empty(),
                   total_events=0, window_len=0, cache=None, updated_at=time.time())
