"""Per-user chronological sequences, vocabularies and leak-free splits.

:func:`build_sequences` turns a stream of :class:`~userllm_jax.data.schema.Interaction`
rows (any reader in ``data/sources``) into a compact, integer-coded
:class:`SequenceData`:

* **Order.** Each user's interactions are sorted by ``timestamp``; rows with
  equal timestamps keep the order in which the reader yielded them (source-file
  order). The sort is a stable sort on the timestamp, so the rule is exact and
  reproducible (MovieLens has many equal timestamps per user).
* **Vocabularies** (:class:`Vocab`, ``PAD = 0``, ``OOV = 1``):
  ``item`` (ids ordered by interaction count, descending, ties by item string),
  ``genre`` (genre/category strings, ordered by the number of items carrying
  them, descending, ties by string), ``rating`` (distinct rating values, in
  increasing numeric order; a missing rating maps to ``OOV``) and ``timegap``
  (a fixed vocabulary of log2-scaled gaps in seconds to the user's previous
  interaction; see :func:`timegap_ids`).
* **Filtering.** Items with fewer than ``min_item_count`` interactions are
  dropped, then users with fewer than ``min_user_count``; with ``k_core=True``
  the two steps repeat until nothing changes. What was removed (users, items,
  interactions) is written to ``report.note``; nothing is raised unless no
  interaction is left at all.
* **Item tables.** ``item_titles[i]`` (the first non-empty title seen for item
  id ``i``; ``""`` for pad/oov/unknown) and ``item_genres[i]`` (int32
  ``[num_item_ids, G]``, genre ids of the first non-empty genre list seen,
  truncated to ``G = max_genres``, 0-padded).

Splits never leak the future: every training example of a user lies strictly
before that user's validation target, which lies before the test target
(:func:`leave_one_out`, :func:`userllm_windows`), or all training data lies
before a global time (:func:`time_cutoff`). Splits are lists of :class:`Window`
index ranges into the user sequences, so they cost no copies.
"""

from __future__ import annotations

import array
import collections
import dataclasses
from typing import Iterable, Optional, Sequence

import numpy as np

from userllm_jax.data.schema import DataError, Interaction, ReadReport

PAD = 0
OOV = 1
PAD_TOKEN = "<pad>"
OOV_TOKEN = "<oov>"

# Time-gap vocabulary: PAD, OOV, FIRST (no previous interaction), then one
# bucket for a gap of 0 s and one per power of two: bucket k >= 1 holds gaps
# in [2**(k-1), 2**k) seconds; the last bucket also holds every longer gap.
TIMEGAP_FIRST = 2
TIMEGAP_ZERO = 3
NUM_GAP_LOG_BUCKETS = 34  # up to 2**33 s (~272 years): nothing is longer.


class Vocab:
  """A string vocabulary with ``PAD = 0`` and ``OOV = 1``.

  ``tokens[i]`` is the string of id ``i``; ``tokens[0] == "<pad>"`` and
  ``tokens[1] == "<oov>"``. Unknown strings map to ``OOV``.
  """

  def __init__(self, tokens: Sequence[str]):
    tokens = list(tokens)
    if tokens[:2] != [PAD_TOKEN, OOV_TOKEN]:
      raise ValueError(f"Vocab tokens must start with {PAD_TOKEN!r}, "
                       f"{OOV_TOKEN!r}; got {tokens[:2]!r}")
    self.tokens = tokens
    self._index = {t: i for i, t in enumerate(tokens)}
    if len(self._index) != len(tokens):
      dup = [t for t, c in collections.Counter(tokens).items() if c > 1]
      raise ValueError(f"Vocab has duplicate tokens: {dup[:5]!r}")

  @classmethod
  def from_strings(cls, strings: Iterable[str]) -> "Vocab":
    return cls([PAD_TOKEN, OOV_TOKEN, *strings])

  @property
  def size(self) -> int:
    return len(self.tokens)

  def __len__(self) -> int:
    return len(self.tokens)

  def id(self, token: str) -> int:
    return self._index.get(token, OOV)

  def ids(self, tokens: Iterable[str]) -> np.ndarray:
    return np.asarray([self._index.get(t, OOV) for t in tokens], np.int32)

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocab) and self.tokens == other.tokens

  def __repr__(self) -> str:
    return f"Vocab(size={self.size}, first={self.tokens[2:5]!r})"


