"""Shared low-level helpers for the source readers: files, lines, numbers, JSON.

Every reader in this package goes through :func:`iter_lines`, which

* opens plain or gzip files (gzip is detected from the magic bytes, so a
  ``.gz`` suffix is not required and a mislabelled file still reads),
* yields ``(line_number, text)`` with 1-based physical line numbers (a header
  line counts as line 1),
* decodes each line on its own, so one undecodable line is one bad row,
* turns a truncated or corrupt gzip stream (``EOFError``,
  ``gzip.BadGzipFile``, ``zlib.error``) into one bad row at the line reached,
  after which the rest of that file is skipped,
* skips blank lines and notes how many it skipped.

Row parsers raise :class:`RowError`; readers turn it into
``report.bad(path, line, reason, kind)`` (which raises
:class:`~userllm_jax.data.schema.DataFormatError` in strict mode).
"""

from __future__ import annotations

import ast
import collections
import gzip
import json
import math
import os
import pathlib
import re
import zlib
from typing import IO, Any, Iterable, Iterator, Optional, Sequence, Union

from userllm_jax.data.schema import DataFormatError, MissingFileError, ReadReport

PathLike = Union[str, os.PathLike]

_GZIP_MAGIC = b"\x1f\x8b"
_INT_RE = re.compile(r"\s*[+-]?[0-9]+\s*")
# A number as a data file spells it: ASCII decimal, optional exponent (and the words
# inf/nan, rejected later as not finite). Python's float()/int() also take "1_000"
# and non-ASCII digits ("١٠٠٠"), which no data file means as a number.
_NUMBER_RE = re.compile(r"\s*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                        r"|inf|infinity|nan)\s*", re.IGNORECASE)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class RowError(ValueError):
  """One row cannot be parsed; ``kind`` is the ReadReport bucket."""

  def __init__(self, reason: str, kind: str = "malformed"):
    super().__init__(reason)
    self.kind = kind


# ---------------------------------------------------------------- files


def require_file(path: PathLike, what: str = "") -> pathlib.Path:
  """Returns ``path`` as a Path; raises MissingFileError if it is not a file."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise MissingFileError(str(p), what)
  return p


def require_dir(path: PathLike, what: str = "") -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.is_dir():
    raise MissingFileError(str(p), what or "expected a directory")
  return p


def find_file(directory: PathLike, name: str, what: str = "") -> pathlib.Path:
  """``directory/name`` or ``directory/name.gz``; MissingFileError names both."""
  d = pathlib.Path(directory)
  for candidate in (d / name, d / (name + ".gz")):
    if candidate.is_file():
      return candidate
  raise MissingFileError(str(d / name), (what + "; " if what else "")
                         + f"also looked for {d / (name + '.gz')}")


def open_binary(path: PathLike) -> IO[bytes]:
  """Opens ``path`` for binary reading, transparently gunzipping it."""
  p = require_file(path)
  with open(p, "rb") as f:
    magic = f.read(2)
  if magic == _GZIP_MAGIC:
    return gzip.open(p, "rb")
  return open(p, "rb")


# ---------------------------------------------------------------- lines


def iter_lines(path: PathLike, *, report: ReadReport,
               encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
  """Yields ``(line_number, line)`` without the line ending; see module doc."""
  path = str(path)
  lineno = 0
  blank = 0
  f = open_binary(path)
  try:
    for raw in f:
      lineno += 1
      try:
        line = raw.decode(encoding)
      except UnicodeDecodeError as e:
        report.bad(path, lineno, f"not valid {encoding}: {e}", "encoding")
        continue
      line = line.rstrip("\r\n")
      if not line or line.isspace():
        blank += 1
        continue
      yield lineno, line
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    report.bad(path, lineno + 1,
               f"compressed stream ends early or is corrupt after line "
               f"{lineno} ({type(e).__name__}: {e}); rest of file skipped",
               "truncated_file")
  finally:
    f.close()
  if blank:
    report.note(f"{path}: skipped {blank} blank line(s)")


# ---------------------------------------------------------------- values


def parse_number(value: Any, field: str) -> float:
  """A finite float from a str/int/float (bools and NaN/inf are rejected)."""
  if isinstance(value, bool) or value is None:
    raise RowError(f"{field}: expected a number, got {value!r}", "bad_number")
  if isinstance(value, (int, float)):
    try:
      x = float(value)
    except OverflowError:
      raise RowError(f"{field}: number out of range: {value!r:.40}",
                     "bad_number") from None
  elif isinstance(value, str):
    try:
      if not _NUMBER_RE.fullmatch(value):
        raise ValueError(value)
      x = float(value)
    except ValueError:
      raise RowError(f"{field}: expected a number, got {value!r}",
                     "bad_number") from None
  else:
    raise RowError(f"{field}: expected a number, got {type(value).__name__} "
                   f"{value!r}", "bad_number")
  if not math.isfinite(x):
    raise RowError(f"{field}: expected a finite number, got {value!r}",
                   "bad_number")
  return x


MAX_RATING = 100.0


def is_plain_number(text: str) -> bool:
  """True when ``text`` is spelled as a data file's number (see ``_NUMBER_RE``); the
  readers' fast paths check it because ``float``/``int`` alone accept ``"1_000"``."""
  return text.isascii() and "_" not in text


