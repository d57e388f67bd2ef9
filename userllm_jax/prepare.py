"""Prepares a dataset for training: read -> sequences -> ArrayRecord + metadata.

Usage::

  python -m userllm_jax.prepare --dataset=movielens-100k --out=/data/ml100k
  python -m userllm_jax.prepare --dataset=movielens-1m --source=/raw/ml-1m \
      --out=/data/ml1m --min_user_count=5 --min_item_count=5 --k_core
  python -m userllm_jax.prepare --dataset=synthetic --out=/tmp/syn \
      --reader_kwargs='{"num_users": 2000, "mean_length": 100}'

Dataset names and ``--source`` forms are listed in ``userllm_jax.data.sources``.
An existing ``--out`` built from the same source files (sha256) with the same
settings is reused (``--force`` rebuilds). The output is written to a temporary
directory next to ``--out`` and renamed at the end; ``--out`` may also be an object-store
URI (``gs://bucket/prepared/ml100k``), uploaded with ``metadata.json`` last (``paths.replace_dir``).
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", None, "Dataset name (see data/sources).")
flags.DEFINE_string("source", None, "Raw data location; default: the "
                    "dataset's embedded/default source where one exists.")
flags.DEFINE_string("out", None, "Output directory of the prepared dataset (local or gs://...).")
flags.DEFINE_bool("strict", False, "Fail on the first malformed row instead "
                  "of skipping and counting it.")
flags.DEFINE_integer("min_user_count", 1, "Drop users with fewer "
                     "interactions (after item filtering).")
flags.DEFINE_integer("min_item_count", 1, "Drop items with fewer "
                     "interactions.")
flags.DEFINE_bool("k_core", False, "Repeat the two filters until stable.")
flags.DEFINE_integer("max_genres", None, "Genres kept per item (default: the "
                     "most any item has).")
flags.DEFINE_integer("userllm_window", 50, "Window for the User-LLM split "
                     "sizes recorded in metadata.json.")
flags.DEFINE_integer("userllm_stride", None, "Stride of User-LLM train "
                     "windows (default: the window).")
flags.DEFINE_string("reader_kwargs", None, "JSON object of extra reader "
                    "arguments, e.g. '{\"category\": \"Books\"}'.")
flags.DEFINE_string("record_options", "group_size:1,uncompressed",
                    "ArrayRecordWriter options; 'group_size:1' compresses "
                    "(zstd): ~3x smaller, ~6x slower to read long histories.")
flags.DEFINE_bool("force", False, "Rebuild even if --out is up to date.")
flags.DEFINE_bool("progress", True, "Show a progress bar while reading.")


def _summary(ds) -> str:
  m = ds.metadata
  lines = [
      f"prepared dataset: {ds.directory}" + (" (reused: up to date)"
                                             if ds.reused else ""),
      f"  users:        {m['num_users']:,}",
      f"  items:        {m['num_items']:,}",
      f"  interactions: {m['num_interactions']:,}",
      "  vocab sizes:  " + ", ".join(f"{k}={v}" for k, v in
                                     sorted(m["vocab_sizes"].items())),
      "  history length: " + ", ".join(f"{k}={v}" for k, v in
                                       m["length_stats"].items()),
  ]
  for name, sizes in m["splits"].items():
    if "error" in sizes:
      lines.append(f"  split {name}: {sizes['error']}")
    else:
      lines.append(f"  split {name}: train={sizes['train']:,} valid="
                   f"{sizes['valid']:,} test={sizes['test']:,} (users "
                   f"qualified {sizes['users_qualified']:,} of "
                   f"{sizes['users_total']:,})")
  return "\n".join(lines)


def run(argv=None) -> int:
  del argv
  # Imported here so --help stays fast.
  import tqdm  # pylint: disable=g-import-not-at-top
  from userllm_jax.data import records  # pylint: disable=g-import-not-at-top
  from userllm_jax.data.schema import DataError, ReadReport  # pylint: disable=g-import-not-at-top

  if not FLAGS.dataset or not FLAGS.out:
    print("error: --dataset and --out are required", file=sys.stderr)
    return 2
  reader_kwargs = {}
  if FLAGS.reader_kwargs:
    try:
      reader_kwargs = json.loads(FLAGS.reader_kwargs)
    except ValueError as e:
      print(f"error: --reader_kwargs is not JSON: {e}", file=sys.stderr)
      return 2
    if not isinstance(reader_kwargs, dict):
      print("error: --reader_kwargs must be a JSON object", file=sys.stderr)
      return 2
  report = ReadReport(strict=FLAGS.strict)
  progress = None
  if FLAGS.progress:
    progress = lambda it: tqdm.tqdm(it, desc=f"reading {FLAGS.dataset}",
                                    unit=" rows", unit_scale=True,
                                    mininterval=1.0)
  try:
    ds = records.prepare_dataset(
        FLAGS.dataset, FLAGS.source, FLAGS.out, report=report,
        progress=progress, force=FLAGS.force,
        min_user_count=FLAGS.min_user_count,
        min_item_count=FLAGS.min_item_count, k_core=FLAGS.k_core,
        max_genres=FLAGS.max_genres, userllm_window=FLAGS.userllm_window,
        userllm_stride=FLAGS.userllm_stride,
        record_options=FLAGS.record_options, reader_kwargs=reader_kwargs)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  rep = ds.metadata["read_report"]
  if not ds.reused:
    print("read report: " + report.summary())
    for note in rep["notes"]:
      print("  note: " + note)
  print(_summary(ds))
  return 0


def main(argv) -> None:
  sys.exit(run(argv))


if __name__ == "__main__":
  app.run(main)
