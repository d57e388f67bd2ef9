"""The durable user-state store: keyed by user id, versioned, crash-safe.

Interface (:class:`UserStateStore`) -- what a networked key-value store (Redis, Bigtable,
a sharded KV service) would implement for multi-machine serving:

* ``get(user_id) -> UserState | None``
* ``put(state, expected_version)``: compare-and-set; the stored version must equal
  ``expected_version`` (``None``: the user must not exist), the new record gets
  ``expected_version + 1`` (:class:`VersionConflict` otherwise), atomically;
* ``delete(user_id)``, ``count()``, ``close()``.

A record is ``(user_id, version, encoder fingerprint, metadata, blob)`` where the blob is one
``.npz`` (raw history + encoder cache) with its sha256 stored beside it and checked on read.

Default: :class:`SQLiteStore`.  Why SQLite (WAL mode):

* embedded (no server), in the standard library, one file;
* atomic, durable transactions: a write cut anywhere (SIGKILL, power loss with
  ``synchronous=FULL``) leaves the previous committed record -- the WAL frame of an
  uncommitted transaction is ignored on the next open (tested with a killed subprocess);
* WAL gives concurrent readers alongside one writer (readers never block on the writer and
  see the last committed version); writers serialise on SQLite's lock (``BEGIN IMMEDIATE``)
  across processes, and on a lock inside this process;
* records are small (a window's cache is ~C * layers * 2 * D floats; 50 items, 2 layers,
  D=64: ~64 KiB) -- far below what makes a KV file format (LMDB) or ArrayRecord worth its
  extra dependency or its lack of in-place update.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import sqlite3
import threading
import time
from typing import Optional

import numpy as np

from userllm_jax.serving.state import Events, UserState


class VersionConflict(RuntimeError):
  """A concurrent writer changed the user's record first."""


class CorruptRecord(RuntimeError):
  """A stored blob does not match its checksum."""


def encode_state(state: UserState) -> tuple[str, bytes]:
  """``(metadata json, blob)`` of a state."""
  arrays = {"item": state.events.item, "rating": state.events.rating,
            "timestamp": state.events.timestamp, "timegap": state.events.timegap}
  if state.cache is not None:
    arrays.update({f"cache_{k}": v for k, v in state.cache.items()})
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  meta = {"total_events": state.total_events, "window_len": state.window_len,
          "updated_at": state.updated_at}
  return json.dumps(meta), buf.getvalue()


def decode_state(user_id: str, version: int, fp: str, meta: str, blob: bytes) -> UserState:
  m = json.loads(meta)
  with np.load(io.BytesIO(blob)) as z:
    arrays = {k: z[k] for k in z.files}
  cache = {k[len("cache_"):]: v for k, v in arrays.items() if k.startswith("cache_")} or None
  ev = Events(arrays["item"], arrays["rating"], arrays["timestamp"], arrays["timegap"])
  return UserState(user_id=user_id, fingerprint=fp, version=int(version), events=ev,
                   total_events=int(m["total_events"]), window_len=int(m["window_len"]),
                   cache=cache, updated_at=float(m.get("updated_at", 0.0)))


