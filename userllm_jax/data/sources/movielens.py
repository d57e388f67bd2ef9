"""MovieLens readers: ml-100k, ml-1m and the CSV releases (ml-20m/25m/32m).

Layouts (as unpacked from the GroupLens zips; any file may also be gzipped,
with or without a ``.gz`` suffix):

* ``ml-100k/``: ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``),
  ``u.item`` (``|``-separated, latin-1: id, title, release date, video
  release date, IMDb URL, then one 0/1 flag per genre), ``u.genre``
  (``name|index``; gives the flag order).
* ``ml-1m/``: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and
  ``movies.dat`` (``MovieID::Title::Genres``, genres ``|``-separated),
  latin-1.
* ``ml-20m/``, ``ml-25m/``, ``ml-32m/``: ``ratings.csv``
  (``userId,movieId,rating,timestamp`` with a header) and ``movies.csv``
  (``movieId,title,genres``; titles with commas are double-quoted), UTF-8;
  ``(no genres listed)`` means no genres.  Columns are mapped by header name.

Titles and genre names are kept exactly as the source spells them (e.g. ml-1m
says ``Children's`` where ml-20m says ``Children``).  Fields are stripped of
surrounding whitespace.  Interactions whose item is missing from the item
file are kept with ``title=None`` (see ``_io.MissingItems``).

Values are checked on every path, fast or not: a rating must be a number in
``[0, _io.MAX_RATING]`` (``_io.parse_rating``), a timestamp whole Unix seconds at or
after 1995-01-01 (:data:`MIN_TIMESTAMP`), both spelled as plain ASCII numbers (no
``1_000``); any other row is counted bad with its ``file:line``.
"""

from __future__ import annotations

import csv
import pathlib
from typing import Iterator

from userllm_jax.data.schema import DataFormatError, Interaction, ReadReport
from userllm_jax.data.sources import _io

ItemTable = dict[str, tuple[str, tuple[str, ...]]]

NO_GENRES = "(no genres listed)"


# ------------------------------------------------------------------ helpers

# 1995-01-01T00:00:00Z. MovieLens ratings start on 1995-01-09 (ml-20m/25m/32m READMEs; ml-100k
# and ml-1m are later), so an earlier Unix time in a MovieLens file is a corrupted field.
MIN_TIMESTAMP = 788_918_400


def _read_ratings(path: pathlib.Path, lines, split, names: str,
                  positions: tuple[int, int, int, int], items: ItemTable,
                  item_path: pathlib.Path,
                  report: ReadReport) -> Iterator[Interaction]:
  """Rating lines -> Interactions joined with ``items``.

  The fast path handles well-formed rows (integer timestamps); anything it
  does not accept goes through :func:`_rating_row`, which either parses it
  (e.g. a float timestamp) or reports why it is bad.
  """
  path_s = str(path)
  ncols = len(names.split(","))
  pu, pi, pr, pt = positions
  missing = _io.MissingItems(item_path)
  get = items.get
  for lineno, line in lines:
    try:
      parts = split(line)
    except _io.RowError as e:
      report.bad(path_s, lineno, str(e), e.kind)
      continue
    try:
      if len(parts) != ncols:
        raise ValueError
      user = parts[pu].strip()
      item = parts[pi].strip()
      r_text, t_text = parts[pr], parts[pt]
      rating = float(r_text)
      ts = int(t_text)
      # The same checks as _rating_row (parse_rating / parse_seconds / MIN_TIMESTAMP);
      # NaN fails the range test.
      if (not user or not item or not 0.0 <= rating <= _io.MAX_RATING
          or not MIN_TIMESTAMP <= ts <= _io.INT64_MAX
          or not _io.is_plain_number(r_text) or not _io.is_plain_number(t_text)):
        raise ValueError
    except ValueError:
      row = _rating_row(path_s, lineno, parts, names, report, positions)
      if row is None:
        continue
      user, item, rating, ts = row
    title, genres = missing.features(get(item), item)
    report.ok()
    yield Interaction(user, item, ts, rating, title, genres)
  missing.finish(report)


