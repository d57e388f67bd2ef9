"""Self-contained ml-100k tuning loop for the user encoder (no trainer, no Grain).

Reads the RecBole atomic ml-100k files (``--data_dir`` with ml-100k.inter / ml-100k.item, e.g.
unzipped from the recbole-1.2.1 wheel: recbole/dataset_example/ml-100k/), builds chronological
per-user sequences (stable sort by timestamp: ties keep file order), leave-one-out splits
(train = all but the last two, valid = second to last, test = last), trains with a plain
optax loop (random ``max_len+1`` window per user per epoch) and reports full-ranking
HR/NDCG/MRR on valid and test (already-seen items excluded), plus the popularity baseline.

  python benchmarks/tune_encoder.py --data_dir=/tmp/x/recbole/dataset_example/ml-100k \
      --steps=2000 --embed_dim=64 --features=item,genre,rating

Every EncoderConfig / LossConfig field can be given as a flag (see --help).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from userllm_jax.eval import ranking
from userllm_jax.models import encoder as enc

NUM_TIMEGAP_BUCKETS = 34  # 0 pad, 1 first item, 2 + floor(log2(gap_s + 1)) (<= 33)


def timegap_bucket(gap_s: np.ndarray, first: np.ndarray) -> np.ndarray:
  b = 2 + np.floor(np.log2(np.maximum(gap_s, 0) + 1.0)).astype(np.int32)
  return np.where(first, 1, np.minimum(b, NUM_TIMEGAP_BUCKETS - 1)).astype(np.int32)


def load_ml100k(data_dir: str, max_genres: int = 6):
  """Per-user arrays from RecBole atomic files; ids: 0 pad, 1 oov, items 2.. by first use."""
  item_genres_raw = {}
  with open(os.path.join(data_dir, "ml-100k.item"), encoding="latin-1") as f:
    header = f.readline().rstrip("\n").split("\t")
    col = {h.split(":")[0]: i for i, h in enumerate(header)}
    for line in f:
      parts = line.rstrip("\n").split("\t")
      item_genres_raw[parts[col["item_id"]]] = parts[col["class"]].split()
  rows = []
  with open(os.path.join(data_dir, "ml-100k.inter"), encoding="latin-1") as f:
    f.readline()
    for n, line in enumerate(f):
      u, i, r, t = line.rstrip("\n").split("\t")
      rows.append((u, i, float(r), int(float(t)), n))
  per_user = collections.defaultdict(list)
  for row in rows:
    per_user[row[0]].append(row)
  item_vocab = {}
  genre_vocab = {}
  users = sorted(per_user, key=int)
  seqs = []
  for u in users:
    rs = sorted(per_user[u], key=lambda x: (x[3], x[4]))  # stable: file order breaks ties
    for r in rs:
      item_vocab.setdefault(r[1], len(item_vocab) + 2)
    items = np.array([item_vocab[r[1]] for r in rs], np.int32)
    ratings = np.array([int(r[2]) + 1 for r in rs], np.int32)  # 1..5 -> 2..6
    ts = np.array([r[3] for r in rs], np.int64)
    gaps = np.diff(ts, prepend=ts[0])
    first = np.arange(len(ts)) == 0
    genres = np.zeros((len(rs), max_genres), np.int32)
    for j, r in enumerate(rs):
      for g_i, g in enumerate(item_genres_raw.get(r[1], [])[:max_genres]):
        genres[j, g_i] = genre_vocab.setdefault(g, len(genre_vocab) + 2)
    seqs.append(dict(item=items, rating=ratings, genre=genres,
                     timegap=timegap_bucket(gaps, first)))
  return seqs, len(item_vocab) + 2, len(genre_vocab) + 2, 7


def _pad(a, n, shape_tail=()):
  out = np.zeros((n,) + shape_tail, np.int32)
  out[:len(a)] = a
  return out


def train_batches(seqs, max_len, batch_size, seed):
  """Infinite iterator: epochs of shuffled users, one random window of max_len+1 each."""
  rng = np.random.default_rng(seed)
  G = seqs[0]["genre"].shape[1]
  while True:
    order = rng.permutation(len(seqs))
    for s in range(0, len(order) - batch_size + 1, batch_size):
      b = collections.defaultdict(list)
      for u in order[s:s + batch_size]:
        seq = seqs[u]
        n = len(seq["item"]) - 2  # training part
        L = min(n, max_len + 1)
        start = rng.integers(0, n - L + 1)
        w = {k: v[start:start + L] for k, v in seq.items()}
        b["item_BxT"].append(_pad(w["item"][:-1], max_len))
        b["genre_BxTxG"].append(_pad(w["genre"][:-1], max_len, (G,)))
        b["rating_BxT"].append(_pad(w["rating"][:-1], max_len))
        b["timegap_BxT"].append(_pad(w["timegap"][:-1], max_len))
        b["position_BxT"].append(_pad(np.arange(L - 1), max_len))
        b["segment_BxT"].append(_pad(np.ones(L - 1, np.int32), max_len))
        b["target_item_BxT"].append(_pad(w["item"][1:], max_len))
        b["target_genre_BxTxG"].append(_pad(w["genre"][1:], max_len, (G,)))
        b["target_rating_BxT"].append(_pad(w["rating"][1:], max_len))
      yield {k: np.stack(v) for k, v in b.items()}


def eval_arrays(seqs, max_len, split):
  """History (left-aligned, last max_len items before the target), target, seen items."""
  cut = {"valid": 2, "test": 1}[split]
  G = seqs[0]["genre"].shape[1]
  b = collections.defaultdict(list)
  max_seen = max(len(s["item"]) for s in seqs)
  for seq in seqs:
    n = len(seq["item"]) - cut
    lo = max(0, n - max_len)
    b["item_BxT"].append(_pad(seq["item"][lo:n], max_len))
    b["genre_BxTxG"].append(_pad(seq["genre"][lo:n], max_len, (G,)))
    b["rating_BxT"].append(_pad(seq["rating"][lo:n], max_len))
    b["timegap_BxT"].append(_pad(seq["timegap"][lo:n], max_len))
    b["position_BxT"].append(_pad(np.arange(n - lo), max_len))
    b["segment_BxT"].append(_pad(np.ones(n - lo, np.int32), max_len))
    b["target_item_B"].append(seq["item"][n])
    b["seen_BxS"].append(_pad(seq["item"][:n], max_seen))
  return {k: np.stack(v) for k, v in b.items()}


def build(args, num_items, num_genres, num_ratings):
  model_fields = {f.name for f in dataclasses.fields(enc.EncoderConfig)}
  mc = {k: v for k, v in vars(args).items() if k in model_fields and v is not None}
  mc["features"] = tuple(args.features.split(","))
  cfg = enc.EncoderConfig(num_items=num_items, num_genres=num_genres, num_ratings=num_ratings,
                          num_timegap_buckets=NUM_TIMEGAP_BUCKETS,
                          **{k: v for k, v in mc.items() if k not in (
                              "num_items", "num_genres", "num_ratings",
                              "num_timegap_buckets")})
  loss_fields = {f.name for f in dataclasses.fields(enc.LossConfig)}
  lc = enc.LossConfig(**{k: v for k, v in vars(args).items()
                         if k in loss_fields and v is not None})
  return cfg, lc


def run(args):
  t0 = time.time()
  seqs, num_items, num_genres, num_ratings = load_ml100k(args.data_dir)
  cfg, lc = build(args, num_items, num_genres, num_ratings)
  model = enc.UserEncoder(cfg, rngs=nnx.Rngs(args.seed))
  sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup_steps, args.steps,
                                             end_value=args.lr * 0.1)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(sched, b2=0.98, weight_decay=args.weight_decay,
                               mask=decay_mask))
  graphdef, params = nnx.split(model, nnx.Param)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch, key):
    def f(p):
      m = nnx.merge(graphdef, p)
      return enc.pretrain_loss(m, batch, key, lc)
    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  @jax.jit
  def ranks(params, batch):
    """Ranks with already-seen items excluded and with them left in (RecBole's protocol)."""
    m = nnx.merge(graphdef, params)
    _, user = m(batch, deterministic=True)
    table = m.output_table()
    return (ranking.ranks_from_embeddings(user, table, batch["target_item_B"], batch["seen_BxS"]),
            ranking.ranks_from_embeddings(user, table, batch["target_item_B"], None))

  evals = {s: eval_arrays(seqs, cfg.max_len, s) for s in ("valid", "test")}

  def evaluate(params, split):
    """Metrics with seen items excluded (``--exclude_seen=1``) or not; the other protocol's
    metrics are added with the suffix ``_all`` (seen kept) or ``_excl`` (seen excluded)."""
    a = evals[split]
    excl = ranking.RankingAccumulator((1, 5, 10, 20))
    keep = ranking.RankingAccumulator((1, 5, 10, 20))
    for i in range(0, len(seqs), 512):
      r_excl, r_all = ranks(params, {k: v[i:i + 512] for k, v in a.items()})
      excl.add(r_excl)
      keep.add(r_all)
    main, other, suffix = ((excl, keep, "_all") if args.exclude_seen else (keep, excl, "_excl"))
    out = dict(main.result())
    out.update({k + suffix: v for k, v in other.result().items()})
    return out

  it = train_batches(seqs, cfg.max_len, args.batch_size, args.seed)
  key = jax.random.key(args.seed)
  best = (-1.0, None, None)
  t_train = time.time()
  for s in range(1, args.steps + 1):
    params, opt_state, metrics = step(params, opt_state, next(it), jax.random.fold_in(key, s))
    if s % args.eval_every == 0 or s == args.steps:
      v = evaluate(params, "valid")
      t = evaluate(params, "test")
      o = "_all" if args.exclude_seen else "_excl"
      print(f"step {s} loss {float(metrics['loss']):.4f} valid hr@10 {v['hr@10']:.4f} "
            f"ndcg@10 {v['ndcg@10']:.4f} | test hr@10 {t['hr@10']:.4f} ndcg@10 "
            f"{t['ndcg@10']:.4f} | test{o} hr@10 {t['hr@10' + o]:.4f} ndcg@10 "
            f"{t['ndcg@10' + o]:.4f}  ({time.time() - t_train:.0f}s)", flush=True)
      if v["ndcg@10"] > best[0]:
        best = (v["ndcg@10"], v, t, s)
  train_s = time.time() - t_train
  counts = ranking.item_counts([q["item"][:-2] for q in seqs], num_items)
  pop = ranking.popularity_baseline(counts, evals["test"]["target_item_B"],
                                    evals["test"]["seen_BxS"] if args.exclude_seen else None,
                                    ks=(1, 5, 10, 20))
  out = dict(final_test=t, best_valid_step=best[3], best_valid=best[1], test_at_best_valid=best[2],
             popularity_test=pop, train_seconds=train_s, total_seconds=time.time() - t0,
             model=dataclasses.asdict(cfg), loss=dataclasses.asdict(lc), args=vars(args))
  print(json.dumps({k: out[k] for k in ("final_test", "best_valid_step", "test_at_best_valid",
                                         "popularity_test", "train_seconds")}, indent=1))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--warmup_steps", type=int, default=100)
  p.add_argument("--weight_decay", type=float, default=0.0)
  p.add_argument("--eval_every", type=int, default=500)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--exclude_seen", type=int, default=1)
  p.add_argument("--features", default="item")
  p.add_argument("--out", default=None)
  for f in dataclasses.fields(enc.EncoderConfig):
    if f.name in ("num_items", "num_genres", "num_ratings", "num_timegap_buckets", "features"):
      continue
    typ = {"bool": lambda s: bool(int(s)), "int": int, "float": float}.get(
        f.type if isinstance(f.type, str) else f.type.__name__, str)
    p.add_argument(f"--{f.name}", type=typ, default=None)
  for f in dataclasses.fields(enc.LossConfig):
    typ = {"bool": lambda s: bool(int(s)), "int": int, "float": float}.get(
        f.type if isinstance(f.type, str) else f.type.__name__, str)
    p.add_argument(f"--{f.name}", type=typ, default=None)
  args = p.parse_args()
  out = run(args)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
  main()