def timegap_vocab() -> Vocab:
  """The fixed time-gap vocabulary (ids as produced by :func:`timegap_ids`)."""
  names = ["<first>", "0s"]
  for k in range(1, NUM_GAP_LOG_BUCKETS + 1):
    lo, hi = 2 ** (k - 1), 2 ** k
    names.append(f"[{lo},{hi})s" if k < NUM_GAP_LOG_BUCKETS else f">={lo}s")
  return Vocab.from_strings(names)


def timegap_ids(timestamp_T: np.ndarray) -> np.ndarray:
  """Bucketed gap to the previous interaction for one chronological sequence.

  Position 0 gets ``TIMEGAP_FIRST``; a gap ``g`` seconds gets ``TIMEGAP_ZERO``
  when ``g == 0`` and ``TIMEGAP_ZERO + min(floor(log2 g) + 1, 34)`` otherwise.
  """
  ts = np.asarray(timestamp_T, np.int64)
  out = np.full(ts.shape, TIMEGAP_FIRST, np.int32)
  if ts.size > 1:
    gap = np.diff(ts)
    if (gap < 0).any():
      raise ValueError("timegap_ids needs a chronological (non-decreasing) "
                       f"sequence; found a negative gap {gap.min()}")
    # floor(log2 g) + 1 == bit length of g == frexp exponent (exact for
    # g < 2**53).
    _, k = np.frexp(gap.astype(np.float64))
    k = np.where(gap > 0, k, 0).astype(np.int64)
    out[1:] = TIMEGAP_ZERO + np.minimum(k, NUM_GAP_LOG_BUCKETS)
  return out


def rating_token(r: float) -> str:
  return f"{float(r):g}"


@dataclasses.dataclass
class SequenceData:
  """All users' chronological sequences, stored flat (CSR) to stay compact.

  User ``u`` owns rows ``offsets[u]:offsets[u+1]`` of the flat arrays
  ``item_N`` (item vocab ids), ``rating_N`` (rating vocab ids),
  ``timestamp_N`` (int64 seconds) and ``timegap_N`` (timegap vocab ids);
  ``review_N`` is a list of ``str | None`` or ``None`` when no row has one.
  """

  users: list[str]
  vocabs: dict[str, Vocab]
  offsets: np.ndarray
  item_N: np.ndarray
  rating_N: np.ndarray
  timestamp_N: np.ndarray
  timegap_N: np.ndarray
  review_N: Optional[list[Optional[str]]]
  item_titles: list[str]
  item_genres: np.ndarray
  stats: dict = dataclasses.field(default_factory=dict)

  @property
  def num_users(self) -> int:
    return len(self.users)

  @property
  def num_items(self) -> int:
    """Real items (the item vocabulary without pad/oov)."""
    return self.vocabs["item"].size - 2

  @property
  def num_interactions(self) -> int:
    return int(self.item_N.shape[0])

  @property
  def max_genres(self) -> int:
    return int(self.item_genres.shape[1])

  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets).astype(np.int64)

  def user_arrays(self, u: int) -> dict:
    """User ``u``'s sequence: item [T], genre [T,G], rating [T], timestamp [T],
    timegap [T] (views into the flat arrays; genre is gathered) and review."""
    a, b = int(self.offsets[u]), int(self.offsets[u + 1])
    item = self.item_N[a:b]
    return {
        "item": item,
        "genre": self.item_genres[item],
        "rating": self.rating_N[a:b],
        "timestamp": self.timestamp_N[a:b],
        "timegap": self.timegap_N[a:b],
        "review": None if self.review_N is None else self.review_N[a:b],
    }


