"""Runs the stage-1 encoder job over a list of config overrides, in parallel; prints one table.

    python benchmarks/sweep_encoder.py --sweep=benchmarks/encoder_sweep_short.txt \
        [--config=configs/encoder_movielens_100k.py] [--parallel=4] [--out=sweep.json] \
        [--workdir=DIR] [--only=name1,name2]

Every run is the real job, ``python -m userllm_jax.main --config=CONFIG --workdir=DIR/<name>
COMMON <line's overrides>`` (jobs/encoder_job.py: the same data preparation, Grain pipeline,
training loop and full-ranking evaluation as the README's stage-1 command), so a swept figure
is what the job gives with those overrides.  The sweep file holds one ``name | overrides``
line per run (``#`` starts a comment), e.g.

    sas_800_lr2 | --config.model.features="('item',)" --config.train.steps=800

COMMON (below) comes first, so a line's overrides win.  Every run reports, on the test split
at its last step, HR@10 / NDCG@10 with already-seen items excluded and kept (RecBole's
protocol for sequential models), the popularity baseline, and the step with the best periodic
validation NDCG@10 (``train.eval_every``).  On one GPU the runs share the device (no
preallocation).
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
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from userllm_jax import paths  # pylint: disable=wrong-import-position
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "encoder_movielens_100k.py")
# Periodic validation, so that the best-valid step can be reported.
COMMON = "--config.train.eval_every=200"


def read_sweep(path: str) -> list[tuple[str, str]]:
  runs = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      if "|" not in line:
        raise ValueError(f"{path}:{n}: expected 'name | overrides', got {line!r}")
      name, flags = (x.strip() for x in line.split("|", 1))
      bad = [f for f in shlex.split(flags) if not f.startswith("--config.")]
      if bad:
        raise ValueError(f"{path}:{n}: {name}: overrides must be --config.<field>=<value>, "
                         f"got {bad}")
      runs.append((name, flags))
  return runs


def command(config: str, workdir: str, flags: str) -> list[str]:
  return ([sys.executable, "-m", "userllm_jax.main", f"--config={config}",
           f"--workdir={workdir}"] + shlex.split(COMMON) + shlex.split(flags))


def summarize(res: dict) -> dict:
  """The sweep's row from the job's results.json."""
  test, valid = res["test"], res["valid"]
  hist = res["train"].get("eval_history") or []
  best = max(hist, key=lambda h: h.get("ndcg@10", -1.0)) if hist else None
  return {
      "test": {"hr@10": test["model"]["hr@10"], "ndcg@10": test["model"]["ndcg@10"],
               "hr@10_all": test["model_seen_kept"]["hr@10"],
               "ndcg@10_all": test["model_seen_kept"]["ndcg@10"]},
      "test_popularity": {"hr@10": test["popularity"]["hr@10"],
                          "ndcg@10": test["popularity"]["ndcg@10"]},
      "valid": {"hr@10": valid["model"]["hr@10"], "ndcg@10": valid["model"]["ndcg@10"]},
      "best_valid_step": best["step"] if best else None,
      "best_valid_ndcg@10": best.get("ndcg@10") if best else None,
      "steps": res["train"]["steps"], "final_loss": res["train"]["final_loss"],
      "job_wall_s": res.get("wall_s"),
  }


def run_one(name: str, flags: str, config: str, workdir: str, timeout: float) -> dict:
  wd = os.path.join(workdir, name)
  cmd = command(config, wd, flags)
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  t0 = time.time()
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                       cwd=ROOT, check=False)
  except subprocess.TimeoutExpired:
    return {"name": name, "flags": flags, "error": f"timed out after {timeout:.0f} s"}
  path = os.path.join(wd, "results.json")
  if p.returncode != 0 or not os.path.exists(path):
    return {"name": name, "flags": flags, "error": f"exit {p.returncode}: {p.stderr[-2000:]}"}
  with open(path, encoding="utf-8") as f:
    r = summarize(json.load(f))
  r.update(name=name, flags=flags, command=shlex.join(cmd[1:]), wall_s=time.time() - t0)
  return r


HEAD = (f"{'run':<22} {'HR@10':>7} {'NDCG@10':>8} {'HR@10 all':>9} {'NDCG@10 all':>11} "
        f"{'pop HR@10':>9} {'best valid step':>15} {'wall s':>7}")


def row(r: dict) -> str:
  if "error" in r:
    return f"{r['name']:<22} ERROR"
  t = r["test"]
  return (f"{r['name']:<22} {t['hr@10']:>7.4f} {t['ndcg@10']:>8.4f} {t['hr@10_all']:>9.4f} "
          f"{t['ndcg@10_all']:>11.4f} {r['test_popularity']['hr@10']:>9.4f} "
          f"{str(r['best_valid_step']):>15} {r['wall_s']:>7.0f}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--sweep", default=os.path.join(HERE, "encoder_sweep_short.txt"))
  p.add_argument("--config", default=DEFAULT_CONFIG)
  p.add_argument("--parallel", type=int, default=1)
  p.add_argument("--timeout", type=float, default=3600)
  p.add_argument("--workdir", default=None, help="keep each run's workdir here (default: temp)")
  p.add_argument("--only", default="", help="comma-separated run names to run (default: all)")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  runs = read_sweep(args.sweep)
  if args.only:
    keep = set(args.only.split(","))
    unknown = keep - {n for n, _ in runs}
    if unknown:
      p.error(f"--only: no such run(s) in {args.sweep}: {sorted(unknown)}")
    runs = [(n, f) for n, f in runs if n in keep]
  results = []
  with tempfile.TemporaryDirectory() as tmp, \
      concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    workdir = args.workdir or tmp
    futs = [pool.submit(run_one, n, f, args.config, workdir, args.timeout) for n, f in runs]
    for fut in concurrent.futures.as_completed(futs):
      r = fut.result()
      results.append(r)
      print(f"done {r['name']} ({r.get('wall_s', 0):.0f} s): " +
            (f"ERROR {r['error'][-300:]}" if "error" in r else row(r)), flush=True)
  order = {n: i for i, (n, _) in enumerate(runs)}
  results.sort(key=lambda r: order[r["name"]])
  print("\ntest split, last step; 'all' = already-seen items kept (RecBole's protocol)")
  print(HEAD)
  for r in results:
    print(row(r))
  if args.out:
    paths.write_atomic(args.out, json.dumps(results, indent=1, default=str))
  return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
