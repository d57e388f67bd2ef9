"""The stage-2 report: the table, the cost ratios, the plots, results.json.

The table shows each method at the full history window (metrics with their 95% intervals,
prompt tokens, GFLOPs, time to first token and end-to-end ms per example), then the
baselines on the same users; the ratio table shows, per history length, TP over each
User-LLM method for FLOPs, time to first token and end-to-end latency.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from absl import logging

QUALITY = ("recall@1", "recall@5", "recall@10", "genre_accuracy", "rougeL")
COST = ("prompt_tokens", "gflops_per_example", "next_item_ttft_ms", "next_item_ms",
        "fav_genre_ttft_ms", "fav_genre_ms", "review_ttft_ms", "review_ms")


def _fmt(r: dict, c: str) -> str:
  v = r.get(c)
  if not isinstance(v, (int, float)):
    return "-"
  ci = r.get(c + "_ci")
  if ci:
    return f"{v:.3f} [{ci[0]:.3f},{ci[1]:.3f}]"
  return f"{v:.4g}"


def _grid(head: list[str], rows: list[list[str]]) -> str:
  lines = [head] + rows
  widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
  fmt = lambda l: "  ".join(s.ljust(w) for s, w in zip(l, widths))
  return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in rows])


def format_table(rows: dict[str, dict], baselines: Optional[dict[str, dict]] = None) -> str:
  """Methods (and baselines) x metrics; intervals in brackets."""
  everything = list(rows.values()) + list((baselines or {}).values())
  cols = [c for c in QUALITY + COST if any(_fmt(r, c) != "-" for r in everything)]
  body = [[name] + [_fmt(r, c) for c in cols] for name, r in rows.items()]
  for name, r in (baselines or {}).items():
    cells = [_fmt(r, c) for c in cols]
    if any(x != "-" for x in cells):  # a baseline of a task that did not run has no row
      body.append([f"({name})"] + cells)
  return _grid(["method"] + cols, body)


def ratio_rows(sweep: dict[str, list[dict]]) -> list[dict[str, Any]]:
  """Per history length and User-LLM method: TP / User-LLM for FLOPs, TTFT, end to end."""
  tp = {r["history_len"]: r for r in sweep.get("tp_lora", [])}
  out = []
  for name, rs in sweep.items():
    if name == "tp_lora":
      continue
    for r in rs:
      t = tp.get(r["history_len"])
      if t is None:
        continue
      row = {"method": name, "history_len": r["history_len"]}
      for key, col in (("gflops_per_example", "flops"), ("next_item_ttft_ms", "next_item_ttft"),
                       ("next_item_ms", "next_item_e2e"), ("fav_genre_ttft_ms", "fav_genre_ttft"),
                       ("fav_genre_ms", "fav_genre_e2e"), ("review_ttft_ms", "review_ttft"),
                       ("review_ms", "review_e2e")):
        if r.get(key) and t.get(key):
          row[col] = t[key] / r[key]
      if "flops" in row:
        ttft = [row[c] for c in ("next_item_ttft", "fav_genre_ttft", "review_ttft") if c in row]
        if ttft:
          row["min_ttft_over_half_flops"] = min(ttft) / (0.5 * row["flops"])
      out.append(row)
  return out


def format_ratios(rows: list[dict[str, Any]]) -> str:
  if not rows:
    return ""
  cols = [c for c in ("flops", "next_item_ttft", "next_item_e2e", "fav_genre_ttft",
                      "fav_genre_e2e", "review_ttft", "review_e2e") if any(c in r for r in rows)]
  body = [[r["method"], str(r["history_len"])] + [f"{r[c]:.1f}x" if c in r else "-" for c in cols]
          for r in rows]
  return _grid(["TP / method", "history"] + cols, body)


def write_plots(workdir: str, sweep: dict[str, list[dict]],
                baselines: dict[str, Any]) -> list[str]:
  """quality_vs_history.png (error bars, baseline lines), latency_vs_history.png,
  gflops_vs_history.png in ``workdir``; [] without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("matplotlib not importable: no plots")
    return []
  import io  # pylint: disable=g-import-not-at-top
  from userllm_jax import paths  # pylint: disable=g-import-not-at-top
  written = []

  def save(fig, name):
    path = paths.join(workdir, name)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    paths.write_atomic(path, buf.getvalue())      # local or gs://, never half-written
    written.append(path)

  metrics = [m for m in ("recall@10", "recall@1", "genre_accuracy", "rougeL")
             if any(m in r for rs in sweep.values() for r in rs)]
  if metrics:
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
      for name, rs in sweep.items():
        xs = [r["history_len"] for r in rs]
        ys = np.array([r.get(m, np.nan) for r in rs], float)
        ci = np.array([r.get(m + "_ci", [np.nan, np.nan]) for r in rs], float)
        # (A Wilson bound at 0 or 1 can sit a rounding error past the estimate.)
        yerr = np.clip(np.stack([ys - ci[:, 0], ci[:, 1] - ys]), 0.0, None)
        ax.errorbar(xs, ys, yerr=np.nan_to_num(yerr), fmt="o-", capsize=3, label=name)
      ref = _baseline_lines(baselines, m)
      for (label, value), style in zip(ref, ("--", ":", "-.")):
        ax.axhline(value, color="gray", linestyle=style, label=label)
      enc = baselines.get("encoder_topk") or []
      if m.startswith("recall@") and enc:
        ax.plot([r["history_len"] for r in enc], [r.get(m, np.nan) for r in enc], "s:",
                color="black", label="stage-1 encoder top-K")
      ax.set_xlabel("history length (events)")
      ax.set_ylabel(m + " (95% CI)")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    save(fig, "quality_vs_history.png")
  for key, name, label in (("ms", "latency_vs_history.png", "ms per example"),
                           ("gflops_per_example", "gflops_vs_history.png", "GFLOPs per example")):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for mname, rs in sweep.items():
      xs = [r["history_len"] for r in rs]
      if key == "ms":
        for task, style in (("next_item", "o-"), ("fav_genre", "s--")):
          if any(f"{task}_ttft_ms" in r for r in rs):
            ax.plot(xs, [r.get(f"{task}_ttft_ms", np.nan) for r in rs], style,
                    label=f"{mname} {task} TTFT")
      else:
        ax.plot(xs, [r.get(key, np.nan) for r in rs], "o-", label=mname)
    ax.set_xlabel("history length (events)")
    ax.set_ylabel(label + (" (time to first token)" if key == "ms" else " (prefill)"))
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    save(fig, name)
  return written


def _baseline_lines(baselines: dict[str, Any], metric: str) -> list[tuple[str, float]]:
  out = []
  maj = baselines.get("majority_genre") or {}
  if metric in maj:
    out.append((f"majority genre ({maj.get('answer')})", maj[metric]))
  pop = baselines.get("popularity") or {}
  if metric in pop:
    out.append(("popularity", pop[metric]))
  return out
