"""Grain input pipelines: encoder pretraining batches and evaluation batches.

Training (:func:`make_train_iterator`)::

  MapDataset.source(users with a usable training part)
    epoch_shuffle(seed)            # a new permutation every epoch (numpy, cached)
    .repeat(num_epochs)            # None = forever
    .random_map(crop)              # seeded random window of max_len+1 items of the
                                   # user's training part (leave-one-out: all but
                                   # the last two); inputs = w[:-1], targets = w[1:]
    shard                          # this process's block (of batch_size rows) of
                                   # every global batch (BlockShardMapDataset);
                                   # packing: [shard_index::shard_count]
    .to_iter_dataset()
    -> pad to max_len  |  FirstFitPackIterDataset (packing=True)
    .batch(batch_size, drop_remainder=True)
    .map(genres gathered from item_genres for the whole batch; key names)
    [.mp_prefetch(worker_count)]    # -1 = auto: sized from the host's cores
                                    # (resolve_worker_count)

Only one user record is read per example and the crop happens inside the map,
so 10,000-item histories stream without copying the dataset. The iterator's
``get_state()/set_state()`` restore the stream exactly (also through Orbax with
``grain.checkpoint.CheckpointSave/CheckpointRestore``).

Batch fields (numpy ``int32``, ``B = batch_size`` per process, ``T = max_len``,
0 = padding / no target): ``item_BxT, genre_BxTxG, rating_BxT, timegap_BxT,
position_BxT`` (0-based within its sequence), ``segment_BxT`` (1.. per packed
sequence, 0 = pad), ``target_item_BxT, target_genre_BxTxG, target_rating_BxT``.

Evaluation (:func:`make_eval_batches`): for every leave-one-out user, the last
``max_len`` items before the held-out item (valid: item ``T-2``; test: item
``T-1``), left-aligned and padded, plus ``target_item_B``, ``length_B``,
``user_index_B`` and ``mask_B`` (0 for the filler rows of the last batch);
:meth:`EvalBatches.seen_items` / :meth:`EvalBatches.seen_mask` give each user's
already-seen items for excluding them from a ranking.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Optional, Sequence

import grain
import numpy as np

from userllm_jax.data.schema import DataError

# Per-position fields of an example (before batching), all int32.
SEQ_FIELDS = ("item", "genre", "rating", "timegap", "target_item",
              "target_genre", "target_rating")
BATCH_FIELDS = ("item", "genre", "rating", "timegap", "position", "segment",
                "target_item", "target_genre", "target_rating")


def batch_key(field: str) -> str:
  """Batch dict key of a field: item -> item_BxT, genre -> genre_BxTxG."""
  return field + ("_BxTxG" if field.endswith("genre") else "_BxT")


# ----------------------------------------------------------------------------
# Generic window helpers (also for downstream-task pipelines).


def random_window(length: int, size: int,
                  rng: np.random.Generator) -> tuple[int, int]:
  """A uniformly random ``[start, stop)`` of ``min(size, length)`` items."""
  w = min(size, length)
  start = int(rng.integers(0, length - w + 1))
  return start, start + w


def last_window(stop: int, size: int) -> tuple[int, int]:
  """The last ``min(size, stop)`` items before ``stop``."""
  return max(0, stop - size), stop


def window_features(rec: dict, start: int, stop: int,
                    item_genres: np.ndarray) -> dict:
  """Item, genre [L,G], rating, timegap of items ``[start, stop)`` (int32)."""
  item = np.asarray(rec["item"][start:stop], np.int32)
  return {"item": item,
          "genre": np.asarray(item_genres[item], np.int32),
          "rating": np.asarray(rec["rating"][start:stop], np.int32),
          "timegap": np.asarray(rec["timegap"][start:stop], np.int32)}


def next_item_example(rec: dict, start: int, stop: int,
                      item_genres: np.ndarray) -> dict:
  """Inputs = items ``[start, stop-1)``, targets = items ``[start+1, stop)``.

  Returns variable-length (``L = stop - start - 1``) int32 arrays under the
  keys of :data:`SEQ_FIELDS`.
  """
  if stop - start < 2:
    raise ValueError(f"a next-item example needs >= 2 items; got window "
                     f"[{start}, {stop})")
  f = window_features(rec, start, stop, item_genres)
  return {"item": f["item"][:-1], "genre": f["genre"][:-1],
          "rating": f["rating"][:-1], "timegap": f["timegap"][:-1],
          "target_item": f["item"][1:], "target_genre": f["genre"][1:],
          "target_rating": f["rating"][1:]}


def pad_to(x: np.ndarray, length: int) -> np.ndarray:
  """Pads (with 0) or refuses to truncate axis 0 to ``length``."""
  n = x.shape[0]
  if n > length:
    raise ValueError(f"sequence of {n} items longer than {length}")
  if n == length:
    return x
  out = np.zeros((length,) + x.shape[1:], x.dtype)
  out[:n] = x
  return out


def pad_example(ex: dict, max_len: int,
                fields: Sequence[str] = SEQ_FIELDS) -> dict:
  """Pads an example at the end to ``max_len``; adds position and segment."""
  n = ex["item"].shape[0]
  out = {k: pad_to(ex[k], max_len) for k in fields}
  out["position"] = pad_to(np.arange(n, dtype=np.int32), max_len)
  out["segment"] = pad_to(np.ones(n, np.int32), max_len)
  return out


# ----------------------------------------------------------------------------
# Host resources.


def available_cpus() -> int:
  """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def resolve_worker_count(worker_count: int, cpus: Optional[int] = None) -> int:
  """Grain worker processes for ``data.worker_count``; ``-1`` = auto from the host's cores.

  Auto: 0 (in-process) below 4 CPUs -- a worker process costs a core of its own and the
  trainer's Python thread, XLA's host threads and the device-prefetch thread need the others
  (on 2 cores, ``benchmarks/pipeline.py`` measured in-process reading as fast as 1-2
  workers) -- else half the CPUs, at most 16: one process drives all accelerators of a
  host, so the other half stays with it.
  """
  worker_count = int(worker_count)
  if worker_count >= 0:
    return worker_count
  if worker_count != -1:
    raise ValueError(f"data.worker_count={worker_count}: expected >= 0, or -1 (auto)")
  cpus = available_cpus() if cpus is None else int(cpus)
  return 0 if cpus < 4 else min(16, cpus // 2)


# ----------------------------------------------------------------------------
# Training.


class _UserSubset:
  """Random access to ``prepared.record(indices[i])`` (a Grain source).

  ``cache``: keep each decoded record's ``fields`` in memory after its first read (an
  ArrayRecord read + msgpack decode costs ~0.1 ms, which alone limits one process to a
  few dozen batches of 128 per second); each worker process keeps its own cache.
  """

  def __init__(self, prepared, indices: np.ndarray, *, cache: bool = False,
               fields: Optional[Sequence[str]] = None):
    self.prepared = prepared
    self.indices = np.asarray(indices, np.int64)
    self.fields = tuple(fields) if fields else None
    self.cache = cache
    self._cache: dict = {}

  def __len__(self) -> int:
    return int(self.indices.shape[0])

  def __getitem__(self, i: int) -> dict:
    if not self.cache:
      return self.prepared.record(int(self.indices[i]))
    rec = self._cache.get(i)
    if rec is None:
      rec = self.prepared.record(int(self.indices[i]))
      if self.fields:
        rec = {k: rec[k] for k in self.fields}
      self._cache[i] = rec
    return rec

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = {}
    return state

  def __repr__(self) -> str:
    return f"_UserSubset({self.prepared!r}, n={len(self)})"


class EpochPermutationMapDataset(grain.MapDataset):
  """A seeded shuffle that is a fresh permutation every epoch.

  Same contract as ``MapDataset.shuffle`` (index ``e * n + i`` of the
  repeated dataset maps to ``e * n + perm_e[i]``), but ``perm_e`` is a
  numpy permutation drawn once per epoch (``default_rng([seed, e])``) and
  cached, instead of Grain's per-index ``index_shuffle``, which costs
  ~0.5 ms per element at 10M users and ~7 ms at 20 (measured, grain 0.2.18).
  Memory: 4 bytes per user per cached epoch (at most 3 epochs cached).
  """

  def __init__(self, parent, *, seed: int):
    super().__init__(parent)
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32); got {seed}")
    self._perm_seed = int(seed)
    self._perms = {}

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"EpochPermutationMapDataset(seed={self._perm_seed})"

  def _perm(self, epoch: int) -> np.ndarray:
    p = self._perms.get(epoch)
    if p is None:
      n = len(self._parent)
      p = np.random.default_rng([self._perm_seed, epoch]).permutation(n)
      p = p.astype(np.int32 if n < 2**31 else np.int64)
      self._perms[epoch] = p
      for old in [e for e in list(self._perms) if e < epoch - 2]:
        self._perms.pop(old, None)
    return p

  def _index(self, index: int) -> int:
    n = len(self._parent)
    epoch, i = divmod(int(index), n)
    return int(self._perm(epoch)[i]) + epoch * n

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._index(index)]

  def _getitems(self, indices):
    return self._parent._getitems([self._index(i) for i in indices])  # pylint: disable=protected-access

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_perms"] = {}
    return state


