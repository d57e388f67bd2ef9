"""Throughput of the pretraining input pipeline (data/pipeline.py).

Writes synthetic datasets (every user with exactly L interactions, for L in
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


def main(argv):
  del argv
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
