"""The one record every reader yields, and the bad-row bookkeeping they share.

Every source reader (``data/sources/*``) turns its files into a stream of
:class:`Interaction` rows.  Rows that cannot be parsed are never silently
dropped: they are counted in a :class:`ReadReport` together with ``file:line``
and the first few examples, and in strict mode they raise
:class:`DataFormatError` naming the file and line.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

MAX_EXAMPLES = 5


class DataError(Exception):
  """Base class for data-layer errors (bad files, bad settings)."""


class DataFormatError(DataError):
  """A row or file that cannot be parsed; the message names file:line."""

  def __init__(self, path: str, line: Optional[int], reason: str):
    self.path = str(path)
    self.line = line
    self.reason = reason
    where = f"{self.path}:{line}" if line is not None else self.path
    super().__init__(f"{where}: {reason}")


class MissingFileError(DataError, FileNotFoundError):
  """A file the reader expected is absent; the message names the path."""

  def __init__(self, path: str, what: str = ""):
    self.path = str(path)
    msg = f"expected file not found: {self.path}"
    if what:
      msg += f" ({what})"
    super().__init__(msg)


@dataclasses.dataclass(frozen=True)
class Interaction:
  """One user-item event.

  ``timestamp`` is always integer seconds since the Unix epoch (readers of
  sources that store milliseconds divide by 1000 and floor).  ``rating`` is
  ``None`` when the source has none.  ``genres`` holds genres (MovieLens) or
  categories (Amazon, Google Local) in source order.
  """

  user: str
  item: str
  timestamp: int
  rating: Optional[float] = None
  title: Optional[str] = None
  genres: tuple[str, ...] = ()
  review: Optional[str] = None


@dataclasses.dataclass
class ReadReport:
  """Counts of good and bad rows; bad rows keep file:line and a reason.

  With ``strict=True`` the first bad row raises :class:`DataFormatError`.
  """

  strict: bool = False
  rows_ok: int = 0
  rows_bad: int = 0
  examples: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  by_reason: dict[str, int] = dataclasses.field(default_factory=dict)

  def ok(self, n: int = 1) -> None:
    self.rows_ok += n

  def bad(self, path: str, line: Optional[int], reason: str,
          kind: str = "malformed") -> None:
    """Records a bad row; raises in strict mode."""
    if self.strict:
      raise DataFormatError(path, line, reason)
    self.rows_bad += 1
    self.by_reason[kind] = self.by_reason.get(kind, 0) + 1
    if len(self.examples) < MAX_EXAMPLES:
      where = f"{path}:{line}" if line is not None else str(path)
      self.examples.append(f"{where}: {reason}")

  def note(self, message: str) -> None:
    """Non-fatal observations (e.g. users emptied by filtering)."""
    self.notes.append(message)

  def summary(self) -> str:
    s = f"{self.rows_ok} rows read, {self.rows_bad} skipped"
    if self.by_reason:
      s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.by_reason.items())) + ")"
    if self.examples:
      s += "; first examples:\n  " + "\n  ".join(self.examples)
    return s

  def to_json(self) -> dict:
    return {
        "rows_ok": self.rows_ok,
        "rows_bad": self.rows_bad,
        "by_reason": dict(self.by_reason),
        "examples": list(self.examples),
        "notes": list(self.notes),
    }