def epoch_shuffle(ds, seed: int):
  """``ds`` shuffled with a new seeded permutation every epoch (use before
  ``repeat``); see :class:`EpochPermutationMapDataset`."""
  return EpochPermutationMapDataset(ds, seed=seed)


class BlockShardMapDataset(grain.MapDataset):
  """Process ``index`` of ``count``'s rows of every global batch of ``count * block`` examples.

  Element ``n`` of this shard is element ``(n // block) * count * block + index * block +
  n % block`` of the parent: batched by ``block``, the shard's batch ``k`` is block ``index``
  of global batch ``k``, so the processes' batches, laid side by side in block order, are
  exactly the 1-process batch (row order included: per-row randomness such as dropout sees
  the same example in the same row on any process count).
  """

  def __init__(self, parent, *, index: int, count: int, block: int):
    super().__init__(parent)
    self._index, self._count, self._block = int(index), int(count), int(block)

  def __len__(self) -> int:
    full, rest = divmod(len(self._parent), self._count * self._block)
    return full * self._block + max(0, min(self._block, rest - self._index * self._block))

  def __str__(self) -> str:
    return (f"BlockShardMapDataset(index={self._index}, count={self._count}, "
            f"block={self._block})")

  def _global(self, n: int) -> int:
    k, r = divmod(int(n), self._block)
    return (k * self._count + self._index) * self._block + r

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global(index)]


