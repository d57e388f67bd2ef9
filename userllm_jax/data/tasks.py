"""User-LLM downstream tasks: history window + prompt + target text; the text-prompt serializer.

Window protocol (User-LLM, arXiv 2402.13598, Sec. 4): an example is one
*cut* ``c`` in a user's chronological sequence; the history is the
``window`` events before it (``events[max(0, c - window) : c]``; 50 by
default, longer windows configurable), the target comes from event ``c``:

* ``next_item``: the title of item ``c`` (MovieLens titles, Amazon product
  titles, Google Local place names).
* ``fav_genre``: the user's favourite genre/category *in the history window*:
  the genre that occurs in most history events (each event counts each of its
  genres once).  Ties are broken by recency: among the tied genres, the one
  whose most recent occurrence is latest wins; if that is the same event, the
  genre listed first on that event wins.  (The target event ``c`` itself is
  not used; the task needs only the history.)
* ``review``: the user's review text of item ``c`` (Amazon, Google Local); the
  prompt names the item.

Users are split disjointly into stage-2 training and test users
(:func:`split_users`, seeded).  A test user gives one example per task: the
cut is the last event (so the encoder's leave-one-out training, which never
sees a user's last two events, never saw the test target).  A training user
gives examples at cuts ``T-1, T-1-stride, ...`` down to ``min_history``, at
most ``max_examples_per_user``.

The User-LLM prompt has *no* history (it reaches the LLM as embeddings); the
text-prompt (TP) baseline prepends the history rendered by
:func:`serialize_history`: one line per event, ``"Title (genre, genre), rated
R"``, newest last, cut from the oldest side to a token budget measured with
the real tokenizer, never cutting an item in half.

Tokenization for stage 2 (:func:`tokenize_example`): ``[BOS] + encode(prompt)
+ encode(target) + [EOS]`` right-padded to ``max_prompt_tokens +
max_target_tokens``; the loss mask covers the target tokens and EOS only.  A
prompt or target that does not fit raises :class:`ExampleTooLongError` naming
the user, task and lengths (never silently truncated), except for tasks the
caller names in ``truncate_tasks`` (free text such as reviews): their target
is cut to its first ``limit`` tokens *without* EOS (the text goes on, so the
model is not taught to stop there).  The target is encoded on its own, exactly
as :mod:`userllm_jax.eval.trie` encodes catalogue titles.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Collection, Iterable, Mapping, Optional, Protocol, Sequence

import numpy as np

TASKS = ("next_item", "fav_genre", "review")
# The history fields, spelled as the encoder reads them (data/pipeline.py, models/encoder.py)
# from the example to the batch: one example's arrays lack the batch axis (``item_BxT`` is
# ``[T]`` there) and batching stacks them into the shapes the names say.
HISTORY_KEYS = ("item_BxT", "genre_BxTxG", "rating_BxT", "timegap_BxT", "position_BxT",
                "segment_BxT", "length_B")

# Domain wording: (item noun, verb, genre noun).
DOMAINS = {
    "movielens": ("movie", "watch", "genre"),
    "amazon": ("product", "review", "category"),
    "google-local": ("place", "visit", "category"),
    "synthetic": ("item", "choose", "genre"),
}

PROMPT_TEMPLATES = {
    "next_item": "Which {noun} will the user {verb} next?\n",
    "fav_genre": "What is the user's favorite {genre_noun}?\n",
    "review": "Write the user's review of {title}.\n",
}
TP_HEADER = "The user's history:\n"


class TokenizerLike(Protocol):
  pad_id: int
  eos_id: int
  bos_id: int

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ...

  def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
    ...


class ExampleTooLongError(ValueError):
  """A prompt or target does not fit the configured token lengths."""


# ---------------------------------------------------------------------------
# Catalogue: titles, genres, rating strings.


@dataclasses.dataclass(frozen=True)
class Catalog:
  """What the text side needs about items: titles, genre ids, vocab strings.

  ``item_titles[i]`` and ``item_genres[i]`` (genre ids, 0 = pad) are indexed by
  item id; ``genre_names[g]`` / ``rating_names[r]`` by genre / rating vocab id.
  """
  item_titles: Sequence[str]
  item_genres: np.ndarray
  genre_names: Sequence[str]
  rating_names: Sequence[str]
  domain: str = "movielens"

  def __post_init__(self):
    if self.domain not in DOMAINS:
      raise ValueError(f"Catalog.domain: expected one of {sorted(DOMAINS)}, got {self.domain!r}")
    if len(self.item_titles) != len(self.item_genres):
      raise ValueError(f"Catalog: {len(self.item_titles)} titles but {len(self.item_genres)} "
                       "item_genres rows")

  @classmethod
  def from_dataset(cls, ds: Any, domain: str = "movielens") -> "Catalog":
    """From a ``records.PreparedDataset`` or ``sequences.SequenceData``."""
    titles = [t if t is not None else "" for t in ds.item_titles]
    return cls(item_titles=titles, item_genres=np.asarray(ds.item_genres),
               genre_names=list(ds.vocabs["genre"].tokens),
               rating_names=list(ds.vocabs["rating"].tokens), domain=domain)

  @property
  def num_items(self) -> int:
    return len(self.item_titles)

  def rating_text(self, rating_id: int) -> Optional[str]:
    """``'4'`` for a rating token ``'4.0'``; None for pad/OOV (ids 0, 1) or empty."""
    if rating_id < 2 or rating_id >= len(self.rating_names):
      return None
    s = str(self.rating_names[rating_id])
    try:
      f = float(s)
      return str(int(f)) if f == int(f) else f"{f:g}"
    except ValueError:
      return s or None

  def genres_text(self, genre_ids: Iterable[int]) -> tuple[str, ...]:
    return tuple(str(self.genre_names[g]) for g in genre_ids if g >= 2)

  @functools.cached_property
  def uninformative_genres(self) -> frozenset[int]:
    """Genre ids carried by every item that has any genre, e.g. the root of Amazon's
    category path ("Movies & TV" on every Movies & TV product).  Such a genre would be every
    user's favourite, so the favourite-genre task skips it.  Empty when fewer than two items
    have genres."""
    g = np.asarray(self.item_genres)
    if g.ndim == 1:
      g = g[:, None]
    has = (g >= 2).any(axis=1)
    if has.sum() < 2:
      return frozenset()
    common = None
    for row in g[has]:
      ids = {int(x) for x in row if x >= 2}
      common = ids if common is None else common & ids
      if not common:
        return frozenset()
    return frozenset(common)

  @property
  def favourite_genre_candidates(self) -> list[int]:
    """Genre ids the favourite-genre task can answer (all but :attr:`uninformative_genres`)."""
    skip = self.uninformative_genres
    return [g for g in range(2, len(self.genre_names)) if g not in skip]


# ---------------------------------------------------------------------------
# History windows (the encoder's inputs).


def history_window(record: Mapping[str, Any], cut: int, window: int) -> dict[str, np.ndarray]:
  """The ``window`` events before ``cut`` as left-aligned, padded encoder inputs.

  Returns :data:`HISTORY_KEYS`: ``item_BxT, genre_BxTxG, rating_BxT, timegap_BxT,
  position_BxT, segment_BxT`` (one example, so ``[T]`` / ``[T, G]``; all int32,
  ``T = window``; padding 0, ``segment`` 1 on real events) and ``length_B`` (a scalar).
  Time gaps (``data/sequences.py:timegap_ids``, the ids the encoder was
  pretrained on) are taken from the record's ``timegap`` or computed on the
  full sequence, so the first event of the window keeps its gap to the event
  before it.
  """
  item = np.asarray(record["item"])
  n = len(item)
  if not 0 < cut <= n:
    raise ValueError(f"history_window: cut={cut} outside (0, {n}]")
  start = max(0, cut - window)
  length = cut - start
  genre = np.asarray(record["genre"])
  if genre.ndim == 1:
    genre = genre[:, None]
  g = genre.shape[1]
  out = {
      "item_BxT": np.zeros((window,), np.int32),
      "genre_BxTxG": np.zeros((window, g), np.int32),
      "rating_BxT": np.zeros((window,), np.int32),
      "timegap_BxT": np.zeros((window,), np.int32),
      "position_BxT": np.zeros((window,), np.int32),
      "segment_BxT": np.zeros((window,), np.int32),
  }
  out["item_BxT"][:length] = item[start:cut]
  out["genre_BxTxG"][:length] = genre[start:cut]
  if "rating" in record and record["rating"] is not None:
    out["rating_BxT"][:length] = np.asarray(record["rating"])[start:cut]
  if record.get("timegap") is not None:
    out["timegap_BxT"][:length] = np.asarray(record["timegap"])[start:cut]
  elif record.get("timestamp") is not None:
    from userllm_jax.data import sequences  # pylint: disable=g-import-not-at-top
    out["timegap_BxT"][:length] = sequences.timegap_ids(
        np.asarray(record["timestamp"])[:cut])[start:cut]
  out["position_BxT"][:length] = np.arange(length)
  out["segment_BxT"][:length] = 1
  out["length_B"] = np.int32(length)
  return out


def favourite_genre(genre_TxG: np.ndarray, length: Optional[int] = None,
                    ignore: Collection[int] = ()) -> int:
  """Most frequent genre id (>= 2, not in ``ignore``) in the first ``length`` rows; ties ->
  most recent.

  Each row (event) counts each distinct genre once.  Among tied genres the one
  whose last occurrence has the highest row index wins; within that row, the
  genre listed first wins.  Returns 0 when there is no genre at all.
  """
  genre_TxG = np.asarray(genre_TxG)
  if genre_TxG.ndim == 1:
    genre_TxG = genre_TxG[:, None]
  if length is None:
    length = genre_TxG.shape[0]
  count: dict[int, int] = {}
  last: dict[int, tuple[int, int]] = {}  # genre -> (row, -column) of its last occurrence
  for t in range(length):
    seen = set()
    for j, gid in enumerate(genre_TxG[t].tolist()):
      if gid < 2 or gid in seen or gid in ignore:
        continue
      seen.add(gid)
      count[gid] = count.get(gid, 0) + 1
      last[gid] = (t, -j)
  if not count:
    return 0
  return max(count, key=lambda gid: (count[gid], last[gid]))


# ---------------------------------------------------------------------------
# Examples.


@dataclasses.dataclass
class Example:
  """One downstream example (text + the history the encoder reads)."""
  user_index: int
  task: str
  cut: int
  history: dict[str, np.ndarray]
  prompt: str
  target: str
  target_id: int  # item id (next_item), genre id (fav_genre), item id (review)
  # Optional soft target: a distribution over item ids (float, [num_items]) beside the
  # observed next item -- the stage-1 encoder's prediction (``stage2/distill.py``).
  teacher: Optional[np.ndarray] = None


def prompt_for(task: str, catalog: Catalog, *, title: str = "") -> str:
  noun, verb, genre_noun = DOMAINS[catalog.domain]
  if task not in PROMPT_TEMPLATES:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  return PROMPT_TEMPLATES[task].format(noun=noun, verb=verb, genre_noun=genre_noun, title=title)


def make_example(record: Mapping[str, Any], user_index: int, cut: int, task: str,
                 catalog: Catalog, *, window: int = 50) -> Optional[Example]:
  """The example of ``task`` at ``cut``; None when the task has no target there."""
  hist = history_window(record, cut, window)
  item_id = int(np.asarray(record["item"])[cut])
  if task == "next_item":
    title = catalog.item_titles[item_id] if item_id < catalog.num_items else ""
    if item_id < 2 or not title:
      return None
    return Example(user_index, task, cut, hist, prompt_for(task, catalog), title, item_id)
  if task == "fav_genre":
    gid = favourite_genre(hist["genre_BxTxG"], int(hist["length_B"]),
                          ignore=catalog.uninformative_genres)
    if gid < 2:
      return None
    return Example(user_index, task, cut, hist, prompt_for(task, catalog),
                   str(catalog.genre_names[gid]), gid)
  if task == "review":
    reviews = record.get("review")
    if reviews is None or cut >= len(reviews) or not reviews[cut]:
      return None
    title = catalog.item_titles[item_id] if item_id < catalog.num_items else ""
    if not title:
      return None
    return Example(user_index, task, cut, hist, prompt_for(task, catalog, title=title),
                   str(reviews[cut]), item_id)
  raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def split_users(num_users: int, num_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Disjoint (train_users, test_users) index arrays; the test set is a seeded random subset."""
  if not 0 < num_test < num_users:
    raise ValueError(f"split_users: num_test={num_test} must be in (0, {num_users})")
  perm = np.random.default_rng(seed).permutation(num_users)
  return np.sort(perm[num_test:]), np.sort(perm[:num_test])


