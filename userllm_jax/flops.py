"""FLOPs per example: User-LLM (cross-attention, soft prompt) vs the text-prompt (TP) baseline.

    python -m userllm_jax.flops --config=configs/userllm_movielens_100k.py \
        --history_lengths=50,200,500 --out=flops.json

For every history length N it compiles (abstractly: no weights, nothing executed) and counts
with XLA's cost analysis, per example (see :mod:`userllm_jax.eval.flops` for the protocol;
logits at the last prompt position only, for TP and User-LLM alike):

* TP: the bare LLM over ``[BOS] + TP_HEADER + <N serialized history lines> + "\\n" + prompt``;
* User-LLM 'xattn' and 'soft_prompt': encoder over N items + Perceiver + projector + the LLM
  over ``[BOS] + prompt``.

Prompt token counts: the TP prompt is rendered by the real serializer
(``data.tasks.serialize_history``, no token budget: all N items) for real MovieLens-100k
histories (every user with at least N interactions, their last N, chronological) and tokenized
with the real tokenizer of ``config.llm.name``; the mean count is used.  Fallback (no tokenizer,
or no user with N interactions): ``header + N * tokens_per_item + prompt`` with
``tokens_per_item`` = :data:`FALLBACK_TOKENS_PER_ITEM`, measured with the Gemma 3 tokenizer on
all 100,000 ml-100k lines (``--measure_tokens_per_item`` recomputes it).  The JSON says which
source gave each count.

Config fields read: ``llm.preset`` (a ``models.gemma`` preset name such as ``gemma3-270m``, or
``tiny``), ``encoder.model`` (``EncoderConfig`` fields; vocabulary sizes default to
MovieLens-100k's), ``userllm`` (``UserLLMConfig`` fields; ``mode`` is set per variant),
``encoder.data.domain``.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from userllm_jax import paths

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).")
_HISTORY_LENGTHS = flags.DEFINE_list("history_lengths", ["50", "200", "500"],
                                     "History lengths N (items) to compare at.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_TASK = flags.DEFINE_enum("task", "next_item", ["next_item", "fav_genre"], "Prompt's task.")
_NO_TOKENIZER = flags.DEFINE_bool("no_tokenizer", False,
                                  "Use the documented tokens-per-item fallback.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", True,
                               "Also report where User-LLM's FLOPs go (xattn variant).")
_MEASURE = flags.DEFINE_bool("measure_tokens_per_item", False,
                             "Measure tokens per serialized ml-100k line and exit.")

# Mean Gemma 3 tokens per serialized MovieLens-100k history line ("Title (g1, g2), rated R"
# plus its "\n"), over all 100,000 ratings; measured by
# `python -m userllm_jax.flops --measure_tokens_per_item`.
FALLBACK_TOKENS_PER_ITEM = 19.9
# Gemma 3 tokenizer: [BOS] + the next-item prompt = 10 tokens; the TP header = 7 tokens.
FALLBACK_USERLLM_PROMPT_TOKENS = 10
FALLBACK_TP_OVERHEAD_TOKENS = 7   # "The user's history:\n"

ML100K_SIZES = dict(num_items=1684, num_genres=21, num_ratings=7, num_timegap_buckets=32)


def load_tokenizer(name: str):
  """The real tokenizer of ``name`` (cached embedded model: no weights are read)."""
  from userllm_jax.weights import Tokenizer  # pylint: disable=g-import-not-at-top
  if name == "gemma3-270m":
    from userllm_jax.weights import embedded  # pylint: disable=g-import-not-at-top
    return Tokenizer(embedded.load_cached(verbose=False)[2])
  from userllm_jax.weights import load_params  # pylint: disable=g-import-not-at-top
  return Tokenizer(load_params(name)[2])


def ml100k_histories() -> list[list[Any]]:
  """Every ml-100k user's HistoryItem list, chronological (stable on equal timestamps)."""
  from userllm_jax.data import tasks  # pylint: disable=g-import-not-at-top
  from userllm_jax.data.schema import ReadReport  # pylint: disable=g-import-not-at-top
  from userllm_jax.data.sources import read_dataset  # pylint: disable=g-import-not-at-top
  by_user = collections.defaultdict(list)
  for i, row in enumerate(read_dataset("movielens-100k", None, report=ReadReport())):
    r = row.rating
    rating = None if r is None else (str(int(r)) if float(r) == int(r) else f"{r:g}")
    item = tasks.HistoryItem(title=row.title or f"item {row.item}",
                             genres=tuple(row.genres or ()), rating=rating)
    by_user[row.user].append((row.timestamp, i, item))
  return [[it for _, _, it in sorted(v, key=lambda t: (t[0], t[1]))] for v in by_user.values()]


