"""Dataset readers and their registry.

``read_dataset(name, source, report=...)`` yields
:class:`~userllm_jax.data.schema.Interaction` rows with item features
(title, genres) joined in; ``source_files(name, source)`` lists the files it
reads (for provenance hashes).  Names:

=====================  =======================================================
``movielens-100k``     ``source=None``: the embedded copy (RecBole wheel from
                       PyPI, cached; see ``embedded.py``).  Else a GroupLens
                       ``ml-100k/`` dir (u.data, u.item, u.genre) or RecBole
                       atomic files (a dir with ``*.inter`` or the path).
``movielens-1m``       ``ml-1m/`` (ratings.dat, movies.dat) or RecBole files.
``movielens-20m``,     ``ml-20m/`` ... (ratings.csv, movies.csv) or RecBole
``-25m``, ``-32m``     files.
``recbole``            RecBole atomic files: a dir or the ``.inter`` path
                       (kwargs: ``dataset``, ``user_field`` ...).
``amazon-2014``,       a dir with the standard names, a reviews file, or
``-2018``, ``-2023``   ``REVIEWS,META`` (kwarg ``category``); see amazon.py.
``google-local``       a dir with ``review-<State>.json.gz`` +
                       ``meta-<State>.json.gz``, or ``REVIEWS,META`` (kwarg
                       ``state``).
``tfds:<name/config>`` e.g. ``tfds:movielens/100k-ratings``; ``source`` is the
                       TFDS data_dir (kwargs ``split``, ``download``).
``synthetic``          generated with planted preferences; ``source`` is
                       ignored, kwargs go to ``generate_synthetic``.
=====================  =======================================================

Bad rows are counted in ``report`` (strict mode raises DataFormatError
naming file:line); missing files raise MissingFileError naming the expected
path.  Interactions whose item is absent from the item/metadata file are
kept with ``title=None``, ``genres=()`` and counted in a report note: a
reader never changes a user's history silently.
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterator, Optional

from userllm_jax.data.schema import DataError, Interaction, ReadReport
from userllm_jax.data.sources import amazon as _amazon
from userllm_jax.data.sources import embedded as _embedded
from userllm_jax.data.sources import google_local as _google
from userllm_jax.data.sources import movielens as _ml
from userllm_jax.data.sources import recbole as _recbole
from userllm_jax.data.sources import synthetic as _synthetic
from userllm_jax.data.sources.amazon import read_amazon
from userllm_jax.data.sources.google_local import read_google_local
from userllm_jax.data.sources.movielens import (read_ml100k, read_ml1m,
                                                read_ml_csv)
from userllm_jax.data.sources.recbole import read_recbole
from userllm_jax.data.sources.synthetic import (SyntheticData,
                                                generate_synthetic)
from userllm_jax.data.sources.tfds_source import read_tfds

DATASETS = ("movielens-100k", "movielens-1m", "movielens-20m",
            "movielens-25m", "movielens-32m", "recbole", "amazon-2014",
            "amazon-2018", "amazon-2023", "google-local", "synthetic")
TFDS_PREFIX = "tfds:"

_ML_LAYOUT = {
    "movielens-100k": ("u.data, u.item, u.genre", _ml.ml100k_files,
                       read_ml100k),
    "movielens-1m": ("ratings.dat, movies.dat", _ml.ml1m_files, read_ml1m),
    "movielens-20m": ("ratings.csv, movies.csv", _ml.ml_csv_files,
                      read_ml_csv),
    "movielens-25m": ("ratings.csv, movies.csv", _ml.ml_csv_files,
                      read_ml_csv),
    "movielens-32m": ("ratings.csv, movies.csv", _ml.ml_csv_files,
                      read_ml_csv),
}


def _check_name(name: str) -> None:
  if name in DATASETS or (name.startswith(TFDS_PREFIX)
                          and len(name) > len(TFDS_PREFIX)):
    return
  raise ValueError(f"unknown dataset {name!r}; expected one of "
                   f"{list(DATASETS)} or 'tfds:<name/config>'")


def _is_recbole(source: str) -> bool:
  p = pathlib.Path(source)
  if p.is_dir():
    return any(p.glob("*.inter")) or any(p.glob("*.inter.gz"))
  return p.name.endswith((".inter", ".inter.gz"))


def _need_source(name: str, source: Optional[str], what: str) -> str:
  if source is None or str(source) == "":
    raise DataError(f"dataset {name!r} needs --source=<path> ({what}); the "
                    "project downloads only the embedded movielens-100k")
  return str(source)


def _ml_source(name: str, source) -> tuple[str, bool]:
  """(source dir, is_recbole) for a MovieLens name."""
  if name == "movielens-100k" and source is None:
    return str(_embedded.ml100k_dir()), True
  layout = _ML_LAYOUT[name][0]
  src = _need_source(name, source, f"the unpacked GroupLens directory with "
                     f"{layout}, or RecBole atomic files")
  return src, _is_recbole(src)


def source_files(name: str, source: Optional[str] = None,
                 **kwargs: Any) -> list[pathlib.Path]:
  """The files ``read_dataset(name, source, **kwargs)`` reads."""
  _check_name(name)
  if name == "synthetic":
    return []
  if name.startswith(TFDS_PREFIX):
    from userllm_jax.data.sources import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.tfds_files(name[len(TFDS_PREFIX):], source)
  if name in _ML_LAYOUT:
    src, is_recbole = _ml_source(name, source)
    if is_recbole:
      return _recbole.recbole_files(src, kwargs.get("dataset"))
    return list(_ML_LAYOUT[name][1](src))
  if name == "recbole":
    src = _need_source(name, source, "a directory of RecBole atomic files "
                       "or the .inter file")
    return _recbole.recbole_files(src, kwargs.get("dataset"))
  if name.startswith("amazon-"):
    src = _need_source(name, source, "a directory, a reviews file or "
                       "REVIEWS,META")
    return _amazon.amazon_files(src, name.split("-", 1)[1],
                                kwargs.get("category"))
  src = _need_source(name, source, "a directory or REVIEWS,META")
  return _google.google_local_files(src, kwargs.get("state"))


def read_dataset(name: str, source: Optional[str] = None, *,
                 report: ReadReport, **kwargs: Any) -> Iterator[Interaction]:
  """Yields the Interaction rows of dataset ``name``; see module docstring.

  File resolution happens eagerly (a MissingFileError is raised by this
  call, not by the first ``next()``); the rows are read lazily.
  """
  _check_name(name)
  if name == "synthetic":
    return _synthetic.read_synthetic(report=report, **kwargs)
  if name.startswith(TFDS_PREFIX):
    return read_tfds(name[len(TFDS_PREFIX):], report=report,
                     data_dir=source, **kwargs)
  source_files(name, source, **kwargs)  # Eager: fail before reading.
  if name in _ML_LAYOUT:
    src, is_recbole = _ml_source(name, source)
    if is_recbole:
      if name == "movielens-100k" and source is None:
        kwargs.setdefault("dataset", "ml-100k")
      return read_recbole(src, report=report, **kwargs)
    return _ML_LAYOUT[name][2](src, report=report, **kwargs)
  if name == "recbole":
    return read_recbole(source, report=report, **kwargs)
  if name.startswith("amazon-"):
    return read_amazon(source, version=name.split("-", 1)[1], report=report,
                       **kwargs)
  return read_google_local(source, report=report, **kwargs)


__all__ = [
    "DATASETS", "SyntheticData", "generate_synthetic", "read_amazon",
    "read_dataset", "read_google_local", "read_ml100k", "read_ml1m",
    "read_ml_csv", "read_recbole", "read_tfds", "source_files",
]
