"""Amazon Reviews readers: the 2014, 2018 and 2023 releases (McAuley lab).

Each release is a reviews file plus a metadata file, JSON lines, plain or
gzipped.  How to pass them (``--source=``):

* explicit files, reviews first: ``--source=reviews.json.gz,meta.json.gz``
  (or a ``(reviews, meta)`` tuple from Python);
* a directory with the standard names; the category is taken from the
  reviews file name, and ``category=`` picks one when several are present:

  ======  ======================================  ============================
  2014    ``reviews_Movies_and_TV[_5].json.gz``   ``meta_Movies_and_TV.json.gz``
  2018    ``Movies_and_TV[_5].json.gz``           ``meta_Movies_and_TV.json.gz``
  2023    ``Movies_and_TV.jsonl[.gz]``            ``meta_Movies_and_TV.jsonl[.gz]``
  ======  ======================================  ============================

* a single reviews file: the metadata file is looked up next to it under the
  standard name (MissingFileError names the path it expected).

Field mapping (``Interaction`` <- source):

* 2014/2018 reviews: user <- ``reviewerID``, item <- ``asin``, rating <-
  ``overall``, timestamp <- ``unixReviewTime`` (seconds), review <-
  ``reviewText`` (optional).  Metadata: ``asin``, ``title`` (optional),
  2014 ``categories`` (list of lists, flattened in order, de-duplicated),
  2018 ``category`` (list).  The original 2014 metadata lines are Python dict
  literals: strict JSON is tried first, then :func:`ast.literal_eval`.
* 2023 reviews: user <- ``user_id``, item <- ``parent_asin`` (the key of the
  metadata; falls back to ``asin`` only when ``parent_asin`` is absent),
  rating <- ``rating``, timestamp <- ``timestamp`` (milliseconds, floored to
  seconds), review <- ``text``.  Metadata: ``parent_asin``, ``title``,
  genres = ``main_category`` followed by ``categories`` (de-duplicated).

Required review fields are user, item, rating and timestamp; a row without
one of them is a bad row.  Reviews whose item has no metadata row are kept
with ``title=None``, ``genres=()`` and counted in a report note.
"""

from __future__ import annotations

import pathlib
from typing import Iterator, Optional, Sequence, Union

from userllm_jax.data.schema import (DataError, Interaction, MissingFileError,
                                     ReadReport)
from userllm_jax.data.sources import _io

VERSIONS = ("2014", "2018", "2023")
EXTENSIONS = (".jsonl.gz", ".json.gz", ".jsonl", ".json")

Source = Union[_io.PathLike, Sequence[_io.PathLike]]


def _strip_ext(name: str) -> Optional[str]:
  for ext in EXTENSIONS:
    if name.endswith(ext):
      return name[:-len(ext)]
  return None


def _category(reviews_name: str, version: str) -> str:
  stem = _strip_ext(reviews_name) or reviews_name
  if version == "2014" and stem.startswith("reviews_"):
    stem = stem[len("reviews_"):]
  if stem.endswith("_5"):
    stem = stem[:-2]
  return stem


def _default_ext(version: str) -> str:
  return ".jsonl.gz" if version == "2023" else ".json.gz"


def _find_meta(directory: pathlib.Path, category: str,
               version: str) -> pathlib.Path:
  for ext in EXTENSIONS:
    p = directory / f"meta_{category}{ext}"
    if p.is_file():
      return p
  raise MissingFileError(
      str(directory / f"meta_{category}{_default_ext(version)}"),
      f"Amazon {version} metadata for category {category!r} (also tried "
      f"{', '.join(EXTENSIONS)}); or pass --source=REVIEWS,META")


def resolve(source: Source, version: str,
            category: Optional[str] = None
            ) -> tuple[pathlib.Path, pathlib.Path]:
  """(reviews, meta) paths for a directory, a reviews file, or 'a,b'."""
  if version not in VERSIONS:
    raise ValueError(f"Amazon version must be one of {VERSIONS}, got "
                     f"{version!r}")
  parts = _io.split_source(source)
  if len(parts) == 2:
    reviews, meta = (pathlib.Path(p) for p in parts)
    if reviews.name.startswith("meta") and not meta.name.startswith("meta"):
      raise DataError(f"--source={parts[0]},{parts[1]}: the order is "
                      "REVIEWS,META; the first file looks like metadata")
    return (_io.require_file(reviews, f"Amazon {version} reviews"),
            _io.require_file(meta, f"Amazon {version} metadata"))
  if len(parts) != 1:
    raise DataError(f"Amazon source must be a directory, a reviews file or "
                    f"REVIEWS,META; got {len(parts)} paths: {parts}")
  p = pathlib.Path(parts[0])
  if p.is_file():
    return p, _find_meta(p.parent, _category(p.name, version), version)
  if not p.is_dir():
    raise MissingFileError(str(p), f"Amazon {version} reviews directory or "
                           "file")
  candidates = []
  for f in sorted(p.iterdir()):
    if not f.is_file() or f.name.startswith("meta_") or not _strip_ext(
        f.name):
      continue
    if version == "2014" and not f.name.startswith("reviews_"):
      continue
    if category is None or _category(f.name, version) == category:
      candidates.append(f)
  if not candidates:
    want = category or "<Category>"
    example = (f"reviews_{want}.json.gz" if version == "2014" else
               f"{want}{_default_ext(version)}")
    raise MissingFileError(str(p / example),
                           f"Amazon {version} reviews file in {p}")
  if len(candidates) > 1:
    raise DataError(
        f"{p}: several Amazon {version} reviews files "
        f"{[c.name for c in candidates]}; pass category=<name> or "
        "--source=REVIEWS,META")
  reviews = candidates[0]
  return reviews, _find_meta(p, _category(reviews.name, version), version)