def build_examples(dataset: Any, user_indices: Iterable[int], task: str, catalog: Catalog, *,
                   split: str, window: int = 50, min_history: int = 1, stride: int = 1,
                   max_examples_per_user: int = 1) -> list[Example]:
  """Examples for ``task`` from the users ``user_indices`` of ``dataset`` (``dataset[i]`` -> record).

  ``split='test'``: one example per user at the last event.  ``split='train'``:
  cuts ``T-1, T-1-stride, ...`` (at least ``min_history`` history events), at
  most ``max_examples_per_user``.  Users without a valid example are skipped.
  """
  if split not in ("train", "test"):
    raise ValueError(f"build_examples: split must be 'train' or 'test', got {split!r}")
  if min_history < 1 or stride < 1 or window < 1:
    raise ValueError(f"build_examples: window={window}, min_history={min_history}, "
                     f"stride={stride} must all be >= 1")
  out = []
  for u in user_indices:
    rec = dataset[int(u)]
    n = len(rec["item"])
    if n <= min_history:
      continue
    cuts = [n - 1] if split == "test" else list(range(n - 1, min_history - 1, -stride))
    taken = 0
    for c in cuts:
      if taken >= (1 if split == "test" else max_examples_per_user):
        break
      ex = make_example(rec, int(u), c, task, catalog, window=window)
      if ex is not None:
        out.append(ex)
        taken += 1
  return out


