"""Runs benchmarks/tune_encoder.py over a list of settings in parallel and prints one table.

    python benchmarks/sweep_encoder.py --data_dir=DIR/ml-100k --sweep=benchmarks/encoder_sweep.txt \
        --parallel=8 --out=sweep.json

The sweep file holds one ``name | flags`` line per run (``#`` starts a comment); COMMON flags
below come first, so a line's flags override them.  Every run reports test HR@10 / NDCG@10 at
its last step with already-seen items excluded and kept (RecBole's protocol for sequential
models), and at the step with the best validation NDCG@10.  On one GPU the runs share the
device (no preallocation).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# The ml-100k default (configs/encoder_movielens_100k.py) apart from the swept fields.
COMMON = ("--embed_dim 64 --num_layers 2 --num_heads 2 --mlp_dim 256 --max_len 50 "
          "--position learned --fusion early --batch_size 128 --lr 1e-3 --warmup_steps 50 "
          "--genre_weight 0.1 --rating_weight 0.1 --eval_every 200")


def read_sweep(path: str) -> list[tuple[str, str]]:
  runs = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      if "|" not in line:
        raise ValueError(f"{path}:{n}: expected 'name | flags', got {line!r}")
      name, flags = (x.strip() for x in line.split("|", 1))
      runs.append((name, flags))
  return runs


def run_one(name: str, flags: str, data_dir: str, tmp: str, timeout: float) -> dict:
  out = os.path.join(tmp, name + ".json")
  cmd = ([sys.executable, os.path.join(HERE, "tune_encoder.py"), "--data_dir", data_dir,
          "--out", out] + shlex.split(COMMON) + shlex.split(flags))
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  t0 = time.time()
  p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
  if p.returncode != 0:
    return {"name": name, "flags": flags, "error": p.stderr[-2000:]}
  with open(out, encoding="utf-8") as f:
    r = json.load(f)
  r.update(name=name, flags=flags, wall_s=time.time() - t0, log=p.stdout[-4000:])
  return r


HEAD = (f"{'run':<26} {'HR@10':>7} {'NDCG@10':>8} {'HR@10 all':>9} {'NDCG@10 all':>11} "
        f"{'best step':>9} {'HR@10*':>7} {'NDCG@10*':>8} {'train s':>7}")


def row(r: dict) -> str:
  if "error" in r:
    return f"{r['name']:<26} ERROR"
  t, b = r["final_test"], r["test_at_best_valid"]
  return (f"{r['name']:<26} {t['hr@10']:>7.4f} {t['ndcg@10']:>8.4f} {t['hr@10_all']:>9.4f} "
          f"{t['ndcg@10_all']:>11.4f} {r['best_valid_step']:>9} {b['hr@10']:>7.4f} "
          f"{b['ndcg@10']:>8.4f} {r['train_seconds']:>7.0f}")


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--sweep", default=os.path.join(HERE, "encoder_sweep.txt"))
  p.add_argument("--parallel", type=int, default=4)
  p.add_argument("--timeout", type=float, default=3600)
  p.add_argument("--out", default=None)
  args = p.parse_args()
  runs = read_sweep(args.sweep)
  results = []
  with tempfile.TemporaryDirectory() as tmp, \
      concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    futs = [pool.submit(run_one, n, f, args.data_dir, tmp, args.timeout) for n, f in runs]
    for fut in concurrent.futures.as_completed(futs):
      r = fut.result()
      results.append(r)
      print(f"done {r['name']} ({r.get('wall_s', 0):.0f} s): " +
            (f"ERROR {r['error'][-300:]}" if "error" in r else row(r)), flush=True)
  order = {n: i for i, (n, _) in enumerate(runs)}
  results.sort(key=lambda r: order[r["name"]])
  print("\ntest split; 'all' = already-seen items kept (RecBole); * = at the best valid NDCG@10")
  print(HEAD)
  for r in results:
    print(row(r))
  if args.out:
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1, default=str)
    os.replace(args.out + ".tmp", args.out)
  return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
