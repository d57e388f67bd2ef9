"""Stage 1: pretrain the user encoder by next-item prediction; full-ranking evaluation.

    python -m userllm_jax.main --config=configs/encoder_movielens_100k.py --workdir=DIR

1. Prepare (or reuse) the dataset: ``config.data.dir`` if set, else
   ``cache_dir()/prepared/<name>-<hash of name, source, settings>``
   (``records.prepare_dataset`` is idempotent; process 0 builds it first, the
   others wait at a barrier and then reuse or build their own local copy).
2. Train :class:`~userllm_jax.models.encoder.UserEncoder` with
   :func:`~userllm_jax.models.encoder.pretrain_loss` through
   :func:`userllm_jax.train.loop.run_training` (sharded, checkpointed with the
   Grain iterator, resumable: rerunning in the same workdir continues).
   Each process reads its own shard of the users.
3. Evaluate on the leave-one-out valid and test items with *full ranking*
   (every catalogue item is a candidate; items already in the user's history
   are excluded when ``eval.exclude_seen``): HR@K, NDCG@K, MRR, beside the
   popularity baseline (training-split item frequency) and chance.
4. Process 0 writes ``WORKDIR/results.json``.  A re-run whose checkpoint is at the
   final step and whose results are there (a User-LLM job resuming after stage 1)
   restores the model and reuses them, evaluating nothing again.

Preemption (``train/preemption.py``): a SIGTERM stops the job with exit status 0 at the
next safe point -- after data preparation (which finishes first: it writes its directory
atomically), at a training step (after a checkpoint), or before each evaluation split.

Config fields (besides ``train.*`` / ``mesh.*`` read by the loop):

* ``data.name, data.source ('' = default), data.dir ('' = cache), data.settings``
  (prepare settings, e.g. ``min_user_count``; ``reader_kwargs`` for the
  reader), ``data.max_len`` (else ``model.max_len``), ``data.packing``,
  ``data.worker_count`` (Grain worker processes; -1, the default when unset, = auto from
  the host's cores, see ``data.pipeline.resolve_worker_count``), ``data.worker_buffer_size``
  (batches each worker keeps ready, 2); ``train.prefetch`` (batches placed on the devices
  ahead of the step, 2; read by ``train/loop.py``, which logs the data-wait fraction); the
  global batch is ``train.batch_size`` (or
  ``data.batch_size``), split evenly over processes;
* ``model.*``: :class:`EncoderConfig` fields (vocabulary sizes and ``max_len``
  come from the data; ``train.dtype`` / ``train.remat`` override
  ``model.dtype`` / ``model.remat`` when set);
* ``loss.*``: :class:`LossConfig` fields;
* ``eval.ks`` (default (1, 5, 10, 20)), ``eval.batch_size`` (256),
  ``eval.exclude_seen`` (True), ``eval.ties`` ('pessimistic'),
  ``eval.max_users`` (0 = all; for quick periodic evals only).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from userllm_jax import paths
from userllm_jax.data import pipeline
from userllm_jax.data import records
from userllm_jax.data import sequences as seqlib
from userllm_jax.eval import ranking
from userllm_jax.models import encoder as enc
from userllm_jax.train import checkpoint as ckpt_lib
from userllm_jax.train import loop
from userllm_jax.train import mesh as mesh_lib
from userllm_jax.train import preemption


def _get(cfg, name, default=None):
  if cfg is None:
    return default
  try:
    value = cfg.get(name, default)
  except AttributeError:
    value = getattr(cfg, name, default)
  return default if value is None else value


def _to_dict(cfg) -> dict:
  if cfg is None:
    return {}
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def dataset_dir(data_cfg) -> str:
  """``data.dir``, else the cache path keyed by (name, source, settings)."""
  explicit = _get(data_cfg, "dir", "")
  if explicit:
    return str(explicit)
  key = json.dumps({"name": data_cfg.name, "source": _get(data_cfg, "source", "") or None,
                    "settings": _to_dict(_get(data_cfg, "settings", None))},
                   sort_keys=True, default=str)
  digest = paths.sha256_bytes(key)[:12]
  safe = data_cfg.name.replace("/", "_").replace(":", "_")
  return str(paths.cache_dir() / "prepared" / f"{safe}-{digest}")


def prepare(data_cfg) -> records.PreparedDataset:
  """Prepare or reuse the dataset (process 0 first, then the others)."""
  out = dataset_dir(data_cfg)
  source = _get(data_cfg, "source", "") or None
  settings = _to_dict(_get(data_cfg, "settings", None))

  def build():
    return records.prepare_dataset(data_cfg.name, source, out, **settings)

  if jax.process_count() == 1:
    return build()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  ds = build() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("encoder_job:prepare")
  return ds if ds is not None else build()


def encoder_config(config, prepared) -> enc.EncoderConfig:
  model_cfg = _to_dict(_get(config, "model", None))
  max_len = int(_get(config.data, "max_len", 0) or model_cfg.get("max_len", 50))
  vocabs = prepared.vocabs
  timegap = vocabs["timegap"] if "timegap" in vocabs else seqlib.timegap_vocab()
  overrides = dict(num_items=vocabs["item"].size,
                   num_genres=vocabs["genre"].size if "genre" in vocabs else 0,
                   num_ratings=vocabs["rating"].size if "rating" in vocabs else 0,
                   num_timegap_buckets=timegap.size, max_len=max_len)
  dtype = _get(config.train, "dtype", None)
  if dtype:
    overrides["dtype"] = str(dtype)
  remat = _get(config.train, "remat", None)
  if remat is not None:
    overrides["remat"] = bool(remat)
  return enc.EncoderConfig.from_config(model_cfg, **overrides)


def train_item_counts(prepared) -> np.ndarray:
  """Item frequencies over every user's leave-one-out training part (all but the last two)."""
  n = prepared.vocabs["item"].size
  return ranking.item_counts(
      (prepared.record(u)["item"][:max(int(prepared.lengths[u]) - 2, 0)]
       for u in range(prepared.num_users)), n)


