"""Throughput of the pretraining input pipeline (data/pipeline.py).

``--mode=job`` (default): the encoder job's own settings (``--config``, default
configs/encoder_movielens_100k.py: its dataset, max_len, global batch, packing, seed) read
with 0, 1 and 2 Grain worker processes (``--workers``), each row's batches/s beside the
train-step rate of ``benchmarks/encoder.py`` for the same model and batch on this machine's
default backend (measured in the same run; ``--step_rate`` adds a rate measured elsewhere,
e.g. 415 steps/s on an H100)::

  python benchmarks/pipeline.py [--config=configs/encoder_movielens_100k.py]
      [--workers=0,1,2] [--num_batches=200] [--steps=20] [--step_rate=415]

A ratio (pipeline batches/s / step rate) below 1 means that pipeline setting starves the
device.

``--mode=synthetic``: writes synthetic datasets (every user with exactly L interactions, for L in
50, 1,000 and 10,000) to a temporary directory with the normal prepare path,
then times ``make_train_iterator`` padded and packed and prints a table of
sequences/s (user windows per second) and interactions/s (non-padding
positions per second)::

  python benchmarks/pipeline.py [--max_len=128] [--batch_size=32]
      [--num_batches=200] [--worker_count=0] [--interactions=200000]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "job", ["job", "synthetic"], "What to measure (see the docstring).")
flags.DEFINE_string("config", "configs/encoder_movielens_100k.py", "Job config (mode=job).")
flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to compare (mode=job).")
flags.DEFINE_integer("steps", 20, "Timed encoder train steps (mode=job).")
flags.DEFINE_float("step_rate", 0.0, "An extra reference step rate (steps/s), e.g. "
                   "benchmarks/encoder.py on an accelerator (mode=job).")
flags.DEFINE_integer("max_len", 128, "Window length T.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("num_batches", 200, "Timed batches per row.")
flags.DEFINE_integer("warmup_batches", 10, "Untimed batches first.")
flags.DEFINE_integer("worker_count", 0, "mp_prefetch worker processes.")
flags.DEFINE_integer("interactions", 200_000, "Interactions per dataset "
                     "(users = interactions / L, at least 16).")
flags.DEFINE_string("record_options", "group_size:1,uncompressed",
                    "ArrayRecord options "
                    "of the prepared datasets.")
flags.DEFINE_integer("read_threads", None, "grain.ReadOptions.num_threads "
                     "(default: make_train_dataset's).")
flags.DEFINE_integer("prefetch_buffer", 64, "grain.ReadOptions."
                     "prefetch_buffer_size when --read_threads is set.")
flags.DEFINE_list("lengths", ["50", "1000", "10000"], "History lengths L.")


def _load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def encoder_step_rate(ecfg, batch_size: int, steps: int, loss_cfg) -> dict:
  """benchmarks/encoder.py's jitted train step for this encoder config and batch."""
  import argparse  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import encoder as encoder_bench  # pylint: disable=g-import-not-at-top
  args = argparse.Namespace(
      tokens=batch_size * ecfg.max_len, steps=steps, num_items=ecfg.num_items,
      features=",".join(ecfg.features), embed_dim=ecfg.embed_dim,
      num_layers=ecfg.num_layers, num_heads=ecfg.num_heads, position=ecfg.position,
      attention=ecfg.attention, remat=int(ecfg.remat), dtype=ecfg.dtype,
      item_softmax=loss_cfg.get("item_softmax", "full"),
      num_negatives=int(loss_cfg.get("num_negatives", 1024)))
  return encoder_bench.bench(ecfg.max_len, args)


