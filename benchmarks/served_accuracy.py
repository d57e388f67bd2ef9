"""The served model on the main job's own test users: does serving answer as the job measured?

  python benchmarks/served_accuracy.py --workdir=runs/main \
      [--config=configs/userllm_movielens_100k.py] [--users=200]

Loads the trained workdir the way ``python -m userllm_jax.serve`` does
(``serving/loading.load_engine``, the config's first User-LLM method, an in-memory user
store), appends each favourite-genre test user's history window (the job's split:
``stage2/examples.build_task_data``; the real item ids, timestamps and ratings) through
``Engine.append`` and asks ``fav_genre`` through ``Engine.generate_batch``, one user at a
time. Prints the served accuracy on those users beside the job's own figure at the window
(``WORKDIR/results.json``) and the most frequent answers.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="a finished main-job workdir")
  ap.add_argument("--config", default="configs/userllm_movielens_100k.py",
                  help="the config file the job ran (optional ':variant')")
  ap.add_argument("--users", type=int, default=200, help="how many test users (first N)")
  args = ap.parse_args()

  from userllm_jax.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from userllm_jax.jobs import encoder_job  # pylint: disable=g-import-not-at-top
  from userllm_jax.serving import loading  # pylint: disable=g-import-not-at-top
  from userllm_jax.serving import store as store_lib  # pylint: disable=g-import-not-at-top
  from userllm_jax.stage2 import examples as examples_lib  # pylint: disable=g-import-not-at-top

  path, _, variant = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("served_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)

  prepared = encoder_job.prepare(config.encoder.data)
  catalog = tasks_lib.Catalog.from_dataset(prepared, domain=config.encoder.data.domain)
  data = examples_lib.build_task_data(config, prepared, catalog)
  engine = loading.load_engine(config, args.workdir, store=store_lib.MemoryStore())
  window = int(config.tasks.window)
  test = data.test["fav_genre"][:args.users]
  hits, answers = 0, collections.Counter()
  for ex in test:
    rec = prepared[ex.user_index]
    lo = max(0, ex.cut - window)
    events = [{"item_id": int(rec["item"][t]), "timestamp": int(rec["timestamp"][t]),
               "rating": catalog.rating_names[int(rec["rating"][t])]}
              for t in range(lo, ex.cut)]
    user = f"test-{ex.user_index}"
    engine.append(user, events)
    out = engine.generate_batch([engine.make_request({"user_id": user, "task": "fav_genre"})])
    gid = out[0]["genre_id"]
    hits += int(gid == ex.target_id)
    answers[catalog.genre_names[gid] if gid is not None else None] += 1

  job = None
  res_path = os.path.join(args.workdir, "results.json")
  if os.path.exists(res_path):
    method = loading.served_method(config)
    rows = json.load(open(res_path, encoding="utf-8"))["sweep"].get(method, [])
    job = next((r.get("genre_accuracy") for r in rows if r["history_len"] == window), None)
  print(f"method {loading.served_method(config)}, {len(test)} test users, history {window}")
  print(f"served genre accuracy {hits / len(test):.3f}; the job's "
        f"{'(not in results.json)' if job is None else f'{job:.3f}'} "
        f"(on all {len(data.test['fav_genre'])} test users)")
  print("answers:", ", ".join(f"{k} {v}" for k, v in answers.most_common(6)))


if __name__ == "__main__":
  main()