class Evaluator:
  """Full-ranking HR/NDCG/MRR of the encoder on one split (batch sharded over the mesh)."""

  def __init__(self, prepared, split: str, *, max_len: int, mesh, eval_cfg,
               max_users: int = 0):
    self.mesh = mesh
    self.ks = tuple(int(k) for k in _get(eval_cfg, "ks", (1, 5, 10, 20)))
    self.exclude_seen = bool(_get(eval_cfg, "exclude_seen", True))
    self.ties = str(_get(eval_cfg, "ties", "pessimistic"))
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    bs = int(_get(eval_cfg, "batch_size", 256))
    bs = -(-bs // dp) * dp
    users = None
    if max_users:
      all_users = np.nonzero(np.asarray(prepared.lengths) >= 3)[0]
      users = all_users[:max_users]
    self.batches = pipeline.make_eval_batches(prepared, split, max_len=max_len,
                                              batch_size=bs, users=users)
    self.split = split
    self._batch_sh = mesh_lib.batch_sharding(mesh)
    self._repl = NamedSharding(mesh, P())
    self._seen_len = 1
    if self.exclude_seen:
      lengths = np.asarray(prepared.lengths)[self.batches.users]
      self._seen_len = max(1, int(lengths.max()) - (2 if split == "valid" else 1))

    def ranks_fn(model, batch, with_kept: bool):
      """Ranks under ``exclude_seen``; ``with_kept``: also the ranks with seen items kept."""
      _, user_BxD = model(batch, deterministic=True)
      table = model.output_table()

      def rank(seen):
        return ranking.ranks_from_embeddings(user_BxD, table, batch["target_item_B"], seen,
                                             ties=self.ties)

      main = rank(batch["seen_BxS"] if self.exclude_seen else None)
      if not with_kept:
        return main, None
      return main, (rank(None) if self.exclude_seen else main)

    self._ranks = nnx.jit(ranks_fn, static_argnames="with_kept")
    self._gather = jax.jit(lambda x: x, out_shardings=self._repl)

  def _seen(self, batch) -> np.ndarray:
    b = batch["user_index_B"].shape[0]
    out = np.zeros((b, self._seen_len), np.int32)
    for r in range(b):
      if batch["mask_B"][r]:
        s = self.batches.seen_items(int(batch["user_index_B"][r]))
        out[r, :s.size] = s
    return out

  def _global(self, x: np.ndarray):
    return jax.make_array_from_callback(x.shape, self._batch_sh, lambda idx: x[idx])

  def targets_and_seen(self):
    """All (target_B, seen_BxS, mask_B) on the host (for the popularity baseline)."""
    t, s, m = [], [], []
    for batch in self.batches:
      t.append(batch["target_item_B"])
      s.append(self._seen(batch) if self.exclude_seen else None)
      m.append(batch["mask_B"])
    mask = np.concatenate(m).astype(bool)
    seen = np.concatenate(s)[mask] if self.exclude_seen else None
    return np.concatenate(t)[mask], seen

  def __call__(self, model) -> dict[str, float]:
    """Metrics under ``eval.exclude_seen``; :meth:`evaluate_both` also gives the seen-kept ones."""
    return self._evaluate(model, with_kept=False)[0]

  def evaluate_both(self, model) -> tuple[dict[str, float], dict[str, float]]:
    """``(metrics, metrics with already-seen items kept)``; the same figures twice when
    ``eval.exclude_seen`` is off.  Seen-kept is the protocol of RecBole's sequential models."""
    return self._evaluate(model, with_kept=True)

  def _evaluate(self, model, *, with_kept: bool):
    accs = [ranking.RankingAccumulator(self.ks) for _ in range(2 if with_kept else 1)]
    keep = ("item_BxT", "genre_BxTxG", "rating_BxT", "timegap_BxT", "position_BxT",
            "segment_BxT", "target_item_B")
    with jax.set_mesh(self.mesh):
      for batch in self.batches:
        inputs = {k: batch[k] for k in keep}
        if self.exclude_seen:
          inputs["seen_BxS"] = self._seen(batch)
        g = {k: self._global(np.asarray(v)) for k, v in inputs.items()}
        for acc, ranks in zip(accs, self._ranks(model, g, with_kept=with_kept)):
          acc.add(np.asarray(jax.device_get(self._gather(ranks))), batch["mask_B"])
    results = [acc.result() for acc in accs]
    return results[0], (results[1] if with_kept else None)


def run(config, workdir: str) -> dict[str, Any]:
  """Train (or resume) and evaluate; returns the results dict (written on process 0)."""
  return train_and_evaluate(config, workdir)[0]


def train_and_evaluate(config, workdir: str):
  """:func:`run`, also returning ``(results, trained model, prepared dataset)``."""
  t_start = time.time()
  primary = jax.process_index() == 0
  prepared = prepare(config.data)
  preemption.exit_if_requested("after preparing the data")
  logging.info("dataset %s: %d users, %d items, %d interactions", prepared.directory,
               prepared.num_users, prepared.num_items, prepared.num_interactions)
  ecfg = encoder_config(config, prepared)
  loss_cfg = _to_dict(_get(config, "loss", None))
  enc.LossConfig.from_config(loss_cfg)   # validate early
  mesh = mesh_lib.make_mesh(_get(config, "mesh", None))

  global_bs = int(_get(config.train, "batch_size", 0) or _get(config.data, "batch_size", 0))
  if global_bs <= 0:
    raise ValueError("encoder job: set train.batch_size (the global batch size)")
  if global_bs % jax.process_count():
    raise ValueError(f"train.batch_size={global_bs} is not divisible by the "
                     f"{jax.process_count()} processes")
  workers = pipeline.resolve_worker_count(int(_get(config.data, "worker_count", -1)))
  logging.info("input pipeline: %d Grain worker processes (data.worker_count=%s, %d CPUs), "
               "device prefetch %s", workers, _get(config.data, "worker_count", -1),
               pipeline.available_cpus(), _get(config.train, "prefetch", 2))
  # This process's block of rows of every global batch, where the mesh puts its devices: the
  # global batch is the 1-process batch row for row on any process count.
  block, blocks = (mesh_lib.process_batch_block(mesh, global_bs) if jax.process_count() > 1
                   else (0, 1))
  train_iter = pipeline.make_train_iterator(
      prepared, max_len=ecfg.max_len, batch_size=global_bs // blocks,
      seed=int(_get(config, "seed", 0)), packing=bool(_get(config.data, "packing", False)),
      shard_index=block, shard_count=blocks,
      worker_count=workers,
      worker_buffer_size=int(_get(config.data, "worker_buffer_size", 2)))
  if not _get(config.data, "packing", False) and not workers:
    # Its position (global batches taken) is every process's and holds on any process count.
    ckpt_lib.set_shard_layout(train_iter, ckpt_lib.REPLICATED)

  eval_cfg = _get(config, "eval", None)
  periodic = None
  if int(_get(config.train, "eval_every", 0)) > 0:
    periodic_eval = Evaluator(prepared, "valid", max_len=ecfg.max_len, mesh=mesh,
                              eval_cfg=eval_cfg,
                              max_users=int(_get(eval_cfg, "max_users", 0)))

    def periodic(model, step):
      del step
      return {k: v for k, v in periodic_eval(model).items() if k != "num_users"}

  def loss_fn(model, batch, rng):
    return enc.pretrain_loss(model, batch, rng, loss_cfg, deterministic=False)

  result = loop.run_training(
      config, workdir, build_model=lambda rngs: enc.UserEncoder(ecfg, rngs=rngs),
      loss_fn=loss_fn, train_iter=train_iter, eval_fn=periodic, mesh=mesh)
  done_path = paths.join(workdir, "results.json")
  if paths.path(done_path).exists():
    done = json.loads(paths.read_text(done_path))
    if done.get("train", {}).get("steps") == result.step:
      logging.info("%s: this training's results are there; not evaluating again", done_path)
      return done, result.model, prepared

  counts = train_item_counts(prepared)
  num_candidates = prepared.vocabs["item"].size - enc.NUM_SPECIAL
  splits = {}
  for split in ("valid", "test"):
    preemption.exit_if_requested(f"before evaluating {split}")
    ev = Evaluator(prepared, split, max_len=ecfg.max_len, mesh=mesh, eval_cfg=eval_cfg)
    t0 = time.time()
    model_metrics, kept_metrics = ev.evaluate_both(result.model)
    targets, seen = ev.targets_and_seen()
    pop = ranking.popularity_baseline(counts, targets, seen, ks=ev.ks, ties=ev.ties)
    pop_kept = ranking.popularity_baseline(counts, targets, None, ks=ev.ks, ties=ev.ties)
    splits[split] = {
        "model": model_metrics, "popularity": pop,
        # The same ranking with already-seen items left in the candidates (RecBole's protocol
        # for sequential models); equal to the above when eval.exclude_seen is off.
        "model_seen_kept": kept_metrics, "popularity_seen_kept": pop_kept,
        "chance": {**{f"hr@{k}": ranking.chance_hr(k, num_candidates) for k in ev.ks},
                   **{f"ndcg@{k}": ranking.chance_ndcg(k, num_candidates) for k in ev.ks}},
        "exclude_seen": ev.exclude_seen, "ties": ev.ties, "eval_s": time.time() - t0}
    logging.info("%s: model %s | popularity %s | seen kept: model %s", split,
                 {k: round(v, 4) for k, v in model_metrics.items()},
                 {k: round(v, 4) for k, v in pop.items()},
                 {k: round(v, 4) for k, v in kept_metrics.items()})

  losses = [m["loss"] for _, m in result.history]
  results = {
      "job": "encoder",
      "dataset": {"name": config.data.name, "dir": str(prepared.directory),
                  "num_users": prepared.num_users, "num_items": prepared.num_items,
                  "num_interactions": prepared.num_interactions,
                  "num_candidates": num_candidates},
      "model": {"config": dataclasses.asdict(ecfg),
                "num_params": int(sum(x.size for x in jax.tree.leaves(result.state["params"])))},
      "train": {"steps": result.step, "resumed_from": result.start_step,
                "first_loss": losses[0] if losses else None,
                "final_loss": losses[-1] if losses else None,
                "loss_curve": {str(s): m["loss"] for s, m in result.history[::max(
                    1, len(result.history) // 50)]},
                "compile": result.compile_stats,
                "eval_history": [{"step": s, **m} for s, m in result.eval_history]},
      "mesh": dict(result.mesh.shape), "processes": jax.process_count(),
      "devices": jax.device_count(), "backend": jax.default_backend(),
      "valid": splits["valid"], "test": splits["test"],
      "wall_s": time.time() - t_start,
      "config": config.to_dict() if hasattr(config, "to_dict") else None,
  }
  if primary:
    path = paths.join(workdir, "results.json")
    paths.write_atomic(path, json.dumps(results, indent=2, default=str))
    logging.info("wrote %s", path)
  return results, result.model, prepared