def measure_tokens_per_item(tokenizer, histories) -> float:
  from userllm_jax.data import tasks  # pylint: disable=g-import-not-at-top
  n = tokens = 0
  for h in histories:
    text = "\n".join(tasks.format_history_line(it) for it in h)
    tokens += len(tokenizer.encode(text)) + 1    # + the final "\n" before the prompt
    n += len(h)
  return tokens / n


def prompt_token_counts(lengths: Sequence[int], task: str, domain: str, tokenizer,
                        histories) -> dict[int, dict[str, Any]]:
  """Per N: User-LLM and TP prompt tokens (BOS included) and where the numbers come from."""
  from userllm_jax.data import tasks  # pylint: disable=g-import-not-at-top
  out = {}
  if tokenizer is not None:
    noun, verb, genre_noun = tasks.DOMAINS[domain]
    prompt = tasks.PROMPT_TEMPLATES[task].format(noun=noun, verb=verb, genre_noun=genre_noun,
                                                 title="")
    u_tokens = tasks.num_prompt_tokens(prompt, tokenizer)
  else:
    prompt, u_tokens = None, FALLBACK_USERLLM_PROMPT_TOKENS
  for n in lengths:
    fallback = round(FALLBACK_TP_OVERHEAD_TOKENS + u_tokens + FALLBACK_TOKENS_PER_ITEM * n)
    row = {"userllm_prompt_tokens": u_tokens}
    users = [h[-n:] for h in (histories or []) if len(h) >= n]
    if tokenizer is not None and users:
      counts = []
      for items in users:
        ser = tasks.serialize_history(items, tokenizer, budget_tokens=10**9)
        if ser.num_items != n:
          raise RuntimeError(f"serialize_history kept {ser.num_items} of {n} items")
        text = f"{tasks.TP_HEADER}{ser.text}\n{prompt}"
        counts.append(tasks.num_prompt_tokens(text, tokenizer))
      row.update(tp_prompt_tokens=int(round(float(sum(counts)) / len(counts))),
                 tp_prompt_tokens_min=int(min(counts)), tp_prompt_tokens_max=int(max(counts)),
                 tp_users=len(counts), tp_tokens_source="serializer+tokenizer (ml-100k users)")
    else:
      why = "no tokenizer" if tokenizer is None else f"no ml-100k user has {n} interactions"
      row.update(tp_prompt_tokens=fallback, tp_users=0,
                 tp_tokens_source=f"fallback {FALLBACK_TOKENS_PER_ITEM} tokens/item ({why})")
    out[n] = row
  return out


def model_configs(config):
  """(UserLLMConfig base, EncoderConfig, GemmaConfig) from an experiment config."""
  from userllm_jax.models import gemma as gemma_lib  # pylint: disable=g-import-not-at-top
  from userllm_jax.models.encoder import EncoderConfig  # pylint: disable=g-import-not-at-top
  from userllm_jax.models.userllm import UserLLMConfig  # pylint: disable=g-import-not-at-top
  gemma_cfg = gemma_lib.get_config(config.llm.get("preset", config.llm.name))
  if "dtype" in config.llm:
    gemma_cfg = gemma_cfg.replace(dtype=config.llm.dtype, param_dtype=config.llm.dtype)
  enc_fields = dict(config.encoder.model.to_dict()) if "encoder" in config else {}
  sizes = dict(ML100K_SIZES)
  sizes.update({k: v for k, v in enc_fields.items() if k in sizes})
  enc_fields.update(sizes)
  enc_fields.setdefault("dropout", 0.0)
  encoder_cfg = EncoderConfig.from_config(enc_fields)
  userllm_cfg = UserLLMConfig.from_config(config.userllm)
  return userllm_cfg, encoder_cfg, gemma_cfg


