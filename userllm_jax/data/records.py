"""Prepared datasets on disk: ArrayRecord shards of per-user records + metadata.

Layout of a prepared dataset directory ``DIR``::

  DIR/sequences-00000-of-0000N.array_record   one msgpack record per user
  DIR/metadata.json                           see below
  DIR/users.json                              user id strings, by user index
  DIR/user_lengths.npy                        int64 [num_users] interactions
  DIR/item_titles.json                        title strings, by item vocab id
  DIR/item_genres.npy                         int32 [item vocab size, G]

A user record is a msgpack map ``{"user": str, "index": int, "item": A,
"rating": A, "timestamp": A, "timegap": A, "review": [str|None] | None}``
where each array ``A`` is ``{"dtype": "<i4", "shape": [T], "data": bytes}``
(``item``/``rating``/``timegap`` int32 vocab ids, ``timestamp`` int64 s).
Genres are not repeated per interaction: :class:`PreparedDataset` gathers
them from ``item_genres`` (``record["genre"]`` is ``[T, G]``).

``metadata.json`` holds the format version, ``num_users``, ``num_items``
(real items, without pad/oov), ``num_interactions``, the vocabularies and
their sizes, split sizes (leave-one-out and User-LLM windows), the sha256 of
every source file, the settings used, the read report, and the size and
sha256 of every file written here (checked by :func:`open_dataset`).

``DIR`` is any :mod:`userllm_jax.paths` location. Everything is written to a
local temporary directory (next to ``DIR`` when local) and moved into place at the
end with ``paths.replace_dir`` (renames locally; on an object store an upload with
``metadata.json`` last, so a dataset without it is never opened), so a failure
never leaves a half-written dataset. A dataset on an object store is read through
a host-local mirror under ``paths.cache_dir()/remote/`` (ArrayRecord reads local
files), refreshed when the remote ``metadata.json`` changes. The
output is a pure function of the input and the settings (no timestamps), so
two runs give byte-identical directories.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Callable, Iterable, Optional, Sequence

import msgpack
import numpy as np

from userllm_jax import paths
from userllm_jax.data import sequences as seqlib
from userllm_jax.data.schema import (DataError, DataFormatError, Interaction,
                                     ReadReport)

FORMAT_VERSION = 1
METADATA = "metadata.json"
USERS = "users.json"
LENGTHS = "user_lengths.npy"
TITLES = "item_titles.json"
GENRES = "item_genres.npy"
SHARD_PATTERN = "sequences-{:05d}-of-{:05d}.array_record"
# Aim for shards of about this many interactions (~ tens of MB each).
INTERACTIONS_PER_SHARD = 4_000_000
ARRAY_FIELDS = ("item", "rating", "timestamp", "timegap")
DEFAULT_SETTINGS = {
    "min_user_count": 1,
    "min_item_count": 1,
    "k_core": False,
    "max_genres": None,
    "userllm_window": 50,
    "userllm_stride": None,
    # ArrayRecordWriter options. Uncompressed reads a 10,000-item record ~6x
    # faster than ArrayRecord's default zstd (0.25 vs 1.5 ms here) at ~3x the
    # size (~20 bytes per interaction); "group_size:1" alone compresses.
    "record_options": "group_size:1,uncompressed",
}


class CorruptDatasetError(DataError):
  """A prepared dataset directory is incomplete or damaged."""

  def __init__(self, path: os.PathLike | str, reason: str):
    self.path = str(path)
    super().__init__(f"{self.path}: {reason} (re-run `python -m "
                     "userllm_jax.prepare` to rebuild it)")


sha256_file = paths.sha256_file   # the one sha256 helper (kept under this name for callers)


def local_mirror(directory: os.PathLike | str) -> pathlib.Path:
  """A local directory with the files of the dataset at ``directory``: ``directory`` itself
  when local, else a mirror in the cache (downloaded when missing or stale)."""
  if not paths.is_remote(directory):
    return paths.local_path(directory)
  remote = paths.path(directory)
  meta_file = remote / METADATA
  if not meta_file.exists():
    raise CorruptDatasetError(meta_file, "missing (incomplete or no dataset)")
  meta_bytes = meta_file.read_bytes()
  mirror = paths.cache_dir() / "remote" / paths.sha256_bytes(os.fspath(remote))[:16]
  if (mirror / METADATA).is_file() and (mirror / METADATA).read_bytes() == meta_bytes:
    return mirror
  meta = json.loads(meta_bytes)
  tmp = paths.make_temp_dir(mirror)
  try:
    for fname in sorted(meta.get("files", {})):
      (tmp / fname).write_bytes((remote / fname).read_bytes())
    (tmp / METADATA).write_bytes(meta_bytes)
    paths.replace_dir(tmp, mirror,
                      accept_existing=lambda d: (paths.local_path(d) / METADATA).read_bytes()
                      == meta_bytes)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return mirror


def encode_array(x: np.ndarray) -> dict:
  x = np.ascontiguousarray(x)
  dt = x.dtype.newbyteorder("<") if x.dtype.byteorder == ">" else x.dtype
  x = x.astype(dt, copy=False)
  return {"dtype": dt.str, "shape": list(x.shape), "data": x.tobytes()}


def decode_array(d: dict) -> np.ndarray:
  arr = np.frombuffer(d["data"], dtype=np.dtype(d["dtype"]))
  return arr.reshape(d["shape"])


def encode_user(seq: seqlib.SequenceData, u: int) -> bytes:
  a, b = int(seq.offsets[u]), int(seq.offsets[u + 1])
  rec = {"user": seq.users[u], "index": u,
         "item": encode_array(seq.item_N[a:b].astype(np.int32)),
         "rating": encode_array(seq.rating_N[a:b].astype(np.int32)),
         "timestamp": encode_array(seq.timestamp_N[a:b].astype(np.int64)),
         "timegap": encode_array(seq.timegap_N[a:b].astype(np.int32)),
         "review": None if seq.review_N is None else list(seq.review_N[a:b])}
  return msgpack.packb(rec, use_bin_type=True)


def decode_user(data: bytes) -> dict:
  rec = msgpack.unpackb(data, raw=False)
  for k in ARRAY_FIELDS:
    rec[k] = decode_array(rec[k])
  return rec


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
  path.write_text(text, encoding="utf-8")


def _json_dump(obj: Any) -> str:
  return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def split_sizes(lengths: np.ndarray, window: int,
                stride: Optional[int]) -> dict:
  out = {}
  for key, fn in (("leave_one_out", lambda: seqlib.leave_one_out(lengths)),
                  ("userllm", lambda: seqlib.userllm_windows(
                      lengths, window, stride=stride))):
    try:
      out[key] = fn().sizes()
    except DataError as e:
      out[key] = {"error": str(e)}
  return out


def write_dataset(seq: seqlib.SequenceData, out: os.PathLike | str, *,
                  name: str, source: Optional[str], settings: dict,
                  source_files: dict[str, str],
                  report: Optional[ReadReport] = None,
                  interactions_per_shard: int = INTERACTIONS_PER_SHARD,
                  ) -> "PreparedDataset":
  """Writes ``seq`` as a prepared dataset at ``out`` (atomically)."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  tmp = paths.make_temp_dir(out)
  try:
    lengths = seq.lengths()
    n_users = seq.num_users
    n_shards = int(max(1, min(n_users, -(-seq.num_interactions //
                                         max(1, interactions_per_shard)))))
    bounds = np.linspace(0, n_users, n_shards + 1).round().astype(np.int64)
    shards = []
    for s in range(n_shards):
      fname = SHARD_PATTERN.format(s, n_shards)
      w = ArrayRecordWriter(str(tmp / fname),
                            settings.get("record_options",
                                         DEFAULT_SETTINGS["record_options"]))
      for u in range(int(bounds[s]), int(bounds[s + 1])):
        w.write(encode_user(seq, u))
      w.close()
      shards.append({"file": fname,
                     "num_records": int(bounds[s + 1] - bounds[s])})
    np.save(tmp / LENGTHS, lengths.astype(np.int64), allow_pickle=False)
    np.save(tmp / GENRES, seq.item_genres.astype(np.int32), allow_pickle=False)
    _atomic_write_text(tmp / USERS, _json_dump(seq.users))
    _atomic_write_text(tmp / TITLES, _json_dump(seq.item_titles))
    files = {}
    for f in [s["file"] for s in shards] + [LENGTHS, GENRES, USERS, TITLES]:
      files[f] = {"bytes": (tmp / f).stat().st_size,
                  "sha256": sha256_file(tmp / f)}
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": name,
        "source": source,
        "num_users": n_users,
        "num_items": seq.num_items,
        "num_interactions": seq.num_interactions,
        "max_genres": seq.max_genres,
        "vocab_sizes": {k: v.size for k, v in seq.vocabs.items()},
        "vocabs": {k: v.tokens for k, v in seq.vocabs.items()},
        "splits": split_sizes(lengths, settings.get("userllm_window", 50),
                              settings.get("userllm_stride")),
        "length_stats": {"min": int(lengths.min()), "max": int(lengths.max()),
                         "mean": float(round(lengths.mean(), 4)),
                         "median": float(np.median(lengths))},
        "source_files": dict(sorted(source_files.items())),
        "settings": settings,
        "read_report": (report or ReadReport()).to_json(),
        "build_stats": seq.stats,
        "shards": shards,
        "files": files,
    }
    _atomic_write_text(tmp / METADATA, _json_dump(meta))
    if not paths.is_remote(out) and paths.local_path(out).exists() and not paths.local_path(
        out).is_dir():
      raise DataError(f"{out}: exists and is not a directory")
    paths.replace_dir(tmp, out, marker=METADATA)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return open_dataset(out)