# Fields the training crop emits and the packer packs; genres are gathered
# from item_genres once per batch (cheaper than packing [L, G] arrays).
TRAIN_FIELDS = ("item", "rating", "timegap", "target_item", "target_rating")


class _TrainCrop:
  """Picklable seeded random crop of a user's leave-one-out training part."""

  def __init__(self, item_genres: np.ndarray, max_len: int):
    self.item_genres = item_genres
    self.max_len = max_len

  def __call__(self, rec: dict, rng: np.random.Generator) -> dict:
    n_train = rec["item"].shape[0] - 2  # Leave-one-out: drop valid + test.
    start, stop = random_window(n_train, self.max_len + 1, rng)
    item = np.asarray(rec["item"][start:stop], np.int32)
    rating = np.asarray(rec["rating"][start:stop], np.int32)
    return {"item": item[:-1], "rating": rating[:-1],
            "timegap": np.asarray(rec["timegap"][start:stop - 1], np.int32),
            "target_item": item[1:], "target_rating": rating[1:]}


class _Pad:
  def __init__(self, max_len: int):
    self.max_len = max_len

  def __call__(self, ex: dict) -> dict:
    return pad_example(ex, self.max_len, fields=TRAIN_FIELDS)


class _TrainCropPad(_TrainCrop):
  """``_TrainCrop`` then ``_Pad`` in one map (the same rng draw, so the same examples):
  one Grain stage less per example, and the padded arrays are filled without copies."""

  def __call__(self, rec: dict, rng: np.random.Generator) -> dict:
    n_train = rec["item"].shape[0] - 2
    start, stop = random_window(n_train, self.max_len + 1, rng)
    n = stop - start - 1
    T = self.max_len
    out = {k: np.zeros((T,), np.int32) for k in TRAIN_FIELDS + ("position", "segment")}
    item = rec["item"][start:stop]
    rating = rec["rating"][start:stop]
    out["item"][:n] = item[:-1]
    out["target_item"][:n] = item[1:]
    out["rating"][:n] = rating[:-1]
    out["target_rating"][:n] = rating[1:]
    out["timegap"][:n] = rec["timegap"][start:stop - 1]
    out["position"][:n] = _ARANGE[:n] if n <= _ARANGE.size else np.arange(n)
    out["segment"][:n] = 1
    return out


