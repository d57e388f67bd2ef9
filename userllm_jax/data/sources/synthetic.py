"""Synthetic interaction data with planted, learnable structure.

The generative story (all numpy, vectorised; deterministic given ``seed``):

* every item has 1-3 distinct genres; its *primary* genre is assigned
  round-robin over a permutation so every genre has items;
* every user has 1-2 favourite genres (the planted truth, exposed as
  :attr:`SyntheticData.favourite_genres`);
* every item has ``num_successors`` successor items drawn from items with the
  same primary genre (the item-to-item Markov structure,
  :attr:`SyntheticData.successors`);
* a sequence starts with a preference draw; each next item is, with
  probability ``p_markov``, a uniformly chosen successor of the current item,
  otherwise a preference draw: with probability ``p_favourite`` an item of
  one of the user's favourite genres (uniform over the genre's items), else
  a uniformly random item;
* ratings are ``round(base + favourite_bonus * [item has a favourite genre]
  + N(0, rating_noise))`` clipped to 1..5, so favourites rate higher;
* timestamps start at a random second in ``[start_time, start_time +
  start_spread)`` and increase by exponential gaps (mean ``mean_gap_s``);
  with probability ``p_tie`` a gap is 0 (equal timestamps, as in MovieLens).

Next-item prediction (via the successors) and the favourite genre (via the
preference draws) are therefore both learnable.  Users are generated in
order of decreasing length so that the per-step loop touches only the
users still active; long histories (10,000 items per user) cost O(total
interactions) numpy work.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import numpy as np

from userllm_jax.data.schema import Interaction, ReadReport

GENRE_NAMES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
    "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
_ADJECTIVES = (
    "Silent", "Crimson", "Hidden", "Golden", "Broken", "Distant", "Electric",
    "Frozen", "Wild", "Last", "Midnight", "Secret", "Burning", "Lonely",
    "Hollow", "Bright", "Iron", "Paper", "Velvet", "Restless")
_NOUNS = (
    "Harbor", "Garden", "Empire", "River", "Promise", "Signal", "Mirror",
    "Horizon", "Kingdom", "Letter", "Voyage", "Orchard", "Machine", "Storm",
    "Island", "Parade", "Circuit", "Lantern", "Frontier", "Echo")


@dataclasses.dataclass
class SyntheticData:
  """Generated interactions in CSR layout plus the planted truth.

  Per-user interactions ``u`` are ``items[offsets[u]:offsets[u+1]]`` (and
  the same slice of ``ratings``/``timestamps``), in chronological order.
  """

  genre_names: list[str]
  item_titles: list[str]
  item_genres: np.ndarray       # [num_items, 3] int32 genre ids, -1 padded
  favourite_genres: np.ndarray  # [num_users, 2] int32 genre ids, -1 padded
  successors: np.ndarray        # [num_items, num_successors] int32
  offsets: np.ndarray           # [num_users + 1] int64
  items: np.ndarray             # [N] int32
  ratings: np.ndarray           # [N] float32
  timestamps: np.ndarray        # [N] int64
  with_reviews: bool = True

  @property
  def num_users(self) -> int:
    return len(self.offsets) - 1

  @property
  def num_items(self) -> int:
    return len(self.item_titles)

  @property
  def num_interactions(self) -> int:
    return int(self.offsets[-1])

  @staticmethod
  def user_id(u: int) -> str:
    return f"u{u}"

  @staticmethod
  def item_id(i: int) -> str:
    return f"i{i}"

  def item_genre_names(self, i: int) -> tuple[str, ...]:
    return tuple(self.genre_names[g] for g in self.item_genres[i] if g >= 0)

  def favourite_genre_names(self, u: int) -> tuple[str, ...]:
    return tuple(self.genre_names[g] for g in self.favourite_genres[u]
                 if g >= 0)

  def user_slice(self, u: int) -> slice:
    return slice(int(self.offsets[u]), int(self.offsets[u + 1]))

  def interactions(self, report: Optional[ReadReport] = None
                   ) -> Iterator[Interaction]:
    """Interaction rows, user by user, chronological within a user."""
    genres = [self.item_genre_names(i) for i in range(self.num_items)]
    ids = [self.item_id(i) for i in range(self.num_items)]
    titles = self.item_titles
    is_fav = self.favourite_rows()
    reviews: dict[tuple[int, float, bool], str] = {}
    for u in range(self.num_users):
      user = self.user_id(u)
      sl = self.user_slice(u)
      for i, r, t, f in zip(self.items[sl].tolist(),
                            self.ratings[sl].tolist(),
                            self.timestamps[sl].tolist(),
                            is_fav[sl].tolist()):
        review = None
        if self.with_reviews:
          review = reviews.get((i, r, f))
          if review is None:
            review = reviews[(i, r, f)] = _review(titles[i], genres[i], r, f)
        if report is not None:
          report.ok()
        yield Interaction(user, ids[i], t, r, titles[i], genres[i], review)

  def favourite_rows(self) -> np.ndarray:
    """[N] bool: the row's item has one of its user's favourite genres."""
    n_genres = len(self.genre_names)
    fav_mask = np.zeros((self.num_users, n_genres + 1), dtype=bool)
    rows = np.repeat(np.arange(self.num_users), 2)
    fav_mask[rows, self.favourite_genres.ravel()] = True  # -1 -> spare col.
    fav_mask[:, -1] = False
    user_of_row = np.repeat(np.arange(self.num_users), np.diff(self.offsets))
    return fav_mask[user_of_row[:, None], self.item_genres[self.items]].any(
        axis=1)


def _review(title: str, genres: tuple[str, ...], rating: float,
            favourite: bool) -> str:
  genre = genres[0].lower() if genres else "film"
  if rating >= 4:
    return f"Loved {title}. Exactly the kind of {genre} I enjoy."
  if rating >= 3:
    return f"{title} was fine, a decent {genre}."
  extra = "" if favourite else f" {genre.capitalize()} is not my thing."
  return f"{title} did not work for me.{extra}"


def _genre_names(num_genres: int) -> list[str]:
  names = list(GENRE_NAMES[:num_genres])
  names += [f"Genre {k}" for k in range(len(names), num_genres)]
  return names


def generate_synthetic(num_users: int = 1000, num_items: int = 500,
                       num_genres: int = 12, mean_length: float = 50.0,
                       seed: int = 0, *, min_length: int = 5,
                       max_length: Optional[int] = None,
                       num_successors: int = 3, p_markov: float = 0.5,
                       p_favourite: float = 0.8, p_tie: float = 0.1,
                       rating_base: float = 2.8, favourite_bonus: float = 1.5,
                       rating_noise: float = 0.7,
                       start_time: int = 946_684_800,  # 2000-01-01 UTC
                       start_spread: int = 365 * 86400,
                       mean_gap_s: float = 86400.0,
                       with_reviews: bool = True) -> SyntheticData:
  """Generates a dataset; see the module docstring for the process.

  Lengths are ``min_length + Poisson(mean_length - min_length)``, capped at
  ``max_length`` when given.
  """
  if num_genres < 2:
    raise ValueError(f"num_genres must be >= 2, got {num_genres}")
  if num_items < num_genres:
    raise ValueError(f"num_items ({num_items}) must be >= num_genres "
                     f"({num_genres}) so every genre has an item")
  if num_users < 1:
    raise ValueError(f"num_users must be >= 1, got {num_users}")
  if not 1 <= min_length <= mean_length:
    raise ValueError(f"need 1 <= min_length ({min_length}) <= mean_length "
                     f"({mean_length})")
  if max_length is not None and max_length < min_length:
    raise ValueError(f"max_length ({max_length}) must be >= min_length "
                     f"({min_length})")
  for name, p in (("p_markov", p_markov), ("p_favourite", p_favourite),
                  ("p_tie", p_tie)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {p}")
  if num_successors < 1:
    raise ValueError(f"num_successors must be >= 1, got {num_successors}")
  rng = np.random.default_rng(seed)
  n_items, n_genres, n_users = num_items, num_genres, num_users

  # Items: primary genre round-robin over a permutation, 0-2 more distinct.
  primary = rng.permutation(n_items) % n_genres
  scores = rng.random((n_items, n_genres))
  scores[np.arange(n_items), primary] = -1.0
  order = np.argsort(scores, axis=1)[:, :3].astype(np.int32)
  n_item_genres = rng.choice(3, size=n_items, p=[0.5, 0.3, 0.2]) + 1
  item_genres = np.where(np.arange(3)[None, :] < n_item_genres[:, None],
                         order, -1).astype(np.int32)

  # genre -> items (any position), CSR.
  flat_items = np.repeat(np.arange(n_items), 3)[item_genres.ravel() >= 0]
  flat_genres = item_genres.ravel()[item_genres.ravel() >= 0]
  by_genre = np.argsort(flat_genres, kind="stable")
  genre_items = flat_items[by_genre].astype(np.int32)
  genre_count = np.bincount(flat_genres, minlength=n_genres)
  genre_ptr = np.concatenate([[0], np.cumsum(genre_count)[:-1]])

  # Successors: same primary genre.
  prim_order = np.argsort(primary, kind="stable")
  prim_count = np.bincount(primary, minlength=n_genres)
  prim_ptr = np.concatenate([[0], np.cumsum(prim_count)[:-1]])
  pick = (rng.random((n_items, num_successors))
          * prim_count[primary][:, None]).astype(np.int64)
  successors = prim_order[prim_ptr[primary][:, None] + pick].astype(np.int32)

  # Users: 1-2 favourite genres.
  n_fav = rng.integers(1, 3, size=n_users)
  fav_order = np.argsort(rng.random((n_users, n_genres)), axis=1)[:, :2]
  favourite_genres = np.where(np.arange(2)[None, :] < n_fav[:, None],
                              fav_order, -1).astype(np.int32)

  lengths = min_length + rng.poisson(mean_length - min_length, size=n_users)
  if max_length is not None:
    lengths = np.minimum(lengths, max_length)
  lengths = lengths.astype(np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  total = int(offsets[-1])

  # Sequences: users sorted by decreasing length; step t touches the prefix
  # of users still active.
  by_len = np.argsort(-lengths, kind="stable")
  sorted_len = lengths[by_len]
  items = np.empty(total, dtype=np.int32)
  current = np.zeros(n_users, dtype=np.int32)
  fav_sorted = favourite_genres[by_len]
  nfav_sorted = n_fav[by_len]
  base_sorted = offsets[by_len]

  def preference_draw(n: int) -> np.ndarray:
    u = np.arange(n)
    use_fav = rng.random(n) < p_favourite
    g = fav_sorted[u, (rng.random(n) * nfav_sorted[u]).astype(np.int64)]
    pos = genre_ptr[g] + (rng.random(n) * genre_count[g]).astype(np.int64)
    return np.where(use_fav, genre_items[pos],
                    rng.integers(0, n_items, size=n)).astype(np.int32)

  max_len = int(sorted_len[0]) if n_users else 0
  active = n_users
  for t in range(max_len):
    while active and sorted_len[active - 1] <= t:
      active -= 1
    if t == 0:
      nxt = preference_draw(active)
    else:
      cur = current[:active]
      follow = rng.random(active) < p_markov
      succ = successors[cur, rng.integers(0, num_successors, size=active)]
      nxt = np.where(follow, succ, preference_draw(active))
    current[:active] = nxt
    items[base_sorted[:active] + t] = nxt

  # Ratings: higher when the item has one of the user's favourite genres.
  user_of_row = np.repeat(np.arange(n_users), lengths)
  fav_mask = np.zeros((n_users, n_genres + 1), dtype=bool)
  fav_mask[np.repeat(np.arange(n_users), 2), favourite_genres.ravel()] = True
  fav_mask[:, -1] = False  # The -1 padding lands in this spare column.
  is_fav = fav_mask[user_of_row[:, None], item_genres[items]].any(axis=1)
  raw = rating_base + favourite_bonus * is_fav + rng.normal(
      0.0, rating_noise, size=total)
  ratings = np.clip(np.rint(raw), 1, 5).astype(np.float32)

  # Timestamps: per-user start + cumulative gaps (first gap 0), some ties.
  gaps = np.ceil(rng.exponential(mean_gap_s, size=total)).astype(np.int64)
  gaps[rng.random(total) < p_tie] = 0
  gaps[offsets[:-1]] = 0  # Every user has >= 1 interaction.
  csum = np.cumsum(gaps)
  seg_start = np.repeat(csum[offsets[:-1]], lengths)
  start = start_time + rng.integers(0, max(1, start_spread), size=n_users)
  timestamps = (np.repeat(start, lengths) + csum - seg_start).astype(np.int64)

  names = _genre_names(n_genres)
  titles = [f"{_ADJECTIVES[i % len(_ADJECTIVES)]} "
            f"{_NOUNS[(i // len(_ADJECTIVES)) % len(_NOUNS)]} {i}"
            for i in range(n_items)]
  return SyntheticData(genre_names=names, item_titles=titles,
                       item_genres=item_genres,
                       favourite_genres=favourite_genres,
                       successors=successors, offsets=offsets, items=items,
                       ratings=ratings, timestamps=timestamps,
                       with_reviews=with_reviews)


def read_synthetic(*, report: ReadReport, **kwargs) -> Iterator[Interaction]:
  """``read_dataset('synthetic', ...)``: kwargs go to generate_synthetic."""
  data = generate_synthetic(**kwargs)
  yield from data.interactions(report)