class PreparedDataset:
  """A prepared dataset: random access to per-user records (a Grain source).

  ``ds[i]`` is user ``i``'s record: ``item [T]``, ``genre [T, G]``,
  ``rating [T]``, ``timegap [T]`` (int32 ids), ``timestamp [T]`` (int64),
  ``user`` (id string), ``index`` (= i) and ``review``.
  """

  def __init__(self, directory: os.PathLike | str, *, verify: bool = False):
    # A local pathlib.Path, or the object-store URI (read through local_mirror).
    self.directory = (paths.path(directory) if paths.is_remote(directory)
                      else pathlib.Path(directory))
    self._verify = verify
    self.reused = False  # True when prepare_dataset found it up to date.
    self._load()

  def _load(self) -> None:
    from grain import sources as grain_sources  # pylint: disable=g-import-not-at-top
    d = local_mirror(self.directory)
    if not d.is_dir():
      raise CorruptDatasetError(d, "prepared dataset directory not found")
    mpath = d / METADATA
    if not mpath.is_file():
      raise CorruptDatasetError(mpath, "missing (incomplete dataset)")
    try:
      meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
      raise CorruptDatasetError(mpath, f"not valid JSON: {e}") from None
    for key in ("format_version", "num_users", "num_items", "num_interactions",
                "vocabs", "shards", "files", "settings", "source_files"):
      if key not in meta:
        raise CorruptDatasetError(mpath, f"field {key!r} missing")
    if meta["format_version"] != FORMAT_VERSION:
      raise CorruptDatasetError(
          mpath, f"format_version: expected {FORMAT_VERSION}, got "
          f"{meta['format_version']}")
    for fname, info in meta["files"].items():
      p = d / fname
      if not p.is_file():
        raise CorruptDatasetError(p, "missing")
      size = p.stat().st_size
      if size != info["bytes"]:
        raise CorruptDatasetError(p, f"size: expected {info['bytes']} bytes, "
                                  f"got {size}")
      if self._verify:
        got = sha256_file(p)
        if got != info["sha256"]:
          raise CorruptDatasetError(p, f"sha256: expected {info['sha256']}, "
                                    f"got {got}")
    self.metadata = meta
    self.vocabs = {k: seqlib.Vocab(v) for k, v in meta["vocabs"].items()}
    try:
      self.lengths = np.load(d / LENGTHS, allow_pickle=False)
      self.item_genres = np.load(d / GENRES, allow_pickle=False)
    except ValueError as e:
      raise CorruptDatasetError(d, f"cannot load .npy: {e}") from None
    self.users = json.loads((d / USERS).read_text(encoding="utf-8"))
    self.item_titles = json.loads((d / TITLES).read_text(encoding="utf-8"))
    n = meta["num_users"]
    if self.lengths.shape != (n,) or len(self.users) != n:
      raise CorruptDatasetError(
          d / LENGTHS, f"expected {n} users, got lengths {self.lengths.shape} "
          f"and {len(self.users)} user ids")
    if int(self.lengths.sum()) != meta["num_interactions"]:
      raise CorruptDatasetError(
          d / LENGTHS, f"lengths sum to {int(self.lengths.sum())}, metadata "
          f"says num_interactions={meta['num_interactions']}")
    n_item_ids = self.vocabs["item"].size
    if self.item_genres.ndim != 2 or self.item_genres.shape[0] != n_item_ids:
      raise CorruptDatasetError(
          d / GENRES, f"expected shape [{n_item_ids}, G], got "
          f"{list(self.item_genres.shape)}")
    if len(self.item_titles) != n_item_ids:
      raise CorruptDatasetError(d / TITLES, f"expected {n_item_ids} titles, "
                                f"got {len(self.item_titles)}")
    self._shard_paths = [str(d / s["file"]) for s in meta["shards"]]
    self._shard_bounds = np.cumsum([0] + [s["num_records"]
                                          for s in meta["shards"]])
    if self._shard_bounds[-1] != n:
      raise CorruptDatasetError(mpath, f"shards hold {self._shard_bounds[-1]} "
                                f"records, expected num_users={n}")
    try:
      self._source = grain_sources.ArrayRecordDataSource(self._shard_paths)
    except Exception as e:  # array_record raises bare RuntimeError/ValueError.
      raise CorruptDatasetError(d, f"cannot open ArrayRecord shards: "
                                f"{type(e).__name__}: {e}") from None
    if len(self._source) != n:
      raise CorruptDatasetError(d, f"ArrayRecord shards hold "
                                f"{len(self._source)} records, expected {n}")

  # Pickling (Grain worker processes): reopen from the directory.
  def __getstate__(self):
    return {"directory": str(self.directory)}

  def __setstate__(self, state):
    d = state["directory"]
    self.directory = paths.path(d) if paths.is_remote(d) else pathlib.Path(d)
    self._verify = False
    self.reused = False
    self._load()

  @property
  def num_users(self) -> int:
    return int(self.metadata["num_users"])

  @property
  def num_items(self) -> int:
    """Real items (excluding pad/oov); item ids run 2..num_items+1."""
    return int(self.metadata["num_items"])

  @property
  def num_interactions(self) -> int:
    return int(self.metadata["num_interactions"])

  @property
  def max_genres(self) -> int:
    return int(self.item_genres.shape[1])

  def __len__(self) -> int:
    return self.num_users

  def _shard_of(self, index: int) -> str:
    s = int(np.searchsorted(self._shard_bounds, index, side="right")) - 1
    return self._shard_paths[max(0, min(s, len(self._shard_paths) - 1))]

  def record(self, index: int) -> dict:
    """User ``index``'s stored record without the gathered genres."""
    index = int(index)
    if not 0 <= index < self.num_users:
      raise IndexError(f"user index {index} out of range [0, "
                       f"{self.num_users})")
    try:
      rec = decode_user(self._source[index])
    except Exception as e:  # msgpack/array_record errors vary by version.
      raise DataFormatError(self._shard_of(index), index,
                            f"corrupt user record: {type(e).__name__}: {e}"
                            ) from None
    if rec["item"].shape != (int(self.lengths[index]),):
      raise DataFormatError(self._shard_of(index), index,
                            f"record has {rec['item'].shape[0]} items, "
                            f"{LENGTHS} says {int(self.lengths[index])}")
    return rec

  def __getitem__(self, index: int) -> dict:
    rec = self.record(index)
    rec["genre"] = self.item_genres[rec["item"]]
    return rec

  def sequence_data(self) -> seqlib.SequenceData:
    """Loads everything back into memory as a :class:`SequenceData`."""
    recs = [self.record(i) for i in range(self.num_users)]
    offsets = np.zeros(self.num_users + 1, np.int64)
    np.cumsum(self.lengths, out=offsets[1:])
    cat = lambda k, dt: (np.concatenate([r[k] for r in recs]).astype(dt)
                         if recs else np.zeros(0, dt))
    reviews = None
    if any(r["review"] is not None for r in recs):
      reviews = [x for r in recs for x in (r["review"] or [None] * len(r["item"]))]
    return seqlib.SequenceData(
        users=list(self.users), vocabs=dict(self.vocabs), offsets=offsets,
        item_N=cat("item", np.int32), rating_N=cat("rating", np.int32),
        timestamp_N=cat("timestamp", np.int64),
        timegap_N=cat("timegap", np.int32), review_N=reviews,
        item_titles=list(self.item_titles), item_genres=self.item_genres,
        stats=dict(self.metadata.get("build_stats", {})))

  def __repr__(self) -> str:
    return (f"PreparedDataset({str(self.directory)!r}, users={self.num_users}, "
            f"items={self.num_items}, interactions={self.num_interactions})")