_ARANGE = np.arange(4096, dtype=np.int32)


def _from_packed(ex: dict) -> dict:
  out = {k: np.asarray(ex[k], np.int32) for k in TRAIN_FIELDS}
  out["position"] = np.asarray(ex["item_positions"], np.int32)
  out["segment"] = np.asarray(ex["item_segment_ids"], np.int32)
  return out


class _ToBatch:
  """Adds genre/target_genre (gathered per batch) and the batch key names."""

  def __init__(self, item_genres: np.ndarray):
    self.item_genres = item_genres

  def __call__(self, b: dict) -> dict:
    b = dict(b)
    b["genre"] = self.item_genres[b["item"]]
    b["target_genre"] = self.item_genres[b["target_item"]]
    return {batch_key(k): np.asarray(b[k], np.int32) for k in BATCH_FIELDS}


class _StackToBatch(_ToBatch):
  """Grain ``batch_fn``: stacks padded examples, then :class:`_ToBatch`."""

  def __call__(self, examples) -> dict:
    keys = examples[0].keys()
    return super().__call__({k: np.stack([e[k] for e in examples]) for k in keys})


def train_users(prepared, min_train_items: int = 2) -> np.ndarray:
  """Users whose leave-one-out training part has >= ``min_train_items``."""
  return np.nonzero(np.asarray(prepared.lengths) - 2 >= min_train_items)[0]