# ---------------------------------------------------------------------------
# The text-prompt (TP) baseline's history serializer.


@dataclasses.dataclass(frozen=True)
class HistoryItem:
  title: str
  genres: tuple[str, ...] = ()
  rating: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class SerializedHistory:
  text: str
  num_items: int
  num_tokens: int


def format_history_line(item: HistoryItem) -> str:
  """``"Title (g1, g2), rated R"``; the genre / rating parts are omitted when absent."""
  line = item.title
  if item.genres:
    line += " (" + ", ".join(item.genres) + ")"
  if item.rating is not None:
    line += f", rated {item.rating}"
  return line


def serialize_history(items: Sequence[HistoryItem], tokenizer: TokenizerLike,
                      budget_tokens: int) -> SerializedHistory:
  """The newest items (``items`` oldest first) whose lines fit ``budget_tokens`` tokens.

  Lines are joined with ``"\\n"`` (no trailing newline); the count is
  ``len(tokenizer.encode(text))`` of the joined text.  Items are dropped from
  the oldest side, whole: the result is the longest suffix that fits (the
  newest item alone not fitting gives an empty text).
  """
  if budget_tokens < 0:
    raise ValueError(f"serialize_history: budget_tokens must be >= 0, got {budget_tokens}")
  lines = [format_history_line(it) for it in items]

  def count(k):  # tokens of the newest k lines
    return len(tokenizer.encode("\n".join(lines[len(lines) - k:]))) if k else 0

  # Token counts of suffixes grow with k (BPE merges never cross '\n' much,
  # but we only rely on the check below): binary search, then verify.
  lo, hi = 0, len(lines)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if count(mid) <= budget_tokens:
      lo = mid
    else:
      hi = mid - 1
  k = lo
  while k > 0 and count(k) > budget_tokens:
    k -= 1
  text = "\n".join(lines[len(lines) - k:]) if k else ""
  return SerializedHistory(text=text, num_items=k, num_tokens=count(k))


