"""The User-LLM main job: stage 1, stage 2 (every method), evaluation and report, in order.

    python -m userllm_jax.main --config=configs/userllm_movielens_100k.py --workdir=runs/main

1. Stage 1 (``jobs/encoder_job.py`` with ``config.encoder``, an encoder-job config as is):
   prepare the data, pretrain the user encoder in ``WORKDIR/stage1``.
2. The LLM and the stage-2 examples (``stage2/llm.py``, ``stage2/examples.py``).
3. Baselines on the test users (``stage2/baselines.py``).
4. For each of ``config.methods``: train (``stage2/methods.py``), evaluate at every history
   length (``stage2/evaluate.py``); its results go to ``WORKDIR/<method>/results.json``,
   and a re-run skips a method whose results are there.
5. Report (``stage2/report.py``): the printed tables, ``WORKDIR/results.json``,
   ``WORKDIR/generations/``, the plots.

Scale-out: stage 2 runs on one mesh (``config.mesh``, ``train/mesh.py``) for the whole job:
the LLM is loaded straight onto it, every method trains on it (each process reads its rows of
every global batch: ``stage2/examples.training_stream``) and is evaluated on it (rows split
over the data-parallel devices, results on every process: ``stage2/evaluate.py``); process 0
writes the files.

Preemption (``train/preemption.py``): a SIGTERM stops the job at the next safe point with exit
status 0 -- a training step (after a checkpoint), an evaluation batch, or between stages and
methods; the re-run in the same workdir skips finished stage 1 and finished methods.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from userllm_jax import paths
from userllm_jax.data import tasks as tasks_lib
from userllm_jax.stage2 import baselines as baselines_lib
from userllm_jax.stage2 import distill as distill_lib
from userllm_jax.stage2 import evaluate as eval_lib
from userllm_jax.stage2 import examples as examples_lib
from userllm_jax.stage2 import llm as llm_lib
from userllm_jax.stage2 import loss as loss_lib
from userllm_jax.stage2 import methods as methods_lib
from userllm_jax.stage2 import report as report_lib
from userllm_jax.stage2 import trunk as trunk_lib
from userllm_jax.train import mesh as mesh_lib
from userllm_jax.train import preemption


def history_lengths(config) -> list[int]:
  """The evaluated history lengths (always including the window); validated."""
  window = int(config.tasks.window)
  hl = sorted({int(h) for h in config.tasks.history_lengths} | {window})
  if hl[0] < 1 or hl[-1] > window:
    raise ValueError(f"config.tasks.history_lengths {tuple(config.tasks.history_lengths)} must "
                     f"lie in [1, tasks.window={window}]")
  if int(config.encoder.data.max_len) < window:
    raise ValueError(f"config.encoder.data.max_len={config.encoder.data.max_len} < "
                     f"config.tasks.window={window}: the encoder's positions must cover the "
                     "stage-2 window; raise encoder.data.max_len")
  return hl


def run(config, workdir: str) -> dict:
  """Runs the whole job; returns (and writes to ``workdir/results.json``) the results."""
  from userllm_jax.jobs import encoder_job  # pylint: disable=g-import-not-at-top
  t_start = time.time()
  paths.makedirs(workdir)
  for m in config.methods:
    methods_lib.parse_method(m, config)
  hl = history_lengths(config)
  timings: dict[str, float] = {}

  s1, encoder, prepared = encoder_job.train_and_evaluate(config.encoder,
                                                         paths.join(workdir, "stage1"))
  stage1 = {k: s1.get(k) for k in ("train", "test", "dataset")}
  timings["stage1_s"] = time.time() - t_start
  preemption.exit_if_requested("after stage 1")
  mesh = mesh_lib.make_mesh(config.get("mesh", None))
  catalog = tasks_lib.Catalog.from_dataset(prepared, domain=config.encoder.data.domain)
  data = examples_lib.build_task_data(config, prepared, catalog)
  review_texts = [x for e in data.train + [e for v in data.test.values() for e in v]
                  if e.task == "review" for x in (e.prompt, e.target)]
  t0 = time.time()
  gemma, tokenizer = llm_lib.load_llm(config, catalog, extra_texts=review_texts, mesh=mesh)
  timings["load_llm_s"] = time.time() - t0
  answers = eval_lib.AnswerSets.build(catalog, tokenizer, gemma.cfg.vocab_size)
  vocab_ids, answer_tries = loss_lib.loss_vocabulary(config, answers, eos_id=tokenizer.eos_id)

  t0 = time.time()
  baselines: dict[str, Any] = {
      "majority_genre": baselines_lib.majority_genre(config, data),
      "popularity": baselines_lib.popularity(config, data, catalog,
                                             encoder_job.train_item_counts(prepared)),
      "encoder_topk": [baselines_lib.encoder_topk(config, data, catalog, encoder, h)
                       for h in hl if "next_item" in examples_lib.tasks_at(config, h)],
  }
  timings["baselines_s"] = time.time() - t0

  results: dict[str, Any] = {
      "config": config.to_dict(), "stage1": stage1, "num_train_examples": len(data.train),
      "num_test_users": int(len(data.test_users)),
      "num_test_examples": {k: len(v) for k, v in data.test.items()},
      "answer_vocabulary": None if vocab_ids is None else int(len(vocab_ids)),
      "baselines": baselines, "methods": {}, "sweep": {}}
  # User-LLM methods train on the same examples with the encoder's soft targets when
  # train.distill_weight > 0 (stage2/distill.py); TP reads text only.
  distill = loss_lib.distill_weight(config) > 0 and distill_lib.TASK in config.tasks.names
  ul_train = distill_lib.attach_teacher(config, encoder, data.train) if distill else data.train
  # Validation users (tasks.num_valid_users): User-LLM's held-out loss during training, with
  # the users and with them zeroed (train.eval_every; methods.heldout_eval_fn).
  valid = [e for v in data.valid.values() for e in v]
  ul_valid = distill_lib.attach_teacher(config, encoder, valid) if distill else valid
  budget_note = None
  ul_flops = None
  for name in config.methods:
    done_path = paths.join(workdir, name, "results.json")
    if paths.path(done_path).exists():
      logging.info("%s: results found in %s; skipping", name, done_path)
      done = json.loads(paths.read_text(done_path))
    else:
      preemption.exit_if_requested(f"before method {name}")
      spec = methods_lib.build_method(config, name, encoder=encoder, gemma=gemma,
                                      tokenizer=tokenizer, catalog=catalog)
      train_examples = ul_train if spec.kind == "userllm" else data.train
      trunk = trunk_lib.for_method(config, spec, gemma)
      per_step, steps, note = _budget(config, spec, train_examples, tokenizer, vocab_ids,
                                      answer_tries, ul_flops, trunk)
      budget_note = note or budget_note
      t0 = time.time()
      tm = methods_lib.train_method(config, spec, workdir, train_examples, tokenizer,
                                    vocab_ids=vocab_ids, answer_tries=answer_tries,
                                    steps=steps, mesh=mesh,
                                    heldout=ul_valid if spec.kind == "userllm" else None,
                                    trunk=trunk)
      train_s = time.time() - t0
      # The cached trunk's computations are training compute too (stage2/trunk.py).
      trunk_flops = 0.0 if trunk is None else trunk.flops
      tm.train_info.update(step_flops=per_step,
                           train_flops=per_step * tm.train_info["steps"] + trunk_flops,
                           budget_note=note)
      t0 = time.time()
      sweep = [eval_lib.evaluate_method(config, tm, data, tokenizer, answers, h) for h in hl]
      done = {"train": tm.train_info, "train_s": train_s, "eval_s": time.time() - t0,
              "sweep": sweep}
      if jax.process_index() == 0:
        paths.write_atomic(done_path, json.dumps(done, default=_json_default))
      del tm
    if name.startswith("userllm_") and ul_flops is None:
      ul_flops = done["train"]["train_flops"]
    budget_note = done["train"].get("budget_note") or budget_note
    timings[f"{name}_train_s"] = done["train_s"]
    timings[f"{name}_eval_s"] = done["eval_s"]
    generations: dict[str, list] = {}
    for r in done["sweep"]:
      for task, rows in r.pop("generations", {}).items():
        generations.setdefault(task, []).extend(rows)
    if jax.process_index() == 0:
      for task, rows in generations.items():
        paths.write_atomic(paths.join(workdir, "generations", f"{name}_{task}.jsonl"),
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    main = next(r for r in done["sweep"] if r["history_len"] == int(config.tasks.window))
    results["methods"][name] = {"train": done["train"], **main}
    results["sweep"][name] = [{k: v for k, v in r.items() if k != "examples"}
                              for r in done["sweep"]]

  window = int(config.tasks.window)
  base_rows = {"majority genre": baselines["majority_genre"],
               "popularity": baselines["popularity"]}
  enc_main = [r for r in baselines["encoder_topk"] if r.get("history_len") == window]
  if enc_main:
    base_rows["stage-1 encoder top-K"] = enc_main[0]
  table = report_lib.format_table(results["methods"], base_rows)
  ratios = report_lib.ratio_rows(results["sweep"])
  header = (f"User-LLM results ({config.encoder.data.name}, {config.llm.name}, "
            f"{len(data.test_users)} test users, history window {window}; "
            f"95% intervals in brackets; latency per example, batch {config.eval.batch_size})")
  if budget_note:
    header += f"\n{budget_note}"
  print(f"\n{header}:\n{table}\n\n{report_lib.format_ratios(ratios)}\n", flush=True)
  results.update(table=table, table_header=header, ratios=ratios)
  results["plots"] = (report_lib.write_plots(workdir, results["sweep"], baselines)
                      if jax.process_index() == 0 else [])
  timings["total_s"] = time.time() - t_start
  results["timings"] = timings
  if jax.process_index() == 0:
    paths.write_atomic(paths.join(workdir, "results.json"),
                       json.dumps(results, indent=2, default=_json_default))
  logging.info("timings: %s", timings)
  return results


def _budget(config, spec, train_examples, tokenizer, vocab_ids, answer_tries, ul_flops,
            trunk=None):
  """(FLOPs per training step, steps or None for the section's own, a note for the header).

  FLOPs come from ``methods.train_step_flops`` for every method alike (the mean over the
  first 16 batches of its stream: one-task batches differ in length); with
  ``tp.budget='flops'`` TP trains for the steps that buy the first User-LLM method's
  training FLOPs.  With a ``trunk`` cache the step is the one that starts from it.
  """
  target_len, _ = examples_lib.target_budgets(config)
  bs = int(spec.train.batch_size)
  per_step = _mean_step_flops(config, spec, train_examples, tokenizer, bs, target_len,
                              vocab_ids, answer_tries, trunk)
  if spec.kind != "tp" or str(config.tp.get("budget", "steps")) != "flops":
    return per_step, None, None
  if ul_flops is None:
    raise ValueError("config.tp.budget='flops' needs a User-LLM method before tp_lora in "
                     "config.methods (its training FLOPs set TP's budget)")
  steps = max(1, int(ul_flops // per_step))
  note = (f"TP trained on the same training compute as the first User-LLM method: "
          f"{ul_flops / 1e12:.1f} TFLOPs = {steps} TP steps of {per_step / 1e9:.0f} GFLOPs "
          f"(batch {bs})")
  logging.info(note)
  return per_step, steps, note


def _mean_step_flops(config, spec, train_examples, tokenizer, bs, target_len, vocab_ids,
                     answer_tries, trunk=None, num_batches: int = 16) -> float:
  prompts = [spec.prompt_fn(e) for e in train_examples]
  stream = examples_lib.training_stream(config, train_examples, prompts, tokenizer,
                                        max_prompt_tokens=spec.max_prompt_tokens,
                                        batch_size=bs, answer_tries=answer_tries, trunk=trunk)
  by_shape: dict = {}
  total = 0.0
  nproc = jax.process_count()
  for _ in range(num_batches):
    # This process's rows of the global batch: the step's FLOPs are the global batch's.
    batch = {k: jax.ShapeDtypeStruct((np.shape(v)[0] * nproc,) + np.shape(v)[1:],
                                     np.asarray(v).dtype) for k, v in next(stream).items()}
    key = tuple(sorted((k, v.shape) for k, v in batch.items()))
    if key not in by_shape:
      by_shape[key] = methods_lib.train_step_flops(spec, batch, max_target_tokens=target_len,
                                                   vocab_ids=vocab_ids)
    total += by_shape[key]
  return total / num_batches


def _json_default(o):
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)