def build_sequences(interactions: Iterable[Interaction], *,
                    min_user_count: int = 1, min_item_count: int = 1,
                    k_core: bool = False, max_genres: Optional[int] = None,
                    report: Optional[ReadReport] = None) -> SequenceData:
  """Codes, orders and filters interactions; see the module docstring."""
  if min_user_count < 1 or min_item_count < 1:
    raise ValueError(f"min_user_count and min_item_count must be >= 1; got "
                     f"{min_user_count}, {min_item_count}")
  if max_genres is not None and max_genres < 1:
    raise ValueError(f"max_genres must be >= 1 or None; got {max_genres}")
  report = report if report is not None else ReadReport()
  user_code: dict[str, int] = {}
  item_code: dict[str, int] = {}
  users_c = array.array("q")
  items_c = array.array("q")
  ts_c = array.array("q")
  rating_c = array.array("d")
  reviews: list[Optional[str]] = []
  any_review = False
  item_title: dict[int, str] = {}
  item_gen: dict[int, tuple[str, ...]] = {}
  nan = float("nan")
  for x in interactions:
    u = user_code.setdefault(x.user, len(user_code))
    i = item_code.setdefault(x.item, len(item_code))
    users_c.append(u)
    items_c.append(i)
    ts_c.append(int(x.timestamp))
    rating_c.append(nan if x.rating is None else float(x.rating))
    reviews.append(x.review)
    if x.review is not None:
      any_review = True
    if x.title and i not in item_title:
      item_title[i] = x.title
    if x.genres and i not in item_gen:
      item_gen[i] = tuple(x.genres)
  user_c = np.frombuffer(users_c, np.int64) if users_c else np.zeros(0, np.int64)
  item_c = np.frombuffer(items_c, np.int64) if items_c else np.zeros(0, np.int64)
  ts = np.frombuffer(ts_c, np.int64) if ts_c else np.zeros(0, np.int64)
  rating = np.frombuffer(rating_c, np.float64) if rating_c else np.zeros(0)
  if user_c.size == 0:
    raise DataError("build_sequences: no interactions to build from "
                    f"(read report: {report.summary()})")
  item_strs = list(item_code)  # code -> string

  # Filtering (optionally to a k-core).
  keep = np.ones(user_c.shape, bool)
  n_users0, n_items0 = len(user_code), len(item_code)
  rounds = 0
  while True:
    rounds += 1
    changed = False
    ic = np.bincount(item_c[keep], minlength=n_items0)
    bad_item = (ic > 0) & (ic < min_item_count)
    if bad_item.any():
      keep &= ~bad_item[item_c]
      changed = True
    uc = np.bincount(user_c[keep], minlength=n_users0)
    bad_user = (uc > 0) & (uc < min_user_count)
    if bad_user.any():
      keep &= ~bad_user[user_c]
      changed = True
    if not (k_core and changed):
      break
  n_kept = int(keep.sum())
  users_left = np.unique(user_c[keep])
  items_left = np.unique(item_c[keep])
  if n_kept < keep.size:
    report.note(
        f"filtering (min_user_count={min_user_count}, min_item_count="
        f"{min_item_count}, k_core={k_core}, rounds={rounds}) removed "
        f"{n_users0 - users_left.size} of {n_users0} users, "
        f"{n_items0 - items_left.size} of {n_items0} items and "
        f"{keep.size - n_kept} of {keep.size} interactions")
  if n_kept == 0:
    raise DataError(
        f"filtering left no interactions: {n_users0} users, {n_items0} items "
        f"read; min_user_count={min_user_count}, min_item_count="
        f"{min_item_count}, k_core={k_core}")

  # Chronological order: stable by timestamp, then stable by user.
  idx = np.nonzero(keep)[0]
  idx = idx[np.argsort(ts[idx], kind="stable")]
  # Users in order of first appearance in the source.
  first_row = np.full(n_users0, np.iinfo(np.int64).max, np.int64)
  np.minimum.at(first_row, user_c[keep], np.nonzero(keep)[0])
  user_order = users_left[np.argsort(first_row[users_left], kind="stable")]
  user_rank = np.full(n_users0, -1, np.int64)
  user_rank[user_order] = np.arange(user_order.size)
  idx = idx[np.argsort(user_rank[user_c[idx]], kind="stable")]

  # Item vocabulary: count desc, ties by string.
  ic = np.bincount(item_c[idx], minlength=n_items0)
  order_items = sorted(items_left.tolist(), key=lambda c: (-ic[c], item_strs[c]))
  item_vocab = Vocab.from_strings(item_strs[c] for c in order_items)
  item_map = np.zeros(n_items0, np.int32)
  item_map[np.asarray(order_items, np.int64)] = np.arange(
      2, 2 + len(order_items), dtype=np.int32)

  # Genre vocabulary over kept items: item count desc, ties by string.
  genre_count: collections.Counter = collections.Counter()
  for c in order_items:
    for g in dict.fromkeys(item_gen.get(c, ())):
      genre_count[g] += 1
  genre_vocab = Vocab.from_strings(
      sorted(genre_count, key=lambda g: (-genre_count[g], g)))
  longest = max((len(dict.fromkeys(item_gen.get(c, ()))) for c in order_items),
                default=0)
  g_width = max(1, longest) if max_genres is None else max_genres
  n_trunc = 0
  item_genres = np.zeros((item_vocab.size, g_width), np.int32)
  item_titles = [""] * item_vocab.size
  for c in order_items:
    vid = int(item_map[c])
    gs = list(dict.fromkeys(item_gen.get(c, ())))
    if len(gs) > g_width:
      n_trunc += 1
    for j, g in enumerate(gs[:g_width]):
      item_genres[vid, j] = genre_vocab.id(g)
    item_titles[vid] = item_title.get(c, "")
  if n_trunc:
    report.note(f"{n_trunc} items have more than max_genres={g_width} "
                "genres; kept the first ones in source order")

  # Ratings.
  r_kept = rating[idx]
  present = ~np.isnan(r_kept)
  values = np.unique(r_kept[present])
  rating_vocab = Vocab.from_strings(rating_token(v) for v in values)
  rating_N = np.full(idx.shape, OOV, np.int32)
  if values.size:
    rating_N[present] = (np.searchsorted(values, r_kept[present]) + 2).astype(
        np.int32)

  users_sorted = user_c[idx]
  counts = np.bincount(user_rank[users_sorted], minlength=user_order.size)
  offsets = np.zeros(user_order.size + 1, np.int64)
  np.cumsum(counts, out=offsets[1:])
  ts_N = ts[idx].copy()
  # Gaps over the flat array at once; each user's first item gets FIRST
  # (users are contiguous and chronological, so every other gap is >= 0).
  timegap_N = np.empty(idx.shape, np.int32)
  timegap_N[0] = TIMEGAP_FIRST
  if ts_N.size > 1:
    gap = np.maximum(np.diff(ts_N), 0)
    _, k = np.frexp(gap.astype(np.float64))
    k = np.where(gap > 0, k, 0).astype(np.int64)
    timegap_N[1:] = TIMEGAP_ZERO + np.minimum(k, NUM_GAP_LOG_BUCKETS)
  timegap_N[offsets[:-1]] = TIMEGAP_FIRST
  user_strs = list(user_code)
  return SequenceData(
      users=[user_strs[c] for c in user_order.tolist()],
      vocabs={"item": item_vocab, "genre": genre_vocab, "rating": rating_vocab,
              "timegap": timegap_vocab()},
      offsets=offsets,
      item_N=item_map[item_c[idx]],
      rating_N=rating_N,
      timestamp_N=ts_N,
      timegap_N=timegap_N,
      review_N=[reviews[k] for k in idx.tolist()] if any_review else None,
      item_titles=item_titles,
      item_genres=item_genres,
      stats={"users_read": n_users0, "items_read": n_items0,
             "interactions_read": int(keep.size), "filter_rounds": rounds,
             "items_with_truncated_genres": n_trunc},
  )