def _rating_row(path: str, lineno: int, parts: list[str], names: str,
                report: ReadReport, positions=(0, 1, 2, 3)):
  """(user, item, rating, ts) from split fields, or None after report.bad."""
  try:
    if len(parts) != len(names.split(",")):
      raise _io.RowError(
          f"expected {len(names.split(','))} fields ({names}), got "
          f"{len(parts)}", "field_count")
    u, i, r, t = (parts[positions[0]], parts[positions[1]],
                  parts[positions[2]], parts[positions[3]])
    user = _io.parse_id(u, "user")
    item = _io.parse_id(i, "item")
    rating = _io.parse_rating(r.strip(), "rating")
    ts = _io.parse_seconds(t.strip(), "timestamp")
    if ts < MIN_TIMESTAMP:
      raise _io.RowError(
          f"timestamp: {t.strip()!r:.40} is before 1995-01-01 ({MIN_TIMESTAMP}), earlier "
          "than any MovieLens rating", "bad_number")
  except _io.RowError as e:
    report.bad(path, lineno, str(e), e.kind)
    return None
  return user, item, rating, ts


def _add_item(items: ItemTable, item: str, title: str,
              genres: tuple[str, ...], dup: list[int]) -> None:
  if item in items:
    dup[0] += 1
    return
  items[item] = (title, genres)


def _note_dups(report: ReadReport, path, dup: list[int]) -> None:
  if dup[0]:
    report.note(f"{path}: {dup[0]} duplicate item row(s); the first one of "
                "each id was kept")


# ------------------------------------------------------------------ ml-100k


def ml100k_files(path: _io.PathLike) -> list[pathlib.Path]:
  d = _io.require_dir(path, "ml-100k directory with u.data, u.item, u.genre")
  return [_io.find_file(d, "u.data", "ml-100k ratings"),
          _io.find_file(d, "u.item", "ml-100k items"),
          _io.find_file(d, "u.genre", "ml-100k genre names")]


def _read_u_genre(path: pathlib.Path, report: ReadReport) -> list[str]:
  by_index: dict[int, str] = {}
  for lineno, line in _io.iter_lines(path, report=report,
                                     encoding="latin-1"):
    parts = line.split("|")
    try:
      if len(parts) != 2:
        raise _io.RowError(f"expected 'name|index', got {line!r}",
                           "field_count")
      idx = int(parts[1].strip())
    except (ValueError, _io.RowError) as e:
      raise DataFormatError(str(path), lineno, f"bad genre line: {e}") \
          from None
    by_index[idx] = parts[0].strip()
  if sorted(by_index) != list(range(len(by_index))) or not by_index:
    raise DataFormatError(str(path), None,
                          f"genre indices must be 0..n-1, got "
                          f"{sorted(by_index)}")
  return [by_index[i] for i in range(len(by_index))]


def _read_u_item(path: pathlib.Path, genre_names: list[str],
                 report: ReadReport) -> ItemTable:
  items: ItemTable = {}
  dup = [0]
  want = 5 + len(genre_names)
  for lineno, line in _io.iter_lines(path, report=report,
                                     encoding="latin-1"):
    parts = line.split("|")
    try:
      if len(parts) != want:
        raise _io.RowError(
            f"expected {want} '|'-separated fields (id, title, release date, "
            f"video release date, URL, {len(genre_names)} genre flags), got "
            f"{len(parts)}", "field_count")
      item = _io.parse_id(parts[0], "item")
      flags = [p.strip() for p in parts[5:]]
      bad = [f for f in flags if f not in ("0", "1")]
      if bad:
        raise _io.RowError(f"genre flags must be 0 or 1, got {bad[0]!r}",
                           "bad_field")
    except _io.RowError as e:
      report.bad(str(path), lineno, str(e), e.kind)
      continue
    genres = tuple(g for g, f in zip(genre_names, flags) if f == "1")
    _add_item(items, item, parts[1].strip(), genres, dup)
  _note_dups(report, path, dup)
  return items


def read_ml100k(path: _io.PathLike, *,
                report: ReadReport) -> Iterator[Interaction]:
  """Reads an unpacked ml-100k directory (u.data, u.item, u.genre)."""
  data, item_path, genre_path = ml100k_files(path)
  genre_names = _read_u_genre(genre_path, report)
  items = _read_u_item(item_path, genre_names, report)

  yield from _read_ratings(
      data, _io.iter_lines(data, report=report, encoding="latin-1"),
      lambda line: line.split("\t"), "user,item,rating,timestamp",
      (0, 1, 2, 3), items, item_path, report)


# ------------------------------------------------------------------ ml-1m


def ml1m_files(path: _io.PathLike) -> list[pathlib.Path]:
  d = _io.require_dir(path, "ml-1m directory with ratings.dat, movies.dat")
  return [_io.find_file(d, "ratings.dat", "ml-1m ratings"),
          _io.find_file(d, "movies.dat", "ml-1m movies")]