def history_items(example: Example, catalog: Catalog) -> list[HistoryItem]:
  """The example's history window as :class:`HistoryItem` rows, oldest first."""
  h = example.history
  out = []
  for t in range(int(h["length_B"])):
    iid = int(h["item_BxT"][t])
    title = catalog.item_titles[iid] if iid < catalog.num_items and catalog.item_titles[iid] else (
        f"item {iid}")
    out.append(HistoryItem(title=title, genres=catalog.genres_text(h["genre_BxTxG"][t].tolist()),
                           rating=catalog.rating_text(int(h["rating_BxT"][t]))))
  return out


def tp_prompt(example: Example, catalog: Catalog, tokenizer: TokenizerLike,
              budget_tokens: int) -> tuple[str, SerializedHistory]:
  """The TP baseline's prompt: history header + serialized history + the task prompt."""
  ser = serialize_history(history_items(example, catalog), tokenizer, budget_tokens)
  return f"{TP_HEADER}{ser.text}\n{example.prompt}", ser


# ---------------------------------------------------------------------------
# Tokenization and the Grain pipeline for stage 2.


def encode_prompt(prompt: str, tokenizer: TokenizerLike, max_prompt_tokens: int, *,
                  where: str = "") -> list[int]:
  """``[BOS] + encode(prompt)``; raises :class:`ExampleTooLongError` when it exceeds the limit."""
  ids = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
  if len(ids) > max_prompt_tokens:
    raise ExampleTooLongError(
        f"{where}prompt has {len(ids)} tokens (with BOS), max_prompt_tokens={max_prompt_tokens}; "
        "raise the limit or lower the TP history budget")
  return ids


