"""RecBole atomic files (``<name>.inter`` + optional ``<name>.item``).

Format (https://recbole.io/docs/user_guide/data/atomic_files.html): UTF-8,
tab-separated, a header of ``name:type`` columns where type is one of
``token``, ``token_seq``, ``float``, ``float_seq``; ``token_seq`` values are
space-separated.  Columns are mapped by name, never by position:

* ``.inter``: ``user_id``, ``item_id``, ``timestamp`` (required), ``rating``
  (optional -> ``None``), a review column (``review``/``review_text``/
  ``text``, optional).  Field names can be overridden (``user_field=`` ...)
  for datasets whose RecBole config renames them.
* ``.item`` (optional; absent -> every title ``None`` and a note):
  title from the first of ``movie_title``/``title``/``name`` present, genres
  from the first of ``class``/``genre``/``genres``/``categories``/
  ``category`` (split on ``seq_separator``).  When a ``release_year`` column
  holds a 4-digit year and ``title_with_year`` is True (default), the title
  becomes ``"Toy Story (1995)"``, matching the original MovieLens titles.

``source`` is a directory holding exactly one ``*.inter`` file (or several,
then ``dataset=`` picks ``<dataset>.inter``), or the ``.inter`` path itself.
"""

from __future__ import annotations

import pathlib
import re
from typing import Iterator, Optional, Sequence

from userllm_jax.data.schema import DataFormatError, Interaction, ReadReport
from userllm_jax.data.sources import _io

TYPES = ("token", "token_seq", "float", "float_seq")
TITLE_FIELDS = ("movie_title", "title", "name")
GENRE_FIELDS = ("class", "genre", "genres", "categories", "category")
REVIEW_FIELDS = ("review", "review_text", "text")
_YEAR = re.compile(r"[0-9]{4}")


def _resolve_inter(source: _io.PathLike,
                   dataset: Optional[str] = None) -> pathlib.Path:
  p = pathlib.Path(source)
  if p.is_dir():
    if dataset:
      return _io.find_file(p, f"{dataset}.inter", "RecBole interactions")
    found = sorted(list(p.glob("*.inter")) + list(p.glob("*.inter.gz")))
    if not found:
      raise _io.MissingFileError(str(p / "<name>.inter"),
                                 "no RecBole .inter file in the directory")
    if len(found) > 1:
      raise _io.DataFormatError(
          str(p), None, f"several .inter files {[f.name for f in found]}; "
          "pass the .inter path or dataset=<name>")
    return found[0]
  if p.name.endswith((".inter", ".inter.gz")):
    return _io.require_file(p, "RecBole interactions")
  raise _io.MissingFileError(str(p), "expected a directory or a .inter file")


def _item_path(inter: pathlib.Path) -> Optional[pathlib.Path]:
  stem = inter.name[:-len(".gz")] if inter.name.endswith(".gz") else inter.name
  stem = stem[:-len(".inter")]
  for name in (stem + ".item", stem + ".item.gz"):
    if (inter.parent / name).is_file():
      return inter.parent / name
  return None


def recbole_files(source: _io.PathLike,
                  dataset: Optional[str] = None) -> list[pathlib.Path]:
  inter = _resolve_inter(source, dataset)
  item = _item_path(inter)
  return [inter] + ([item] if item else [])


def _header(path: pathlib.Path, lines) -> tuple[list[str], dict[str, int]]:
  first = next(lines, None)
  if first is None:
    raise DataFormatError(str(path), None, "empty file; expected a "
                          "'name:type' header")
  lineno, line = first
  names, types = [], []
  for col in line.lstrip("\ufeff").split("\t"):
    name, sep, typ = col.strip().partition(":")
    if not sep or typ not in TYPES or not name:
      raise DataFormatError(
          str(path), lineno,
          f"header column {col!r} is not 'name:type' with type in {TYPES}")
    names.append(name)
    types.append(typ)
  if len(set(names)) != len(names):
    raise DataFormatError(str(path), lineno, f"duplicate columns in {names}")
  return types, {n: i for i, n in enumerate(names)}


def _first(index: dict[str, int], candidates: Sequence[str]) -> Optional[int]:
  for c in candidates:
    if c in index:
      return index[c]
  return None