def amazon_files(source: Source, version: str,
                 category: Optional[str] = None) -> list[pathlib.Path]:
  return list(resolve(source, version, category))


# ------------------------------------------------------------------ meta


def _meta_row(obj: dict, version: str) -> tuple[str, Optional[str],
                                                 tuple[str, ...]]:
  if version == "2023":
    item = _io.parse_id(_io.require_key(obj, "parent_asin"), "parent_asin")
    title = _io.optional_text(obj.get("title"), "title")
    main = _io.optional_text(obj.get("main_category"), "main_category")
    genres = _io.unique(((main.strip(),) if main and main.strip() else ())
                        + _io.string_list(obj.get("categories"),
                                          "categories"))
  else:
    item = _io.parse_id(_io.require_key(obj, "asin"), "asin")
    title = _io.optional_text(obj.get("title"), "title")
    if version == "2014":
      cats = obj.get("categories")
      if cats is None:
        genres = ()
      elif not isinstance(cats, list):
        raise _io.RowError("categories: expected a list of lists, got "
                           f"{type(cats).__name__}", "bad_field")
      else:
        flat: list[str] = []
        for sub in cats:
          flat.extend(_io.string_list(sub, "categories[]"))
        genres = _io.unique(flat)
    else:
      genres = _io.unique(_io.string_list(obj.get("category"), "category"))
  if title is not None:
    title = title.strip() or None
  return item, title, genres


def read_meta(path: pathlib.Path, version: str,
              report: ReadReport) -> dict[str, tuple]:
  items: dict[str, tuple] = {}
  interned: dict[tuple, tuple] = {}
  dups = 0
  for lineno, obj in _io.iter_json_objects(
      path, report=report, python_literals=(version == "2014")):
    try:
      item, title, genres = _meta_row(obj, version)
    except _io.RowError as e:
      report.bad(str(path), lineno, str(e), e.kind)
      continue
    if item in items:
      dups += 1
      continue
    items[item] = (title, interned.setdefault(genres, genres))
  if dups:
    report.note(f"{path}: {dups} duplicate metadata row(s); the first one "
                "of each item was kept")
  return items


# ------------------------------------------------------------------ reviews


def _review_row(obj: dict, version: str):
  if version == "2023":
    user = _io.parse_id(_io.require_key(obj, "user_id"), "user_id")
    if "parent_asin" in obj:
      item = _io.parse_id(obj["parent_asin"], "parent_asin")
    else:
      item = _io.parse_id(_io.require_key(obj, "asin"), "asin")
    rating = _io.parse_rating(_io.require_key(obj, "rating"), "rating")
    ts = _io.parse_seconds(_io.require_key(obj, "timestamp"), "timestamp",
                           milliseconds=True)
    review = _io.optional_text(obj.get("text"), "text")
  else:
    user = _io.parse_id(_io.require_key(obj, "reviewerID"), "reviewerID")
    item = _io.parse_id(_io.require_key(obj, "asin"), "asin")
    rating = _io.parse_rating(_io.require_key(obj, "overall"), "overall")
    ts = _io.parse_seconds(_io.require_key(obj, "unixReviewTime"),
                           "unixReviewTime")
    review = _io.optional_text(obj.get("reviewText"), "reviewText")
  return user, item, rating, ts, review


def read_amazon(source: Source, *, version: str, report: ReadReport,
                category: Optional[str] = None) -> Iterator[Interaction]:
  """Reads one Amazon Reviews category; see the module docstring."""
  reviews, meta_path = resolve(source, version, category)
  items = read_meta(meta_path, version, report)
  missing = _io.MissingItems(meta_path)
  for lineno, obj in _io.iter_json_objects(
      reviews, report=report, python_literals=(version == "2014")):
    try:
      user, item, rating, ts, review = _review_row(obj, version)
    except _io.RowError as e:
      report.bad(str(reviews), lineno, str(e), e.kind)
      continue
    title, genres = missing.features(items.get(item), item)
    report.ok()
    yield Interaction(user=user, item=item, timestamp=ts, rating=rating,
                      title=title, genres=genres, review=review)
  missing.finish(report)