def parse_rating(value: Any, field: str = "rating") -> float:
  """A rating: a finite number in [0, MAX_RATING] (covers 1-5, 1-10 and 0-100 scales).

  A negative or astronomically large value is a corrupted field, not a rating.
  """
  x = parse_number(value, field)
  if not 0.0 <= x <= MAX_RATING:
    raise RowError(f"{field}: rating out of range [0, {MAX_RATING:g}]: {value!r:.40}",
                   "bad_number")
  return x


def parse_seconds(value: Any, field: str = "timestamp", *,
                  milliseconds: bool = False) -> int:
  """Integer Unix seconds (floored) from seconds or milliseconds.

  The result must fit in int64 (downstream arrays are int64).
  """
  # Exact integer path first: millisecond values exceed float precision.
  if isinstance(value, int) and not isinstance(value, bool):
    ival = value
  elif isinstance(value, str) and _INT_RE.fullmatch(value):
    try:
      ival = int(value)
    except ValueError:  # Over sys.get_int_max_str_digits() digits.
      raise RowError(f"{field}: integer too long ({len(value)} chars)",
                     "bad_number") from None
  else:
    x = parse_number(value, field)
    ival = math.floor(x / 1000.0) if milliseconds else math.floor(x)
    milliseconds = False
  if milliseconds:
    ival //= 1000
  if not INT64_MIN <= ival <= INT64_MAX:
    raise RowError(f"{field}: {value!r:.40} is out of the int64 range",
                   "bad_number")
  return ival


def parse_id(value: Any, field: str) -> str:
  """A non-empty identifier; ints are accepted and turned into strings."""
  if isinstance(value, bool) or value is None:
    raise RowError(f"{field}: missing or null", "missing_field")
  if isinstance(value, int):
    return str(value)
  if not isinstance(value, str):
    raise RowError(f"{field}: expected a string id, got "
                   f"{type(value).__name__} {value!r}", "bad_field")
  value = value.strip()
  if not value:
    raise RowError(f"{field}: empty", "missing_field")
  return value


def optional_text(value: Any, field: str) -> Optional[str]:
  if value is None:
    return None
  if not isinstance(value, str):
    raise RowError(f"{field}: expected a string, got {type(value).__name__}",
                   "bad_field")
  return value


def string_list(value: Any, field: str) -> tuple[str, ...]:
  """A list of strings (None -> empty); entries stripped, empties dropped."""
  if value is None:
    return ()
  if not isinstance(value, (list, tuple)):
    raise RowError(f"{field}: expected a list of strings, got "
                   f"{type(value).__name__}", "bad_field")
  out = []
  for v in value:
    if not isinstance(v, str):
      raise RowError(f"{field}: expected a list of strings, found "
                     f"{type(v).__name__} {v!r}", "bad_field")
    v = v.strip()
    if v:
      out.append(v)
  return tuple(out)