def open_dataset(directory: os.PathLike | str, *,
                 verify: bool = False) -> PreparedDataset:
  """Opens and validates a prepared dataset (``verify``: also check sha256)."""
  return PreparedDataset(directory, verify=verify)


def normalize_settings(settings: dict) -> dict:
  unknown = set(settings) - set(DEFAULT_SETTINGS) - {"reader_kwargs"}
  if unknown:
    raise TypeError(f"unknown prepare settings {sorted(unknown)}; expected "
                    f"{sorted(DEFAULT_SETTINGS)} or reader_kwargs")
  out = dict(DEFAULT_SETTINGS)
  out.update(settings)
  out["reader_kwargs"] = dict(sorted((settings.get("reader_kwargs")
                                      or {}).items()))
  # Round-trip through JSON so comparisons with stored settings are exact.
  return json.loads(json.dumps(out, sort_keys=True))


def hash_source_files(files: Iterable[os.PathLike | str]) -> dict[str, str]:
  """``{basename: sha256}``; basenames must be unique."""
  out: dict[str, str] = {}
  for p in files:
    p = pathlib.Path(p)
    if p.name in out:
      raise DataError(f"two source files share the name {p.name!r}")
    out[p.name] = sha256_file(p)
  return out


def build_and_write(interactions: Iterable[Interaction],
                    out: os.PathLike | str, *, name: str,
                    source: Optional[str] = None,
                    source_files: Optional[dict[str, str]] = None,
                    report: Optional[ReadReport] = None,
                    **settings) -> PreparedDataset:
  """Builds sequences from ``interactions`` and writes them to ``out``."""
  report = report if report is not None else ReadReport()
  s = normalize_settings(settings)
  seq = seqlib.build_sequences(
      interactions, min_user_count=s["min_user_count"],
      min_item_count=s["min_item_count"], k_core=s["k_core"],
      max_genres=s["max_genres"], report=report)
  return write_dataset(seq, out, name=name, source=source, settings=s,
                       source_files=source_files or {}, report=report)


