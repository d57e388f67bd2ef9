"""Google Local Reviews (2021 release, UCSD) reader.

Per US state a reviews file ``review-<State>.json.gz`` (or the k-core
``review-<State>_10.json.gz``) and a metadata file ``meta-<State>.json.gz``,
JSON lines, plain or gzipped.

* reviews: user <- ``user_id``, item <- ``gmap_id``, rating <- ``rating``,
  timestamp <- ``time`` (milliseconds, floored to seconds), review <-
  ``text`` (optional, may be null).
* metadata: ``gmap_id``, title <- ``name``, genres <- ``category`` (a list
  or null).

``--source`` is a directory (all states found there are read, in sorted
order, unless ``state=`` picks one), one reviews file (its metadata file is
looked up next to it), or ``REVIEWS,META`` explicitly.  Metadata of all
selected states is pooled (businesses near state borders appear in both).
Reviews whose business has no metadata row are kept with ``title=None``.
"""

from __future__ import annotations

import pathlib
import re
from typing import Iterator, Optional, Sequence, Union

from userllm_jax.data.schema import (DataError, Interaction, MissingFileError,
                                     ReadReport)
from userllm_jax.data.sources import _io

Source = Union[_io.PathLike, Sequence[_io.PathLike]]
_REVIEW = re.compile(r"review-(?P<state>.+?)(?:_\d+)?\.jsonl?(?:\.gz)?")


def _meta_for(directory: pathlib.Path, state: str) -> pathlib.Path:
  for ext in (".json.gz", ".json", ".jsonl.gz", ".jsonl"):
    p = directory / f"meta-{state}{ext}"
    if p.is_file():
      return p
  raise MissingFileError(str(directory / f"meta-{state}.json.gz"),
                         f"Google Local metadata for {state!r}; or pass "
                         "--source=REVIEWS,META")


def resolve(source: Source, state: Optional[str] = None
            ) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """[(reviews, meta)] pairs to read."""
  parts = _io.split_source(source)
  if len(parts) == 2:
    return [(_io.require_file(parts[0], "Google Local reviews"),
             _io.require_file(parts[1], "Google Local metadata"))]
  if len(parts) != 1:
    raise DataError(f"Google Local source must be a directory, a reviews "
                    f"file or REVIEWS,META; got {parts}")
  p = pathlib.Path(parts[0])
  if p.is_file():
    m = _REVIEW.fullmatch(p.name)
    if not m:
      raise DataError(f"{p}: expected a file named review-<State>.json.gz "
                      "(or pass --source=REVIEWS,META)")
    return [(p, _meta_for(p.parent, m.group("state")))]
  if not p.is_dir():
    raise MissingFileError(str(p), "Google Local directory or reviews file")
  pairs = []
  by_state: dict[str, list[pathlib.Path]] = {}
  for f in sorted(p.iterdir()):
    m = _REVIEW.fullmatch(f.name)
    if m and f.is_file() and (state is None or m.group("state") == state):
      by_state.setdefault(m.group("state"), []).append(f)
  if not by_state:
    raise MissingFileError(str(p / f"review-{state or '<State>'}.json.gz"),
                           "Google Local reviews")
  for st, files in sorted(by_state.items()):
    if len(files) > 1:
      raise DataError(f"{p}: several reviews files for {st!r}: "
                      f"{[f.name for f in files]}; pass one explicitly")
    pairs.append((files[0], _meta_for(p, st)))
  return pairs


def google_local_files(source: Source,
                       state: Optional[str] = None) -> list[pathlib.Path]:
  return [f for pair in resolve(source, state) for f in pair]


def _read_meta(path: pathlib.Path, items: dict, report: ReadReport) -> int:
  dups = 0
  interned: dict[tuple, tuple] = {}
  for lineno, obj in _io.iter_json_objects(path, report=report):
    try:
      item = _io.parse_id(_io.require_key(obj, "gmap_id"), "gmap_id")
      title = _io.optional_text(obj.get("name"), "name")
      genres = _io.unique(_io.string_list(obj.get("category"), "category"))
    except _io.RowError as e:
      report.bad(str(path), lineno, str(e), e.kind)
      continue
    if item in items:
      dups += 1
      continue
    items[item] = ((title or "").strip() or None,
                   interned.setdefault(genres, genres))
  return dups


def read_google_local(source: Source, *, report: ReadReport,
                      state: Optional[str] = None) -> Iterator[Interaction]:
  """Reads Google Local reviews joined with business metadata."""
  pairs = resolve(source, state)
  items: dict[str, tuple] = {}
  dups = 0
  for _, meta in pairs:
    dups += _read_meta(meta, items, report)
  if dups:
    report.note(f"{dups} duplicate business metadata row(s) in "
                f"{[str(m) for _, m in pairs]}; the first one was kept")
  missing = _io.MissingItems(", ".join(str(m) for _, m in pairs))
  for reviews, _ in pairs:
    for lineno, obj in _io.iter_json_objects(reviews, report=report):
      try:
        user = _io.parse_id(_io.require_key(obj, "user_id"), "user_id")
        item = _io.parse_id(_io.require_key(obj, "gmap_id"), "gmap_id")
        rating = _io.parse_rating(_io.require_key(obj, "rating"), "rating")
        ts = _io.parse_seconds(_io.require_key(obj, "time"), "time",
                               milliseconds=True)
        review = _io.optional_text(obj.get("text"), "text")
      except _io.RowError as e:
        report.bad(str(reviews), lineno, str(e), e.kind)
        continue
      title, genres = missing.features(items.get(item), item)
      report.ok()
      yield Interaction(user=user, item=item, timestamp=ts, rating=rating,
                        title=title, genres=genres, review=review)
  missing.finish(report)