def unique(values: Iterable[str]) -> tuple[str, ...]:
  """Order-preserving de-duplication."""
  return tuple(dict.fromkeys(values))


def require_key(obj: dict, key: str) -> Any:
  if key not in obj:
    raise RowError(f"missing required field {key!r}", "missing_field")
  return obj[key]


# ---------------------------------------------------------------- JSON


def parse_json_object(line: str, *, python_literals: bool = False) -> dict:
  """One JSON object per line; optionally a Python dict literal instead.

  The original Amazon 2014 metadata files are ``repr()`` of Python dicts
  (single quotes), so with ``python_literals=True`` a line that is not strict
  JSON is tried with :func:`ast.literal_eval` (safe: literals only).
  """
  try:
    obj = json.loads(line)
  except (ValueError, RecursionError) as e:
    if not python_literals:
      raise RowError(f"not valid JSON: {e}", "bad_json") from None
    try:
      obj = ast.literal_eval(line)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError,
            UnicodeError) as e2:
      raise RowError(f"neither JSON nor a Python literal: {e}; "
                     f"{type(e2).__name__}: {e2}", "bad_json") from None
  if not isinstance(obj, dict):
    raise RowError(f"expected a JSON object, got {type(obj).__name__}",
                   "bad_json")
  return obj


def iter_json_objects(path: PathLike, *, report: ReadReport,
                      python_literals: bool = False
                      ) -> Iterator[tuple[int, dict]]:
  """``(line_number, dict)`` for each JSON-lines row; bad rows reported."""
  for lineno, line in iter_lines(path, report=report):
    try:
      obj = parse_json_object(line, python_literals=python_literals)
    except RowError as e:
      report.bad(str(path), lineno, str(e), e.kind)
      continue
    yield lineno, obj


# ---------------------------------------------------------------- joins


class MissingItems:
  """Counts interactions whose item has no row in the item/meta file.

  Such interactions are kept (dropping them would silently shrink user
  histories) with ``title=None`` and ``genres=()``; :meth:`finish` records
  one note in the report.
  """

  def __init__(self, item_path: PathLike):
    self.item_path = str(item_path)
    self.rows = 0
    self.items: collections.Counter = collections.Counter()

  def add(self, item: str) -> None:
    self.rows += 1
    self.items[item] += 1

  def features(self, meta: Optional[tuple], item: str) -> tuple:
    """``(title, genres)`` from an item-table lookup; counts the item when absent."""
    if meta is None:
      self.add(item)
      return None, ()
    return meta

  def finish(self, report: ReadReport) -> None:
    if not self.rows:
      return
    examples = ", ".join(repr(k) for k, _ in self.items.most_common(5))
    report.note(
        f"{self.rows} interaction(s) on {len(self.items)} item(s) absent from "
        f"{self.item_path} were kept with title=None, genres=() "
        f"(e.g. {examples})")


def check_header(path: PathLike, got: Sequence[str],
                 required: Sequence[str]) -> dict[str, int]:
  """Maps required column names to positions; raises DataFormatError."""
  index = {name: i for i, name in enumerate(got)}
  missing = [r for r in required if r not in index]
  if missing:
    raise DataFormatError(str(path), 1,
                          f"header is missing column(s) {missing}: expected "
                          f"{list(required)}, got {list(got)}")
  return index


def split_source(source: Union[PathLike, Sequence[PathLike]]) -> list[str]:
  """A source given as a path, 'a,b' string, or a list -> list of strings."""
  if isinstance(source, (list, tuple)):
    return [str(s) for s in source]
  s = str(source)
  if "," in s and not os.path.exists(s):
    return [part.strip() for part in s.split(",") if part.strip()]
  return [s]