def job_mode():
  """Batches/s of the job's pipeline with each worker count beside the step rate."""
  import jax  # pylint: disable=g-import-not-at-top
  from userllm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from userllm_jax.jobs import encoder_job  # pylint: disable=g-import-not-at-top
  config = _load_config(FLAGS.config)
  t0 = time.perf_counter()
  prepared = encoder_job.prepare(config.data)
  prep_s = time.perf_counter() - t0
  ecfg = encoder_job.encoder_config(config, prepared)
  batch = int(config.train.get("batch_size", 0) or config.data.batch_size)
  packing = bool(config.data.get("packing", False))
  rows = []
  for workers in (int(w) for w in FLAGS.workers):
    t0 = time.perf_counter()
    it = pipeline.make_train_iterator(
        prepared, max_len=ecfg.max_len, batch_size=batch, seed=int(config.seed),
        packing=packing, worker_count=workers)
    for _ in range(FLAGS.warmup_batches):
      next(it)
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(FLAGS.num_batches):
      next(it)
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
      it.close()
    rows.append((workers, FLAGS.num_batches / dt, start_s))
  step = encoder_step_rate(ecfg, batch, FLAGS.steps, config.loss.to_dict())
  dev = jax.devices()[0]
  print(f"\nconfig={FLAGS.config} dataset={config.data.name} ({prepared.num_users} users, "
        f"prepare/reuse {prep_s:.1f} s) max_len={ecfg.max_len} batch={batch} "
        f"packing={packing} cpus={pipeline.available_cpus()} "
        f"auto workers={pipeline.resolve_worker_count(-1)} num_batches={FLAGS.num_batches}")
  print(f"encoder train step (benchmarks/encoder.py, {jax.default_backend()} "
        f"{dev.device_kind}, B={step['B']} T={step['T']}, {FLAGS.steps} steps): "
        f"{step['steps_per_s']:.1f} steps/s")
  ref = f" {'ratio@' + format(FLAGS.step_rate, 'g'):>11}" if FLAGS.step_rate else ""
  print(f"{'workers':>7} {'batches/s':>10} {'start+warmup s':>14} {'step/s':>8} "
        f"{'ratio':>6}{ref}")
  for workers, bps, start_s in rows:
    extra = f" {bps / FLAGS.step_rate:>11.2f}" if FLAGS.step_rate else ""
    print(f"{workers:>7} {bps:>10.1f} {start_s:>14.1f} {step['steps_per_s']:>8.1f} "
          f"{bps / step['steps_per_s']:>6.2f}{extra}")
  print("ratio = pipeline batches/s / train steps/s (>= 1: the pipeline keeps up).")


def main(argv):
  del argv
  if FLAGS.mode == "job":
    job_mode()
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  from userllm_jax.data import pipeline, records  # pylint: disable=g-import-not-at-top

  import grain  # pylint: disable=g-import-not-at-top
  read_options = None
  if FLAGS.read_threads is not None:
    read_options = grain.ReadOptions(num_threads=FLAGS.read_threads,
                                     prefetch_buffer_size=FLAGS.prefetch_buffer)
  rows = []
  with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
    for length in [int(x) for x in FLAGS.lengths]:
      users = max(16, FLAGS.interactions // length)
      t0 = time.perf_counter()
      ds = records.prepare_dataset(
          "synthetic", None, os.path.join(tmp, f"L{length}"),
          record_options=FLAGS.record_options,
          reader_kwargs={"num_users": users, "num_items": 2000,
                         "mean_length": length, "min_length": length,
                         "max_length": length, "seed": 0,
                         "with_reviews": False})
      prep_s = time.perf_counter() - t0
      for packing in (False, True):
        it = pipeline.make_train_iterator(
            ds, max_len=FLAGS.max_len, batch_size=FLAGS.batch_size, seed=0,
            packing=packing, worker_count=FLAGS.worker_count,
            read_options=read_options)
        for _ in range(FLAGS.warmup_batches):
          next(it)
        n_seq = n_tok = 0
        t0 = time.perf_counter()
        c0 = time.process_time()
        for _ in range(FLAGS.num_batches):
          b = next(it)
          seg = b["segment_BxT"]
          n_tok += int((seg > 0).sum())
          n_seq += int(seg.max(axis=1).sum())
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0
        if hasattr(it, "close"):
          it.close()
        rows.append((length, users, "packed" if packing else "padded",
                     n_seq / dt, n_tok / dt,
                     n_tok / (FLAGS.num_batches * FLAGS.batch_size
                              * FLAGS.max_len), prep_s, cpu / n_seq * 1e3))
  print(f"\nmax_len={FLAGS.max_len} batch_size={FLAGS.batch_size} "
        f"num_batches={FLAGS.num_batches} worker_count={FLAGS.worker_count} "
        f"record_options={FLAGS.record_options!r} read_options={read_options}")
  print(f"{'history':>8} {'users':>6} {'mode':>7} {'sequences/s':>12} "
        f"{'interactions/s':>15} {'fill':>5} {'prepare_s':>9} "
        f"{'cpu_ms/seq':>10}")
  for length, users, mode, sps, ips, fill, prep, cms in rows:
    print(f"{length:>8,} {users:>6,} {mode:>7} {sps:>12,.0f} {ips:>15,.0f} "
          f"{fill:>5.2f} {prep:>9.1f} {cms:>10.3f}")
  print("cpu_ms/seq: CPU time of this process (all threads) per sequence; "
        "with worker_count > 0 the workers' CPU is not included.")
  del np


if __name__ == "__main__":
  app.run(main)