def encode_target(target: str, tokenizer: TokenizerLike, max_target_tokens: int, *,
                  where: str = "", truncate: bool = False) -> list[int]:
  """``encode(target) + [EOS]``; raises :class:`ExampleTooLongError` when it exceeds the limit.

  ``truncate=True``: a target that does not fit is cut to its first
  ``max_target_tokens`` tokens, without EOS (the text goes on).
  """
  ids = list(tokenizer.encode(target)) + [tokenizer.eos_id]
  if len(ids) > max_target_tokens:
    if truncate:
      return ids[:max_target_tokens]
    raise ExampleTooLongError(
        f"{where}target has {len(ids)} tokens (with EOS), max_target_tokens={max_target_tokens}: "
        f"{target[:60]!r}")
  return ids


def _where(example: Example) -> str:
  """The prefix naming an example in error messages."""
  return f"user {example.user_index} task {example.task} cut {example.cut}: "


# ``answer_cut(task, target_ids) -> (kept_ids, node_ids)``: a closed-answer task's target cut
# to the tokens that decide it, with the answer-trie node before each kept token
# (``stage2/loss.AnswerTries.cut``).
AnswerCut = Callable[[str, list], tuple[list, list]]


def tokenize_example(example: Example, prompt: str, tokenizer: TokenizerLike, *,
                     max_prompt_tokens: int, max_target_tokens: int,
                     target_limit: Optional[int] = None,
                     truncate_target: bool = False,
                     answer_cut: Optional[AnswerCut] = None) -> dict[str, np.ndarray]:
  """Training features for one example (``L = max_prompt_tokens + max_target_tokens``).

  The target (+ EOS) must fit ``target_limit`` (default ``max_target_tokens``,
  at most that); ``truncate_target``: cut to it instead (see :func:`encode_target`).
  ``answer_cut``: the whole target must fit ``target_limit`` (which may then exceed
  ``max_target_tokens``), and is then cut to its deciding tokens (no EOS after them) and
  ``answer_node_BxN`` (``[max_target_tokens]``, -1 past the target) holds each kept
  token's answer-trie node.

  Keys carry the batched shapes (one example has no batch axis):
  ``tokens_BxL``: ``[BOS] prompt target [EOS]`` then PAD; ``targets_BxL``:
  tokens shifted left by one (the next token); ``loss_mask_BxL``: 1 where
  ``targets_BxL`` is a target or EOS token; ``input_mask_BxL``: 1 on non-pad
  tokens; ``prompt_len_B``; plus :func:`history_features` (``item_BxT`` ...); plus
  ``teacher_BxI`` when the example carries a soft target (``Example.teacher``).
  """
  where = _where(example)
  limit = max_target_tokens if target_limit is None else int(target_limit)
  if limit <= 0 or (limit > max_target_tokens and answer_cut is None):
    raise ValueError(f"{where}target_limit={target_limit} must be in [1, max_target_tokens="
                     f"{max_target_tokens}]")
  p = encode_prompt(prompt, tokenizer, max_prompt_tokens, where=where)
  t = encode_target(example.target, tokenizer, limit, where=where, truncate=truncate_target)
  nodes = None
  if answer_cut is not None:
    try:
      t, nodes = answer_cut(example.task, t)
    except ValueError as e:
      raise ValueError(f"{where}{e}") from None
    if len(t) > max_target_tokens:
      raise ExampleTooLongError(f"{where}target's deciding tokens: {len(t)} > "
                                f"max_target_tokens={max_target_tokens}")
  seq = p + t
  length = max_prompt_tokens + max_target_tokens
  tokens = np.full((length,), tokenizer.pad_id, np.int32)
  tokens[:len(seq)] = seq
  targets = np.full((length,), tokenizer.pad_id, np.int32)
  targets[:len(seq) - 1] = seq[1:]
  loss_mask = np.zeros((length,), np.int32)
  loss_mask[len(p) - 1:len(seq) - 1] = 1  # predicting target[0] from the last prompt token ...
  input_mask = np.zeros((length,), np.int32)
  input_mask[:len(seq)] = 1
  out = {"tokens_BxL": tokens, "targets_BxL": targets, "loss_mask_BxL": loss_mask,
         "input_mask_BxL": input_mask, "prompt_len_B": np.int32(len(p))}
  if nodes is not None:
    node_row = np.full((max_target_tokens,), -1, np.int32)
    node_row[:len(nodes)] = nodes
    out["answer_node_BxN"] = node_row
  if example.teacher is not None:
    out["teacher_BxI"] = np.asarray(example.teacher, np.float32)
  out.update(history_features(example))
  return out