def run(config, history_lengths: Sequence[int], *, task: str = "next_item",
        use_tokenizer: bool = True, breakdown: bool = True) -> dict[str, Any]:
  """The comparison as a dict (see the module docstring)."""
  from userllm_jax.eval import flops as flops_lib  # pylint: disable=g-import-not-at-top
  userllm_cfg, encoder_cfg, gemma_cfg = model_configs(config)
  enc = config.get("encoder", None)
  domain = (enc.data.get("domain", "movielens") if enc is not None and "data" in enc
            else "movielens")
  tokenizer = histories = None
  if use_tokenizer:
    try:
      tokenizer = load_tokenizer(config.llm.name)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("flops: no tokenizer for %r (%s): using the fallback token counts",
                      config.llm.name, e)
    if tokenizer is not None and domain == "movielens":
      histories = ml100k_histories()
  counts = prompt_token_counts(history_lengths, task, domain, tokenizer, histories)
  rows = []
  for n in history_lengths:
    c = counts[n]
    row = {"history_length": n, **c}
    row["tp_flops"] = flops_lib.tp_forward_flops(gemma_cfg, c["tp_prompt_tokens"])
    for mode in ("xattn", "soft_prompt"):
      f = flops_lib.userllm_forward_flops(userllm_cfg.replace(mode=mode), encoder_cfg,
                                          gemma_cfg, n, c["userllm_prompt_tokens"])
      row[f"userllm_{mode}_flops"] = f
      row[f"ratio_tp_over_{mode}"] = row["tp_flops"] / f
    if breakdown:
      row["userllm_xattn_breakdown"] = flops_lib.component_flops(
          userllm_cfg.replace(mode="xattn"), encoder_cfg, gemma_cfg, n,
          c["userllm_prompt_tokens"])
    rows.append(row)
    logging.info("flops: N=%d done", n)
  return {
      "protocol": ("FLOPs per example from XLA cost analysis of the compiled forward; logits "
                   "at the last prompt position only; User-LLM = encoder(N items) + perceiver "
                   "+ projector + LLM(prompt); TP = LLM(prompt with N serialized items)"),
      "backend": _backend(), "task": task, "llm": config.llm.name,
      "userllm": {k: getattr(userllm_cfg, k) for k in
                  ("use_perceiver", "num_latents", "perceiver_layers", "xattn_every",
                   "xattn_num_heads", "xattn_head_dim", "xattn_mlp_dim", "strategy")},
      "encoder": {"embed_dim": encoder_cfg.embed_dim, "num_layers": encoder_cfg.num_layers,
                  "features": list(encoder_cfg.features)},
      "rows": rows,
  }


def _backend() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend()


def format_table(result: dict[str, Any]) -> str:
  head = (f"{'N':>5} {'TP tok':>7} {'UL tok':>6} {'TP GFLOP':>10} {'xattn GFLOP':>12} "
          f"{'soft GFLOP':>11} {'TP/xattn':>9} {'TP/soft':>8}")
  lines = [head, "-" * len(head)]
  for r in result["rows"]:
    lines.append(
        f"{r['history_length']:>5} {r['tp_prompt_tokens']:>7} {r['userllm_prompt_tokens']:>6} "
        f"{r['tp_flops'] / 1e9:>10.2f} {r['userllm_xattn_flops'] / 1e9:>12.3f} "
        f"{r['userllm_soft_prompt_flops'] / 1e9:>11.3f} {r['ratio_tp_over_xattn']:>9.1f} "
        f"{r['ratio_tp_over_soft_prompt']:>8.1f}")
  for r in result["rows"]:
    b = r.get("userllm_xattn_breakdown")
    if b:
      lines.append(f"N={r['history_length']} xattn breakdown (GFLOP): " + ", ".join(
          f"{k}={v / 1e9:.3f}" for k, v in b.items()))
  lines.append(f"TP token counts: {result['rows'][0]['tp_tokens_source']}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MEASURE.value:
    tok = load_tokenizer("gemma3-270m")
    print(f"tokens per serialized ml-100k line: "
          f"{measure_tokens_per_item(tok, ml100k_histories()):.3f}")
    return
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/userllm_movielens_100k.py")
  try:
    lengths = [int(x) for x in _HISTORY_LENGTHS.value]
  except ValueError as e:
    raise app.UsageError(f"--history_lengths: expected integers, got {_HISTORY_LENGTHS.value}"
                         ) from e
  if not lengths or min(lengths) < 1:
    raise app.UsageError(f"--history_lengths: expected positive integers, got {lengths}")
  result = run(_CONFIG.value, lengths, task=_TASK.value, use_tokenizer=not _NO_TOKENIZER.value,
               breakdown=_BREAKDOWN.value)
  print(format_table(result))
  if _OUT.value:
    paths.write_atomic(_OUT.value, json.dumps(result, indent=2))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