def make_train_dataset(prepared, *, max_len: int, batch_size: int, seed: int,
                       packing: bool = False, shard_index: int = 0,
                       shard_count: int = 1, num_epochs: Optional[int] = None,
                       worker_count: int = 0,
                       num_packing_bins: Optional[int] = None,
                       read_options=None, worker_buffer_size: int = 2,
                       cache_max_interactions: int = 20_000_000):
  """The training pipeline as a ``grain.IterDataset`` (see module docstring).

  ``num_packing_bins`` defaults to ``batch_size``. ``read_options`` (a
  ``grain.ReadOptions``) defaults to ``min(4, cpu_count)`` reader threads and
  a buffer of ``max(64, 2 * batch_size)`` examples: the per-example work is
  Python (GIL-bound), and Grain's own default (16 threads, 500 buffered) was
  2.5-3.5x slower in benchmarks/pipeline.py on 2 cores. Scale out with
  ``worker_count`` (processes; -1 = auto, :func:`resolve_worker_count`) instead,
  each worker keeping ``worker_buffer_size`` batches ready. Datasets of at most
  ``cache_max_interactions`` interactions keep their decoded training fields in memory
  after the first read (12 bytes per interaction per process).
  """
  if max_len < 1 or batch_size < 1:
    raise ValueError(f"max_len and batch_size must be >= 1; got {max_len}, "
                     f"{batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, shard_count={shard_count}); "
                     f"got {shard_index}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None; got {num_epochs}")
  users = train_users(prepared)
  if users.size < shard_count:
    raise DataError(
        f"{getattr(prepared, 'directory', prepared)}: {users.size} users have "
        f">= 4 interactions (a training part of >= 2 items after holding out "
        f"valid and test); at least shard_count={shard_count} required")
  cache = int(getattr(prepared, "num_interactions", 0) or 0) <= cache_max_interactions
  ds = grain.MapDataset.source(_UserSubset(prepared, users, cache=cache,
                                           fields=("item", "rating", "timegap")))
  ds = epoch_shuffle(ds, seed).repeat(num_epochs)
  # The crop's rng is per element index: crop first, then slice, so global element i gets the
  # same window whatever the process count (2 processes read exactly the examples of 1).
  if packing:
    ds = ds.random_map(_TrainCrop(prepared.item_genres, max_len), seed=seed)
    ds = ds[shard_index::shard_count]      # packing mixes rows anyway: a plain stride
    if read_options is None:
      read_options = grain.ReadOptions(
          num_threads=min(4, os.cpu_count() or 1),
          prefetch_buffer_size=max(64, 2 * batch_size))
    it = ds.to_iter_dataset(read_options)
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={k: max_len for k in TRAIN_FIELDS},
        num_packing_bins=num_packing_bins or batch_size, seed=seed,
        shuffle_bins=True)
    it = it.map(_from_packed)
    it = it.batch(batch_size, drop_remainder=True)
    it = it.map(_ToBatch(prepared.item_genres))
  else:
    # Padded rows need no look-ahead: crop + pad + batch at the MapDataset level, so the
    # iterator (and its read-ahead threads) handles whole batches, and Grain's per-element
    # iterator overhead (~2/3 of the CPU time per example, profiled) is paid once per batch.
    # The examples are the same as crop -> to_iter_dataset -> pad -> batch (random_map's
    # rng is per element index either way).
    ds = ds.random_map(_TrainCropPad(prepared.item_genres, max_len), seed=seed)
    if shard_count > 1:
      ds = BlockShardMapDataset(ds, index=shard_index, count=shard_count, block=batch_size)
    ds = ds.batch(batch_size, drop_remainder=True,
                  batch_fn=_StackToBatch(prepared.item_genres))
    if read_options is None:
      read_options = grain.ReadOptions(num_threads=min(2, os.cpu_count() or 1),
                                       prefetch_buffer_size=4)
    it = ds.to_iter_dataset(read_options)
  worker_count = resolve_worker_count(worker_count)
  if worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # mp_prefetch reads absl flags.
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=max(1, int(worker_buffer_size))))
  return it


def make_train_iterator(prepared, *, max_len: int, batch_size: int, seed: int,
                        packing: bool = False, shard_index: int = 0,
                        shard_count: int = 1, num_epochs: Optional[int] = None,
                        worker_count: int = 0,
                        num_packing_bins: Optional[int] = None,
                        read_options=None, worker_buffer_size: int = 2,
                        cache_max_interactions: int = 20_000_000):
  """A ``grain.DatasetIterator`` of pretraining batches (exact resume via
  ``get_state()/set_state()``)."""
  return iter(make_train_dataset(
      prepared, max_len=max_len, batch_size=batch_size, seed=seed,
      packing=packing, shard_index=shard_index, shard_count=shard_count,
      num_epochs=num_epochs, worker_count=worker_count,
      num_packing_bins=num_packing_bins, read_options=read_options,
      worker_buffer_size=worker_buffer_size,
      cache_max_interactions=cache_max_interactions))