# ----------------------------------------------------------------------------
# Splits.


@dataclasses.dataclass(frozen=True)
class Window:
  """Items ``[start, stop)`` of user ``user``'s sequence.

  In ``valid``/``test`` splits the last item (``stop - 1``) is the held-out
  target and ``[start, stop - 1)`` its history; in ``train`` the whole window
  is training data.
  """

  user: int
  start: int
  stop: int

  @property
  def target(self) -> int:
    return self.stop - 1


@dataclasses.dataclass
class Split:
  name: str
  train: list[Window]
  valid: list[Window]
  test: list[Window]
  settings: dict
  users_qualified: int
  users_total: int

  def sizes(self) -> dict:
    return {"train": len(self.train), "valid": len(self.valid),
            "test": len(self.test), "users_qualified": self.users_qualified,
            "users_total": self.users_total, **self.settings}


def _lengths(seq) -> np.ndarray:
  if isinstance(seq, SequenceData):
    return seq.lengths()
  return np.asarray(seq, np.int64)


def _too_small(split: str, qualified: int, total: int, min_users: int,
               rule: str) -> DataError:
  return DataError(
      f"dataset too small for the {split} split: {qualified} of {total} users "
      f"qualified ({rule}); at least {min_users} required")


def leave_one_out(seq, *, min_users: int = 1) -> Split:
  """Leave-one-out with validation.

  For a user with ``T >= 3`` interactions: train = items ``[0, T-2)``,
  valid target = item ``T-2`` (history ``[0, T-2)``), test target = item
  ``T-1`` (history ``[0, T-1)``). Users with fewer than 3 interactions take no
  part. ``seq`` is a :class:`SequenceData` or an array of per-user lengths.
  """
  lengths = _lengths(seq)
  ok = np.nonzero(lengths >= 3)[0]
  if ok.size < min_users:
    raise _too_small("leave-one-out", int(ok.size), lengths.size, min_users,
                     ">= 3 interactions each")
  train, valid, test = [], [], []
  for u in ok.tolist():
    t = int(lengths[u])
    train.append(Window(u, 0, t - 2))
    valid.append(Window(u, 0, t - 1))
    test.append(Window(u, 0, t))
  return Split("leave_one_out", train, valid, test, {}, int(ok.size),
               int(lengths.size))