def _read_items(path: pathlib.Path, item_field: str, seq_separator: str,
                title_with_year: bool,
                report: ReadReport) -> dict[str, tuple]:
  lines = _io.iter_lines(path, report=report)
  _, index = _header(path, lines)
  if item_field not in index:
    raise DataFormatError(str(path), 1, f"no {item_field!r} column; got "
                          f"{sorted(index)}")
  i_item = index[item_field]
  i_title = _first(index, TITLE_FIELDS)
  i_genre = _first(index, GENRE_FIELDS)
  i_year = index.get("release_year")
  n = len(index)
  items: dict[str, tuple] = {}
  dups = 0
  for lineno, line in lines:
    parts = line.split("\t")
    try:
      if len(parts) != n:
        raise _io.RowError(f"expected {n} tab-separated fields, got "
                           f"{len(parts)}", "field_count")
      item = _io.parse_id(parts[i_item], item_field)
    except _io.RowError as e:
      report.bad(str(path), lineno, str(e), e.kind)
      continue
    title = parts[i_title].strip() if i_title is not None else None
    if title is not None and i_year is not None and title_with_year:
      year = parts[i_year].strip()
      if _YEAR.fullmatch(year):
        title = f"{title} ({year})"
    genres = ()
    if i_genre is not None:
      genres = tuple(g for g in parts[i_genre].strip().split(seq_separator)
                     if g.strip())
    if item in items:
      dups += 1
      continue
    items[item] = (title or None, genres)
  if dups:
    report.note(f"{path}: {dups} duplicate item row(s); the first one of "
                "each id was kept")
  return items


def read_recbole(source: _io.PathLike, *, report: ReadReport,
                 dataset: Optional[str] = None,
                 user_field: str = "user_id", item_field: str = "item_id",
                 time_field: str = "timestamp", rating_field: str = "rating",
                 seq_separator: str = " ",
                 title_with_year: bool = True) -> Iterator[Interaction]:
  """Reads RecBole atomic files; see the module docstring."""
  inter = _resolve_inter(source, dataset)
  item_path = _item_path(inter)
  if item_path is None:
    items = None
    report.note(f"{inter}: no matching .item file; titles and genres are "
                "empty")
  else:
    items = _read_items(item_path, item_field, seq_separator,
                        title_with_year, report)
  lines = _io.iter_lines(inter, report=report)
  _, index = _header(inter, lines)
  missing_cols = [f for f in (user_field, item_field, time_field)
                  if f not in index]
  if missing_cols:
    raise DataFormatError(str(inter), 1,
                          f"header lacks required column(s) {missing_cols}; "
                          f"got {sorted(index)}")
  i_user, i_item, i_time = (index[user_field], index[item_field],
                            index[time_field])
  i_rating = index.get(rating_field)
  i_review = _first(index, REVIEW_FIELDS)
  n = len(index)
  missing = _io.MissingItems(item_path) if items is not None else None
  path = str(inter)
  for lineno, line in lines:
    parts = line.split("\t")
    try:  # Fast path for well-formed rows with integer timestamps.
      if len(parts) != n:
        raise ValueError
      user = parts[i_user].strip()
      item = parts[i_item].strip()
      t_text = parts[i_time]
      ts = int(t_text)
      rating = None if i_rating is None else float(parts[i_rating])
      # The same checks as the slow path (parse_seconds / parse_rating); NaN fails the range.
      if (not user or not item or not _io.INT64_MIN <= ts <= _io.INT64_MAX
          or not _io.is_plain_number(t_text)
          or (rating is not None and (not 0.0 <= rating <= _io.MAX_RATING
                                      or not _io.is_plain_number(parts[i_rating])))):
        raise ValueError
    except ValueError:
      try:
        if len(parts) != n:
          raise _io.RowError(f"expected {n} tab-separated fields, got "
                             f"{len(parts)}", "field_count") from None
        user = _io.parse_id(parts[i_user], user_field)
        item = _io.parse_id(parts[i_item], item_field)
        ts = _io.parse_seconds(parts[i_time], time_field)
        rating = (None if i_rating is None
                  else _io.parse_rating(parts[i_rating], rating_field))
      except _io.RowError as e:
        report.bad(path, lineno, str(e), e.kind)
        continue
    title, genres = None, ()
    if items is not None:
      meta = items.get(item)
      if meta is None:
        missing.add(item)
      else:
        title, genres = meta
    review = parts[i_review] if i_review is not None else None
    report.ok()
    yield Interaction(user, item, ts, rating, title, genres, review or None)
  if missing is not None:
    missing.finish(report)
