"""Simple baselines on the stage-2 test users, scored exactly as the methods are.

* ``majority_genre``: always answer the most common favourite genre of the *training*
  examples -> accuracy;
* ``popularity``: the K items most often interacted with in the stage-1 training parts
  (every user's sequence but the last two events), the same list for every user ->
  Recall@K on titles (seen items are not removed: the LLM's beams may repeat them too);
* ``encoder_topk``: the stage-1 encoder's own ranking of the catalogue from the same
  (truncated) history, items of that history removed, top K mapped to titles -> Recall@K.

Each metric carries its interval, as the methods' do.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import numpy as np

from userllm_jax.data import tasks as tasks_lib
from userllm_jax.eval import stats
from userllm_jax.eval import text_metrics
from userllm_jax.models import encoder as enc_lib
from userllm_jax.stage2 import examples as examples_lib
from userllm_jax.stage2 import methods as methods_lib


def _metric(hits, confidence):
  n = len(hits)
  return float(np.mean(hits)), list(stats.proportion_ci(int(sum(hits)), n, confidence))


def majority_genre(config, data: examples_lib.TaskData) -> dict[str, Any]:
  """Accuracy of always answering the training examples' most common favourite genre."""
  conf = float(config.eval.get("confidence", 0.95))
  train = [e.target for e in data.train if e.task == "fav_genre"]
  test = data.test.get("fav_genre", [])
  if not train or not test:
    return {}
  answer = collections.Counter(train).most_common(1)[0][0]
  acc, ci = _metric(text_metrics.hits_at_k([[answer]] * len(test), [e.target for e in test], 1),
                    conf)
  return {"answer": answer, "genre_accuracy": acc, "genre_accuracy_ci": ci, "n": len(test)}


def popularity(config, data: examples_lib.TaskData, catalog: tasks_lib.Catalog,
               item_counts: np.ndarray) -> dict[str, Any]:
  """Recall@K of the globally most popular titles."""
  conf = float(config.eval.get("confidence", 0.95))
  test = data.test.get("next_item", [])
  if not test:
    return {}
  order = np.argsort(-np.asarray(item_counts), kind="stable")
  titles = [catalog.item_titles[i] for i in order
            if i >= enc_lib.NUM_SPECIAL and i < len(catalog.item_titles) and catalog.item_titles[i]]
  out: dict[str, Any] = {"n": len(test), "top": titles[:10]}
  targets = [e.target for e in test]
  for k in config.eval.ks:
    out[f"recall@{k}"], out[f"recall@{k}_ci"] = _metric(
        text_metrics.hits_at_k([titles[:int(k)]] * len(test), targets, int(k)), conf)
  return out


def encoder_topk(config, data: examples_lib.TaskData, catalog: tasks_lib.Catalog, encoder,
                 history_len: int) -> dict[str, Any]:
  """Recall@K of the stage-1 encoder's top-K titles from the history cut to ``history_len``."""
  conf = float(config.eval.get("confidence", 0.95))
  test = data.test.get("next_item", [])
  if not test:
    return {}
  kmax = max(int(k) for k in config.eval.ks)
  cands = []
  truncated = [examples_lib.truncate_history(e, history_len) for e in test]
  for scores in encoder_scores(encoder, truncated):
    for row in scores:
      order = np.argsort(-row, kind="stable")
      titles = []
      for j in order:
        if not np.isfinite(row[j]):
          break
        if j < len(catalog.item_titles) and catalog.item_titles[j]:
          titles.append(catalog.item_titles[j])
          if len(titles) == kmax:
            break
      cands.append(titles)
  out: dict[str, Any] = {"n": len(test), "history_len": history_len}
  targets = [e.target for e in test]
  for k in config.eval.ks:
    out[f"recall@{k}"], out[f"recall@{k}_ci"] = _metric(
        text_metrics.hits_at_k(cands, targets, int(k)), conf)
  return out


def encoder_scores(encoder, examples, *, batch_size: int = 256):
  """The stage-1 encoder's scores of every item id from each example's history, the items of
  that history set to -inf (the user has seen them): ``float64 [b, num_items]`` per chunk of
  ``batch_size`` examples, in order."""
  score = jax.jit(enc_lib.score_items)
  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    feats = [tasks_lib.history_features(e) for e in chunk]
    batch = {k: np.stack([f[k] for f in feats]) for k in tasks_lib.HISTORY_KEYS}
    scores = np.array(score(encoder, methods_lib.history_batch(batch)), np.float64)
    for r, e in enumerate(chunk):
      scores[r, e.history["item_BxT"][:int(e.history["length_B"])]] = -np.inf
    yield scores