def userllm_windows(seq, window: int = 50, *, stride: Optional[int] = None,
                    min_users: int = 1) -> Split:
  """The User-LLM protocol: sliding windows of ``window`` items per user.

  Only users with ``T >= window + 2`` interactions qualify. Test = the last
  window ``[T-window, T)``, valid = the one before ``[T-window-1, T-1)``;
  train = windows ``[s, s+window)`` ending at or before ``T-2`` (so neither
  held-out target is ever inside a training window), stepping back from
  ``stop = T-2`` by ``stride`` (default ``window``) while ``start >= 0``.
  """
  if window < 2:
    raise ValueError(f"window must be >= 2; got {window}")
  stride = window if stride is None else stride
  if stride < 1:
    raise ValueError(f"stride must be >= 1; got {stride}")
  lengths = _lengths(seq)
  ok = np.nonzero(lengths >= window + 2)[0]
  if ok.size < min_users:
    raise _too_small(f"User-LLM (window={window})", int(ok.size),
                     lengths.size, min_users, f">= window+2 = {window + 2} "
                     "interactions each")
  train, valid, test = [], [], []
  for u in ok.tolist():
    t = int(lengths[u])
    stops = list(range(t - 2, window - 1, -stride))
    train.extend(Window(u, s - window, s) for s in reversed(stops))
    valid.append(Window(u, t - 1 - window, t - 1))
    test.append(Window(u, t - window, t))
  return Split("userllm", train, valid, test,
               {"window": window, "stride": stride}, int(ok.size),
               int(lengths.size))


def time_cutoff(seq: SequenceData, test_time: int, *,
                valid_time: Optional[int] = None, min_users: int = 1) -> Split:
  """A global time cut-off.

  Train = each user's interactions with ``timestamp < valid_time`` (or
  ``< test_time`` without ``valid_time``). Test: for every user with at least
  one interaction before ``test_time`` and one at or after it, the first
  interaction at or after ``test_time`` is the target and everything before it
  the history. Valid: the same with ``valid_time`` (targets before
  ``test_time``).
  """
  if valid_time is not None and valid_time > test_time:
    raise ValueError(f"valid_time ({valid_time}) must be <= test_time "
                     f"({test_time})")
  train_end = test_time if valid_time is None else valid_time
  train, valid, test = [], [], []
  qualified = 0
  for u in range(seq.num_users):
    a, b = int(seq.offsets[u]), int(seq.offsets[u + 1])
    ts = seq.timestamp_N[a:b]
    n_train = int(np.searchsorted(ts, train_end, side="left"))
    n_test = int(np.searchsorted(ts, test_time, side="left"))
    if n_train > 0:
      train.append(Window(u, 0, n_train))
    if valid_time is not None and 0 < n_train < n_test:
      valid.append(Window(u, 0, n_train + 1))
    if 0 < n_test < ts.size:
      test.append(Window(u, 0, n_test + 1))
      qualified += 1
  if qualified < min_users:
    raise _too_small(f"time cut-off (test_time={test_time})", qualified,
                     seq.num_users, min_users, "an interaction before and one "
                     "at/after the cut-off")
  return Split("time_cutoff", train, valid, test,
               {"test_time": int(test_time),
                "valid_time": None if valid_time is None else int(valid_time)},
               qualified, seq.num_users)


def split_by_name(seq, name: str, **kwargs) -> Split:
  """``name`` in {'leave_one_out', 'userllm', 'time_cutoff'}."""
  fns = {"leave_one_out": leave_one_out, "userllm": userllm_windows,
         "time_cutoff": time_cutoff}
  if name not in fns:
    raise ValueError(f"unknown split {name!r}; expected one of {sorted(fns)}")
  return fns[name](seq, **kwargs)