def history_features(example: Example) -> dict[str, np.ndarray]:
  """The encoder inputs of one example under their *batch* names (``item_BxT`` ...).

  Per example the arrays lack the batch axis; batching (Grain, or
  :func:`prompt_batch`) stacks them into the shapes the names say.
  """
  h = example.history
  out = {k: np.asarray(h[k], np.int32) for k in HISTORY_KEYS}
  out["target_id_B"] = np.int32(example.target_id)
  out["user_index_B"] = np.int32(example.user_index)
  return out


def prompt_batch(examples: Sequence[Example], prompts: Sequence[str], tokenizer: TokenizerLike, *,
                 max_prompt_tokens: int) -> dict[str, np.ndarray]:
  """Evaluation inputs: right-padded ``[BOS] prompt`` tokens ``[B, P]`` + lengths + histories."""
  rows = [encode_prompt(p, tokenizer, max_prompt_tokens,
                        where=f"user {e.user_index} task {e.task}: ")
          for e, p in zip(examples, prompts)]
  tokens = np.full((len(rows), max_prompt_tokens), tokenizer.pad_id, np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  feats = [history_features(e) for e in examples]
  out = {k: np.stack([f[k] for f in feats]) for k in feats[0]}
  out["prompt_tokens_BxP"] = tokens
  out["prompt_len_B"] = np.asarray([len(r) for r in rows], np.int32)
  return out


def stage2_dataset(examples: Sequence[Example], prompts: Sequence[str], tokenizer: TokenizerLike, *,
                   max_prompt_tokens: int, max_target_tokens: int, batch_size: int, seed: int,
                   num_epochs: Optional[int] = None, drop_remainder: bool = True,
                   task_target_tokens: Optional[Mapping[str, int]] = None,
                   truncate_tasks: Collection[str] = (), batch_by_task: bool = False,
                   answer_cut: Optional[AnswerCut] = None,
                   batch_fn: Optional[Callable[[dict], dict]] = None):
  """A Grain ``MapDataset`` of stage-2 training batches (seeded shuffle, repeated, batched).

  All examples are tokenized up front, so a too-long example raises here, not
  in the middle of training.  Use ``iter(ds)`` or ``ds.to_iter_dataset()``.
  ``max_target_tokens`` is the padded target length; ``task_target_tokens``
  (task -> limit <= it) sets a smaller limit per task; targets of
  ``truncate_tasks`` are cut to their limit instead of raising.

  ``batch_by_task``: every batch holds one task's examples, padded only to the longest
  target *of that task* (a favourite-genre batch is ~20 tokens long, a next-item batch ~45):
  the tasks' batch streams are mixed in proportion to their example counts (``L`` then
  differs between batches: one compiled step per task).

  ``answer_cut``: targets cut to their deciding tokens (:func:`tokenize_example`; the
  padded target length is then the longest *cut* target); ``batch_fn(batch) -> batch``:
  applied to every batch (e.g. ``AnswerTries.add_allowed``).
  """
  import grain  # pylint: disable=g-import-not-at-top
  if len(examples) != len(prompts):
    raise ValueError(f"stage2_dataset: {len(examples)} examples but {len(prompts)} prompts")
  if not examples:
    raise ValueError("stage2_dataset: no examples")
  limits = dict(task_target_tokens or {})

  def tokenize(pairs, target_len):
    # With answer_cut the whole target must fit its task's limit, the cut one the padding.
    return [tokenize_example(e, p, tokenizer, max_prompt_tokens=max_prompt_tokens,
                             max_target_tokens=target_len,
                             target_limit=(limits.get(e.task, max_target_tokens)
                                           if answer_cut is not None else
                                           min(limits.get(e.task, target_len), target_len)),
                             truncate_target=e.task in truncate_tasks,
                             answer_cut=answer_cut)
            for e, p in pairs]

  def batches(feats, task_seed):
    ds = grain.MapDataset.source(feats).shuffle(seed=task_seed).repeat(num_epochs)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds if batch_fn is None else ds.map(batch_fn)

  def target_tokens(e):
    ids = list(tokenizer.encode(e.target)) + [tokenizer.eos_id]
    if answer_cut is None:
      return len(ids)
    try:
      return len(answer_cut(e.task, ids)[0])
    except ValueError as err:
      raise ValueError(f"{_where(e)}{err}") from None

  pairs = list(zip(examples, prompts))
  groups: dict[str, set] = {}
  for e, _ in pairs:
    groups.setdefault(e.task if batch_by_task else "", set()).add(e.teacher is None)
  for task, kinds in groups.items():
    if len(kinds) > 1:
      raise ValueError(f"stage2_dataset: {'task ' + repr(task) if task else 'the examples'} "
                       "mix examples with and without a soft target (Example.teacher): a "
                       "batch must have it on every row or on none")
  if not batch_by_task:
    return batches(tokenize(pairs, max_target_tokens), seed)
  by_task: dict[str, list] = {}
  for e, p in pairs:
    by_task.setdefault(e.task, []).append((e, p))
  streams, weights = [], []
  for i, (task, task_pairs) in enumerate(sorted(by_task.items())):
    limit = min(limits.get(task, max_target_tokens), max_target_tokens)
    longest = max(target_tokens(e) for e, _ in task_pairs)
    streams.append(batches(tokenize(task_pairs, min(limit, longest)), seed + 1000 * i))
    weights.append(len(task_pairs))
  if len(streams) == 1:
    return streams[0]
  return grain.MapDataset.mix(streams, weights)


# ---------------------------------------------------------------------------
# A word-level stand-in tokenizer (tests and tiny runs).


class WordTokenizer:
  """A reversible word-level tokenizer with the Gemma tokenizer's interface.

  Pieces are ``" ?\\w+"``, ``" ?[^\\w\\s]"`` and single whitespace characters,
  so ``decode(encode(s)) == s`` for text made of known pieces.  Ids: pad 0,
  eos 1, bos 2, unk 3, then the pieces of the corpus in first-seen order.
  """
  pad_id, eos_id, bos_id, unk_id = 0, 1, 2, 3
  _PIECE_RE = re.compile(r" ?\w+| ?[^\w\s]|\s")

  def __init__(self, corpus: Iterable[str], min_size: int = 0):
    self.pieces = ["<pad>", "<eos>", "<bos>", "<unk>"]
    self._ids: dict[str, int] = {}
    for text in corpus:
      for p in self._PIECE_RE.findall(text):
        if p not in self._ids:
          self._ids[p] = len(self.pieces)
          self.pieces.append(p)
    while len(self.pieces) < min_size:
      self.pieces.append(f"<unused{len(self.pieces)}>")

  @property
  def vocab_size(self) -> int:
    return len(self.pieces)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = [self._ids.get(p, self.unk_id) for p in self._PIECE_RE.findall(text)]
    return [self.bos_id] + ids if add_bos else ids

  def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
    """Text up to EOS; pad and BOS dropped (``skip_special`` is accepted for the same call
    as ``weights.Tokenizer``: this tokenizer has no other control tokens)."""
    del skip_special
    out = []
    for i in ids:
      i = int(i)
      if i in (self.pad_id, self.bos_id):
        continue
      if i == self.eos_id:
        break
      out.append(self.pieces[i] if 0 <= i < len(self.pieces) else "<unk>")
    return "".join(out)


def num_prompt_tokens(prompt: str, tokenizer: TokenizerLike) -> int:
  """Tokens the LLM reads for ``prompt`` (BOS included)."""
  return 1 + len(tokenizer.encode(prompt))

