"""Text-quality metrics for the User-LLM tasks: title matching, Recall@K, accuracy, ROUGE-L.

Title normalisation (:func:`normalize_title`) decides when a generated title
"is" the target item.  The rules, in order:

1. Unicode NFKC, then ``casefold()`` (case-insensitive, also for non-ASCII).
2. Year: only a final ``(YYYY)`` group (exactly four digits) counts as the
   year and is split off; other parenthesised groups (alternative titles such
   as ``"Seven (Se7en) (1995)"``) stay part of the title.  With
   ``drop_year=False`` (the default) it is kept and re-attached at the end as
   `` yyyy``, so ``"Hamlet (1996)"`` and ``"Hamlet (1990)"`` stay different
   items, as in the catalogue; with ``drop_year=True`` it is removed, so a
   generation without a year still matches.
3. Trailing articles: MovieLens writes ``"Shawshank Redemption, The"`` and
   ``"City of Lost Children, The (Cité des enfants perdus, La)"``.  An article
   after the last comma of the main title (before any parenthesised
   alternative title) is moved to the front: English ``the/a/an`` and the
   common foreign ones (``la, le, les, l', il, el, los, las, der, die, das,
   den, det``).  Leading articles are then dropped altogether, so
   ``"The Shawshank Redemption"``, ``"Shawshank Redemption, The"`` and
   ``"Shawshank Redemption"`` all normalise to ``"shawshank redemption"``.
4. Punctuation: every character that is not a letter or digit becomes a space;
   apostrophes inside words are removed (``"children's"`` -> ``"childrens"``);
   runs of whitespace collapse to one space; ends are stripped.

ROUGE-L uses Google's ``rouge-score`` package (its tokenizer lowercases and
keeps ``[a-z0-9]+`` tokens; no stemming by default) and reports the mean
precision / recall / F-measure over examples.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Optional, Sequence

ARTICLES = ("the", "a", "an", "la", "le", "les", "l'", "il", "el", "los", "las",
            "der", "die", "das", "den", "det")

_YEAR_RE = re.compile(r"\s*\((\d{4})\)\s*$")
# Main title, ", ARTICLE", optional trailing parenthesised alternative titles.
_TRAILING_ARTICLE_RE = re.compile(
    r"^(?P<main>.*?),\s*(?P<art>" + "|".join(re.escape(a) for a in ARTICLES) +
    r")(?P<alt>(\s*\([^()]*\))*)\s*$")
_LEADING_ARTICLE_RE = re.compile(
    r"^(?:" + "|".join(re.escape(a) for a in ARTICLES if not a.endswith("'")) +
    r")\s+|^l'\s*")
_APOSTROPHE_RE = re.compile(r"(?<=\w)['’](?=\w)")
_NON_ALNUM_RE = re.compile(r"[^\w]|_")
_SPACES_RE = re.compile(r"\s+")


def normalize_title(title: str, *, drop_year: bool = False) -> str:
  """Canonical form of an item title for matching (rules in the module docstring)."""
  if not isinstance(title, str):
    raise TypeError(f"normalize_title: expected str, got {type(title).__name__}")
  text = unicodedata.normalize("NFKC", title).casefold().strip()
  year = None
  m = _YEAR_RE.search(text)
  if m:
    year = m.group(1)
    text = text[:m.start()].strip()
  m = _TRAILING_ARTICLE_RE.match(text)
  if m:
    art = m.group("art")
    sep = "" if art.endswith("'") else " "
    text = f"{art}{sep}{m.group('main')}{m.group('alt')}"
  text = _LEADING_ARTICLE_RE.sub("", text)
  text = _APOSTROPHE_RE.sub("", text)
  text = _NON_ALNUM_RE.sub(" ", text)
  text = _SPACES_RE.sub(" ", text).strip()
  if year is not None and not drop_year:
    text = f"{text} {year}".strip()
  return text


def _check_lengths(name: str, a: Sequence, b: Sequence) -> None:
  if len(a) != len(b):
    raise ValueError(f"{name}: {len(a)} predictions but {len(b)} targets")
  if not a:
    raise ValueError(f"{name}: no examples")


def hits_at_k(candidates: Sequence[Sequence[str]], targets: Sequence[str], k: int, *,
              normalize: bool = True, drop_year: bool = False) -> list[bool]:
  """Per example: is the target among the first ``k`` candidates (best first)?"""
  _check_lengths("hits_at_k", candidates, targets)
  if k < 1:
    raise ValueError(f"hits_at_k: k must be >= 1, got {k}")
  out = []
  for cands, target in zip(candidates, targets):
    if isinstance(cands, str):
      raise TypeError("hits_at_k: each example's candidates must be a list of strings, got a str")
    if normalize:
      t = normalize_title(target, drop_year=drop_year)
      top = {normalize_title(c, drop_year=drop_year) for c in list(cands)[:k]}
    else:
      t, top = target, set(list(cands)[:k])
    out.append(t in top)
  return out


def recall_at_k(candidates: Sequence[Sequence[str]], targets: Sequence[str], k: int, *,
                normalize: bool = True, drop_year: bool = False) -> float:
  """Fraction of examples whose (single) target is among the first ``k`` candidates.

  ``candidates[i]`` is the ranked list of generated titles for example ``i``
  (e.g. the beams of a beam search, best first).  With one relevant item per
  example, Recall@K equals HitRate@K.  Fewer than ``k`` candidates is allowed
  (a beam search with fewer beams than ``k`` cannot do better than its beams).
  """
  hits = hits_at_k(candidates, targets, k, normalize=normalize, drop_year=drop_year)
  return sum(hits) / len(hits)


def accuracy(predictions: Sequence[str], targets: Sequence[str], *,
             normalize: bool = True) -> float:
  """Exact-match accuracy; with ``normalize`` both sides go through :func:`normalize_title`."""
  _check_lengths("accuracy", predictions, targets)
  if normalize:
    pairs = [(normalize_title(p), normalize_title(t)) for p, t in zip(predictions, targets)]
  else:
    pairs = list(zip(predictions, targets))
  return sum(p == t for p, t in pairs) / len(pairs)


def rouge_l(predictions: Sequence[str], references: Sequence[str], *,
            use_stemmer: bool = False) -> dict[str, float]:
  """Mean ROUGE-L precision / recall / F-measure (``rouge-score`` package)."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  _check_lengths("rouge_l", predictions, references)
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
  p = r = f = 0.0
  for pred, ref in zip(predictions, references):
    s = scorer.score(ref, pred)["rougeL"]  # score(target, prediction)
    p += s.precision
    r += s.recall
    f += s.fmeasure
  n = len(predictions)
  return {"precision": p / n, "recall": r / n, "fmeasure": f / n}


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence of two token lists (reference for tests)."""
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rank_of(candidates: Sequence[str], target: str, *, normalize: bool = True) -> Optional[int]:
  """0-based rank of ``target`` among ``candidates`` (None if absent)."""
  norm = (lambda s: normalize_title(s)) if normalize else (lambda s: s)
  t = norm(target)
  for i, c in enumerate(candidates):
    if norm(c) == t:
      return i
  return None