# ----------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass
class EvalBatches:
  """Iterable of leave-one-out evaluation batches for one split."""

  prepared: object
  split: str
  max_len: int
  batch_size: int
  users: np.ndarray  # user indices evaluated, in order

  def __len__(self) -> int:
    return -(-int(self.users.size) // self.batch_size)

  def target_index(self, user_index: int) -> int:
    t = int(self.prepared.lengths[user_index])
    return t - 2 if self.split == "valid" else t - 1

  def seen_items(self, user_index: int) -> np.ndarray:
    """Distinct item ids in the user's whole history before the target."""
    rec = self.prepared.record(user_index)
    return np.unique(rec["item"][:self.target_index(user_index)])

  def seen_mask(self, batch: dict, num_item_ids: Optional[int] = None
                ) -> np.ndarray:
    """bool ``[B, V]``: True for items already seen by the row's user (to
    exclude from ranking). The row's own target is never masked; pad (0) and
    OOV (1) are always masked; filler rows are all False except pad/oov."""
    v = num_item_ids or self.prepared.vocabs["item"].size
    b = batch["user_index_B"].shape[0]
    mask = np.zeros((b, v), bool)
    mask[:, :2] = True
    for r in range(b):
      if batch["mask_B"][r]:
        mask[r, self.seen_items(int(batch["user_index_B"][r]))] = True
        mask[r, batch["target_item_B"][r]] = False
    return mask

  def example(self, user_index: int) -> dict:
    rec = self.prepared.record(user_index)
    tgt = self.target_index(user_index)
    start, stop = last_window(tgt, self.max_len)
    f = window_features(rec, start, stop, self.prepared.item_genres)
    n = stop - start
    ex = {k: pad_to(v, self.max_len) for k, v in f.items()}
    ex["position"] = pad_to(np.arange(n, dtype=np.int32), self.max_len)
    ex["segment"] = pad_to(np.ones(n, np.int32), self.max_len)
    ex["target_item"] = np.int32(rec["item"][tgt])
    ex["length"] = np.int32(n)
    ex["user_index"] = np.int32(user_index)
    return ex

  def __iter__(self) -> Iterator[dict]:
    g = self.prepared.max_genres
    for b0 in range(0, self.users.size, self.batch_size):
      idx = self.users[b0:b0 + self.batch_size]
      exs = [self.example(int(u)) for u in idx]
      n_fill = self.batch_size - len(exs)
      batch = {}
      for k in ("item", "genre", "rating", "timegap", "position", "segment"):
        arr = np.stack([e[k] for e in exs]).astype(np.int32)
        if n_fill:
          arr = np.concatenate([arr, np.zeros((n_fill,) + arr.shape[1:],
                                              np.int32)])
        batch[batch_key(k)] = arr
      assert batch["genre_BxTxG"].shape[-1] == g
      for k in ("target_item", "length", "user_index"):
        v = np.asarray([e[k] for e in exs], np.int32)
        fill = -1 if k == "user_index" else 0
        batch[k + "_B"] = np.concatenate([v, np.full(n_fill, fill, np.int32)])
      batch["mask_B"] = np.concatenate([np.ones(len(exs), np.int32),
                                        np.zeros(n_fill, np.int32)])
      yield batch


def make_eval_batches(prepared, split: str = "valid", *, max_len: int,
                      batch_size: int,
                      users: Optional[Sequence[int]] = None) -> EvalBatches:
  """Leave-one-out eval batches (see module docstring); ``users`` restricts
  to those user indices (default: all users with >= 3 interactions)."""
  if split not in ("valid", "test"):
    raise ValueError(f"split must be 'valid' or 'test'; got {split!r}")
  if max_len < 1 or batch_size < 1:
    raise ValueError(f"max_len and batch_size must be >= 1; got {max_len}, "
                     f"{batch_size}")
  lengths = np.asarray(prepared.lengths)
  eligible = np.nonzero(lengths >= 3)[0]
  if users is not None:
    users = np.asarray(users, np.int64)
    bad = users[lengths[users] < 3] if users.size else users
    if bad.size:
      raise DataError(f"users {bad[:5].tolist()} have < 3 interactions and "
                      "no leave-one-out valid/test item")
    eligible = users
  if eligible.size == 0:
    raise DataError(f"{getattr(prepared, 'directory', prepared)}: no user has "
                    ">= 3 interactions (needed for leave-one-out evaluation)")
  return EvalBatches(prepared, split, max_len, batch_size, eligible)