class UserStateStore(abc.ABC):
  """Abstract store (see the module doc); implementations must be thread-safe."""

  @abc.abstractmethod
  def get(self, user_id: str) -> Optional[UserState]:
    ...

  @abc.abstractmethod
  def put(self, state: UserState, expected_version: Optional[int]) -> UserState:
    """Writes ``state`` as version ``(expected_version or 0) + 1``; returns the stored state."""

  @abc.abstractmethod
  def delete(self, user_id: str) -> bool:
    ...

  @abc.abstractmethod
  def count(self) -> int:
    ...

  def close(self) -> None:
    pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS user_state (
  user_id     TEXT PRIMARY KEY,
  version     INTEGER NOT NULL,
  fingerprint TEXT NOT NULL,
  meta        TEXT NOT NULL,
  sha256      TEXT NOT NULL,
  blob        BLOB NOT NULL,
  updated_at  REAL NOT NULL
)
"""


class SQLiteStore(UserStateStore):
  """:class:`UserStateStore` in one SQLite file, WAL mode, ``synchronous=FULL``.

  One connection per thread (readers run concurrently); writes take an in-process lock and
  ``BEGIN IMMEDIATE`` (the one-writer lock across processes).
  """

  def __init__(self, path: str, *, timeout_s: float = 30.0):
    self.path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self.timeout_s = timeout_s
    self._local = threading.local()
    self._write_lock = threading.Lock()
    self._all: list[sqlite3.Connection] = []
    self._all_lock = threading.Lock()
    conn = self._conn()
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(_SCHEMA)

  def _conn(self) -> sqlite3.Connection:
    conn = getattr(self._local, "conn", None)
    if conn is None:
      conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None,
                             check_same_thread=False)
      conn.execute("PRAGMA synchronous=FULL")
      conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
      self._local.conn = conn
      with self._all_lock:
        self._all.append(conn)
    return conn

  def get(self, user_id: str) -> Optional[UserState]:
    row = self._conn().execute(
        "SELECT version, fingerprint, meta, sha256, blob FROM user_state WHERE user_id = ?",
        (user_id,)).fetchone()
    if row is None:
      return None
    version, fp, meta, digest, blob = row
    if hashlib.sha256(blob).hexdigest() != digest:
      raise CorruptRecord(f"{self.path}: user {user_id!r} version {version}: blob sha256 "
                          "mismatch")
    return decode_state(user_id, version, fp, meta, blob)

  def put(self, state: UserState, expected_version: Optional[int]) -> UserState:
    meta, blob = encode_state(state)
    digest = hashlib.sha256(blob).hexdigest()
    new_version = (expected_version or 0) + 1
    now = time.time()
    with self._write_lock:
      conn = self._conn()
      conn.execute("BEGIN IMMEDIATE")
      try:
        row = conn.execute("SELECT version FROM user_state WHERE user_id = ?",
                           (state.user_id,)).fetchone()
        current = None if row is None else int(row[0])
        if current != expected_version:
          raise VersionConflict(f"user {state.user_id!r}: stored version {current}, "
                                f"expected {expected_version}")
        conn.execute(
            "INSERT OR REPLACE INTO user_state (user_id, version, fingerprint, meta, sha256, "
            "blob, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (state.user_id, new_version, state.fingerprint, meta, digest, blob, now))
        conn.execute("COMMIT")
      except BaseException:
        conn.execute("ROLLBACK")
        raise
    state.version = new_version
    return state

  def delete(self, user_id: str) -> bool:
    with self._write_lock:
      cur = self._conn().execute("DELETE FROM user_state WHERE user_id = ?", (user_id,))
      return cur.rowcount > 0

  def count(self) -> int:
    return int(self._conn().execute("SELECT COUNT(*) FROM user_state").fetchone()[0])

  def close(self) -> None:
    with self._all_lock:
      for c in self._all:
        try:
          c.close()
        except sqlite3.Error:
          pass
      self._all.clear()
    self._local = threading.local()


class MemoryStore(UserStateStore):
  """In-process dict store (tests, benchmarks); same semantics, not durable."""

  def __init__(self):
    self._d: dict[str, tuple[str, str, bytes, int]] = {}
    self._lock = threading.Lock()

  def get(self, user_id):
    with self._lock:
      rec = self._d.get(user_id)
    return None if rec is None else decode_state(user_id, rec[3], rec[0], rec[1], rec[2])

  def put(self, state, expected_version):
    meta, blob = encode_state(state)
    with self._lock:
      rec = self._d.get(state.user_id)
      current = None if rec is None else rec[3]
      if current != expected_version:
        raise VersionConflict(f"user {state.user_id!r}: stored version {current}, expected "
                              f"{expected_version}")
      state.version = (expected_version or 0) + 1
      self._d[state.user_id] = (state.fingerprint, meta, blob, state.version)
    return state

  def delete(self, user_id):
    with self._lock:
      return self._d.pop(user_id, None) is not None

  def count(self):
    with self._lock:
      return len(self._d)
