"""TensorFlow Datasets MovieLens through ``tfds.data_source`` (no TensorFlow).

``read_dataset('tfds:movielens/100k-ratings', source=DATA_DIR)`` reads the
prepared ArrayRecord files of a TFDS ``movielens/*-ratings`` config from
``DATA_DIR`` (TFDS' default data dir when None).  Without TensorFlow TFDS
does not register its builders on import, so the builder module is imported
first (``tensorflow_datasets.structured.movielens``).  ``download`` is False
by default: nothing is fetched at run time unless asked for.

Field mapping: user <- ``user_id``, item <- ``movie_id``, rating <-
``user_rating``, timestamp <- ``timestamp`` (seconds), title <-
``movie_title``, genres <- ``movie_genres`` (ClassLabel ids decoded to their
names, e.g. ``Action``; ``(no genres listed)`` -> none).  ``fields=`` overrides the mapping for other
builders with the same kind of content.
"""

from __future__ import annotations

import importlib
import math
import pathlib
from typing import Any, Iterator, Mapping, Optional

from userllm_jax.data.schema import DataError, DataFormatError, Interaction, \
    ReadReport
from userllm_jax.data.sources import _io

BUILDER_MODULES = {
    "movielens": "tensorflow_datasets.structured.movielens",
}
DEFAULT_FIELDS = {
    "user": "user_id",
    "item": "movie_id",
    "rating": "user_rating",
    "timestamp": "timestamp",
    "title": "movie_title",
    "genres": "movie_genres",
}
REQUIRED = ("user", "item", "timestamp")
NO_GENRES = "(no genres listed)"  # A TFDS class; means no genres (as in CSV).


def _import_tfds(name: str):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        f"tfds:{name} needs tensorflow-datasets (pip install "
        "'userllm_jax[tfds]'); TensorFlow itself is not required") from e
  builder = name.split("/", 1)[0].split(":", 1)[0]
  if builder in BUILDER_MODULES:
    importlib.import_module(BUILDER_MODULES[builder])
  return tfds


def _text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if hasattr(value, "item") and not isinstance(value, str):
    value = value.item()
    if isinstance(value, bytes):
      return value.decode("utf-8")
  return str(value)


def _label_names(features, key: str) -> Optional[list[str]]:
  try:
    feature = features[key]
  except (KeyError, TypeError):
    return None
  inner = getattr(feature, "feature", feature)
  return list(getattr(inner, "names", None) or []) or None


def tfds_files(name: str, data_dir: Optional[str] = None) -> list[pathlib.Path]:
  """Files of the prepared TFDS dataset (for provenance hashes)."""
  tfds = _import_tfds(name)
  builder = tfds.builder(name, data_dir=data_dir)
  root = pathlib.Path(str(builder.data_dir))
  if not root.is_dir():
    return []
  return sorted(p for p in root.iterdir() if p.is_file())


def read_tfds(name: str, *, report: ReadReport,
              data_dir: Optional[str] = None, split: str = "train",
              download: bool = False,
              fields: Optional[Mapping[str, str]] = None
              ) -> Iterator[Interaction]:
  """Reads ``name`` (e.g. ``movielens/100k-ratings``) via tfds.data_source.

  Opening the data source happens in this call (errors are raised here);
  the rows are read lazily by the returned iterator.
  """
  tfds = _import_tfds(name)
  mapping = dict(DEFAULT_FIELDS, **(fields or {}))
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir,
                          download=download,
                          builder_kwargs={"file_format": "array_record"})
  except Exception as e:  # TFDS raises many types for "not prepared".
    raise DataError(
        f"tfds:{name}: cannot open split {split!r} in data_dir={data_dir!r}: "
        f"{type(e).__name__}: {e}\nRandom access needs the ArrayRecord "
        f"format: prepare it with `tfds build {name} "
        "--file_format=array_record` (or pass download=True)") from e
  where = f"tfds:{name}[{split}]"
  info = getattr(ds, "dataset_info", None)
  features = getattr(info, "features", None)
  genre_names = _label_names(features, mapping["genres"])
  if features is not None:
    keys = set(features.keys())
    absent = [mapping[k] for k in REQUIRED if mapping[k] not in keys]
    if absent:
      raise DataFormatError(where, None, f"features {absent} not found; the "
                            f"dataset has {sorted(keys)}; pass fields=")
  return _iter_rows(ds, where, mapping, genre_names, report)


def _iter_rows(ds, where: str, mapping: dict[str, str],
               genre_names: Optional[list[str]],
               report: ReadReport) -> Iterator[Interaction]:
  for index in range(len(ds)):
    ex = ds[index]
    try:
      missing = [mapping[k] for k in REQUIRED if mapping[k] not in ex]
      if missing:
        raise _io.RowError(f"missing feature(s) {missing}", "missing_field")
      user = _io.parse_id(_text(ex[mapping["user"]]), mapping["user"])
      item = _io.parse_id(_text(ex[mapping["item"]]), mapping["item"])
      ts = _io.parse_seconds(int(ex[mapping["timestamp"]]),
                             mapping["timestamp"])
      rating = None
      if mapping["rating"] in ex:
        rating = float(ex[mapping["rating"]])
        if not math.isfinite(rating):
          raise _io.RowError(f"{mapping['rating']}: not finite ({rating})",
                             "bad_number")
      title = (_text(ex[mapping["title"]]) if mapping["title"] in ex
               else None)
      genres: tuple[str, ...] = ()
      if mapping["genres"] in ex:
        raw = [g for g in list(ex[mapping["genres"]])]
        if genre_names is not None:
          bad = [int(g) for g in raw if not 0 <= int(g) < len(genre_names)]
          if bad:
            raise _io.RowError(f"{mapping['genres']}: label {bad[0]} out of "
                               f"range 0..{len(genre_names) - 1}",
                               "bad_field")
          genres = _io.unique(genre_names[int(g)] for g in raw)
        else:
          genres = _io.unique(_text(g) for g in raw)
        genres = tuple(g for g in genres if g != NO_GENRES)
    except _io.RowError as e:
      report.bad(where, index, str(e), e.kind)
      continue
    except (ValueError, TypeError) as e:  # Undecodable bytes, odd dtypes.
      report.bad(where, index, f"{type(e).__name__}: {e}", "bad_field")
      continue
    report.ok()
    yield Interaction(user=user, item=item, timestamp=ts, rating=rating,
                      title=title, genres=genres)