def _read_movies_dat(path: pathlib.Path, report: ReadReport) -> ItemTable:
  items: ItemTable = {}
  dup = [0]
  for lineno, line in _io.iter_lines(path, report=report,
                                     encoding="latin-1"):
    parts = line.split("::")
    try:
      if len(parts) != 3:
        raise _io.RowError(
            f"expected 3 '::'-separated fields (MovieID, Title, Genres), got "
            f"{len(parts)}", "field_count")
      item = _io.parse_id(parts[0], "MovieID")
    except _io.RowError as e:
      report.bad(str(path), lineno, str(e), e.kind)
      continue
    genres = tuple(g.strip() for g in parts[2].split("|") if g.strip())
    _add_item(items, item, parts[1].strip(), genres, dup)
  _note_dups(report, path, dup)
  return items


def read_ml1m(path: _io.PathLike, *,
              report: ReadReport) -> Iterator[Interaction]:
  """Reads an unpacked ml-1m directory (ratings.dat, movies.dat)."""
  data, item_path = ml1m_files(path)
  items = _read_movies_dat(item_path, report)

  yield from _read_ratings(
      data, _io.iter_lines(data, report=report, encoding="latin-1"),
      lambda line: line.split("::"), "UserID,MovieID,Rating,Timestamp",
      (0, 1, 2, 3), items, item_path, report)


# ------------------------------------------------------------------ CSV


def ml_csv_files(path: _io.PathLike) -> list[pathlib.Path]:
  d = _io.require_dir(path, "MovieLens directory with ratings.csv, "
                            "movies.csv")
  return [_io.find_file(d, "ratings.csv", "MovieLens ratings"),
          _io.find_file(d, "movies.csv", "MovieLens movies")]


def _csv_fields(line: str) -> list[str]:
  if '"' not in line:
    return line.split(",")
  try:
    return next(csv.reader([line]), [])
  except csv.Error as e:  # e.g. a field over csv.field_size_limit().
    raise _io.RowError(f"unparsable CSV: {e}", "bad_csv") from None


def _csv_header(path: pathlib.Path, lines, required: tuple[str, ...]
                ) -> tuple[dict[str, int], list[str]]:
  """Consumes the header line; (name -> column, header columns)."""
  first = next(lines, None)
  if first is None:
    raise DataFormatError(str(path), None,
                          f"empty file; expected a header {list(required)}")
  lineno, header = first
  try:
    cols = [c.strip() for c in _csv_fields(header.lstrip("\ufeff"))]
  except _io.RowError as e:
    raise DataFormatError(str(path), lineno, f"bad header: {e}") from None
  if lineno != 1:
    raise DataFormatError(str(path), lineno,
                          f"expected the header on line 1; got {header!r}")
  return _io.check_header(path, cols, required), cols


def _read_movies_csv(path: pathlib.Path, report: ReadReport) -> ItemTable:
  items: ItemTable = {}
  dup = [0]
  lines = _io.iter_lines(path, report=report)
  index, cols = _csv_header(path, lines, ("movieId", "title", "genres"))
  for lineno, line in lines:
    try:
      parts = _csv_fields(line)
      if len(parts) != len(cols):
        raise _io.RowError(
            f"expected {len(cols)} comma-separated fields (titles with commas "
            f"must be double-quoted), got {len(parts)}", "field_count")
      item = _io.parse_id(parts[index["movieId"]], "movieId")
    except _io.RowError as e:
      report.bad(str(path), lineno, str(e), e.kind)
      continue
    raw = parts[index["genres"]].strip()
    genres = () if raw == NO_GENRES else tuple(
        g.strip() for g in raw.split("|") if g.strip())
    _add_item(items, item, parts[index["title"]].strip(), genres, dup)
  _note_dups(report, path, dup)
  return items


def read_ml_csv(path: _io.PathLike, *,
                report: ReadReport) -> Iterator[Interaction]:
  """Reads an unpacked ml-20m / ml-25m / ml-32m directory."""
  data, item_path = ml_csv_files(path)
  items = _read_movies_csv(item_path, report)
  names = ("userId", "movieId", "rating", "timestamp")

  lines = _io.iter_lines(data, report=report)
  index, cols = _csv_header(data, lines, names)
  yield from _read_ratings(data, lines, _csv_fields, ",".join(cols),
                           tuple(index[n] for n in names), items, item_path,
                           report)