def _reusable(out, settings: dict, name: str,
              source: Optional[str], files: dict[str, str]) -> bool:
  if not (paths.path(out) / METADATA).is_file():
    return False
  try:
    ds = open_dataset(out, verify=True)
  except DataError:
    return False
  m = ds.metadata
  return (m.get("settings") == settings and m.get("dataset") == name
          and m.get("source") == source and m.get("source_files") == files)


def prepare_dataset(name: str, source: Optional[str], out: os.PathLike | str,
                    *, strict: bool = False,
                    progress: Optional[Callable[[Iterable], Iterable]] = None,
                    report: Optional[ReadReport] = None,
                    force: bool = False,
                    **settings) -> PreparedDataset:
  """Reads dataset ``name`` (``data.sources`` registry) and prepares ``out``.

  Reuses an existing valid ``out`` built from the same source files (sha256)
  with the same settings (unless ``force``); otherwise (re)builds it
  atomically. ``progress``
  wraps the interaction stream (e.g. a tqdm bar). ``settings``: see
  :data:`DEFAULT_SETTINGS`; ``reader_kwargs`` go to the reader.
  """
  from userllm_jax.data import sources  # pylint: disable=g-import-not-at-top
  for fn in ("read_dataset", "source_files"):
    if not hasattr(sources, fn):
      raise DataError(f"userllm_jax.data.sources has no {fn}(): the reader "
                      "registry is not available")
  out = paths.path(out) if paths.is_remote(out) else pathlib.Path(out)
  s = normalize_settings(settings)
  source = None if source is None else str(source)
  files = hash_source_files(sources.source_files(name, source,
                                                **s["reader_kwargs"]))
  if not force and _reusable(out, s, name, source, files):
    ds = open_dataset(out)
    ds.reused = True
    return ds
  report = report if report is not None else ReadReport(strict=strict)
  stream = sources.read_dataset(name, source, report=report,
                                **s["reader_kwargs"])
  if progress is not None:
    stream = progress(stream)
  seq = seqlib.build_sequences(
      stream, min_user_count=s["min_user_count"],
      min_item_count=s["min_item_count"], k_core=s["k_core"],
      max_genres=s["max_genres"], report=report)
  return write_dataset(seq, out, name=name, source=source, settings=s,
                       source_files=files, report=report)


def dataset_files(directory: os.PathLike | str) -> Sequence[pathlib.Path]:
  """All files of a prepared dataset (for copying or hashing)."""
  d = paths.path(directory) if paths.is_remote(directory) else pathlib.Path(directory)
  meta = json.loads((d / METADATA).read_text(encoding="utf-8"))
  return [d / METADATA] + [d / f for f in sorted(meta["files"])]
