"""Stage 2 end to end on planted synthetic data with a tiny encoder and a tiny Gemma."""

import dataclasses
import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def tiny_config():
  spec = importlib.util.spec_from_file_location("c", CONFIG_DIR / "userllm_movielens_100k.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


def test_both_modes_learn_to_use_the_user(tmp_path):
  """Favourite genre on planted data: each trained mode beats itself with the user zeroed
  (cross-attention on the full-vocabulary loss, the soft prompt on the default
  trie-normalised one)."""
  from userllm_jax.data import tasks as tasks_lib
  from userllm_jax.jobs import encoder_job
  from userllm_jax.stage2 import evaluate as eval_lib
  from userllm_jax.stage2 import examples as examples_lib
  from userllm_jax.stage2 import llm as llm_lib
  from userllm_jax.stage2 import loss as loss_lib
  from userllm_jax.stage2 import methods as methods_lib
  cfg = tiny_config()
  cfg.tasks.names = ("fav_genre",)
  cfg.tasks.history_lengths = (12,)
  cfg.train.steps = 240       # cross-attention needs ~2x the soft prompt's steps here
  cfg.train.eval_every = cfg.train.steps      # held-out loss once, at the end
  _, encoder, prepared = encoder_job.train_and_evaluate(cfg.encoder, str(tmp_path / "stage1"))
  catalog = tasks_lib.Catalog.from_dataset(prepared, domain=cfg.encoder.data.domain)
  data = examples_lib.build_task_data(cfg, prepared, catalog)
  gemma, tok = llm_lib.load_llm(cfg, catalog)
  answers = eval_lib.AnswerSets.build(catalog, tok, gemma.cfg.vocab_size)
  chance = 1.0 / len(answers.genre_ids)
  # The soft prompt with the config's (default) trie-normalised loss: genre targets of one token.
  assert cfg.train.loss_vocab == "trie"
  trie_vocab, tries = loss_lib.loss_vocabulary(cfg, answers, eos_id=tok.eos_id)
  for name, vocab, at in (("userllm_xattn", None, None),
                          ("userllm_soft_prompt", trie_vocab, tries)):
    spec = methods_lib.build_method(cfg, name, encoder=encoder, gemma=gemma, tokenizer=tok,
                                    catalog=catalog)
    tm = methods_lib.train_method(cfg, spec, str(tmp_path), data.train, tok, vocab_ids=vocab,
                                  answer_tries=at, heldout=data.test["fav_genre"])
    assert tm.train_info["final_loss"] < tm.train_info["first_loss"]
    # The held-out loss (methods.heldout_eval_fn) shows it too: lower with the users.
    (step, held), = tm.train_info["heldout"]
    assert step == cfg.train.steps
    # (By a margin on the trie-normalised loss, the one-token genre softmax; the full-vocabulary
    # NLL also scores the EOS after each genre name, which the user does not change.)
    margin = 0.3 if at is not None else 0.0
    assert held["fav_genre_nll"] < held["fav_genre_nll_users_zeroed"] - margin, (name, held)
    got = eval_lib.evaluate_method(cfg, tm, data, tok, answers, 12)
    ablated = methods_lib.TrainedMethod(dataclasses.replace(spec, ablate_users=True), tm.model,
                                        tm.train_info)
    zero = eval_lib.evaluate_method(cfg, ablated, data, tok, answers, 12)
    acc, acc0 = got["genre_accuracy"], zero["genre_accuracy"]
    # With the user zeroed the model can only answer from the prompt (one genre for all):
    # about the majority share.  Reading the user, it must do far better.
    assert acc >= 0.6 and acc >= acc0 + 0.25, (name, acc, acc0, chance)
    lo, hi = got["genre_accuracy_ci"]
    assert lo <= acc <= hi and got["fav_genre_n"] == len(data.test["fav_genre"])


def test_job_runs_every_method_on_the_same_users_and_resumes(tmp_path, monkeypatch):
  """Cross-attention and TP through the job (the soft prompt trains and is evaluated above);
  TP pays for the history in tokens; a SIGTERM during an evaluation exits 0 at the next
  batch, keeping the finished methods; a re-run skips finished methods and reports the same
  results.

  (The same through ``python -m userllm_jax.main``, compared with an uninterrupted run:
  tests/test_main_distributed.py, ``--runslow``.)"""
  import signal
  from userllm_jax.jobs import userllm_job
  from userllm_jax.stage2 import evaluate as eval_lib
  from userllm_jax.train import preemption
  cfg = tiny_config()
  cfg.methods = ("userllm_xattn", "tp_lora")
  cfg.train.steps = 3
  cfg.tp.budget = "flops"
  cfg.tasks.num_test_users = 8
  cfg.tasks.history_lengths = (4, 12)
  cfg.tasks.window_only = ("next_item",)     # next item at the window (12) only
  cfg.tp.batch_size = 8                      # TP's own batch (train.batch_size is 16)
  cfg.encoder.train.steps = 10
  cfg.eval.batch_size = 8
  # Validation users' held-out loss at the end; User-LLM distils the encoder's next-item
  # distribution and reads its user vector as one more token, TP reads text only.
  cfg.tasks.num_valid_users = 8
  cfg.train.eval_every = 3
  cfg.train.distill_weight = 0.5
  cfg.userllm.user_vector_token = True
  # SIGTERM (the real signal, the job-wide handler) while TP's first evaluation batch runs:
  # the job stops before the next batch, with cross-attention finished.
  progress = eval_lib.progress

  def sigterm_in_tp(iterable, desc, total=None):
    for i, x in enumerate(progress(iterable, desc, total)):
      if desc.startswith("tp_lora/") and i == 0:
        os.kill(os.getpid(), signal.SIGTERM)
      yield x

  monkeypatch.setattr(eval_lib, "progress", sigterm_in_tp)
  with preemption.scope(), pytest.raises(SystemExit) as stop:
    userllm_job.run(cfg, str(tmp_path))
  assert stop.value.code == 0
  assert (tmp_path / "userllm_xattn" / "results.json").exists()
  assert not (tmp_path / "tp_lora" / "results.json").exists()
  assert not (tmp_path / "results.json").exists()
  monkeypatch.setattr(eval_lib, "progress", progress)
  res = userllm_job.run(cfg, str(tmp_path))
  methods = res["methods"]
  assert set(methods) == {"userllm_xattn", "tp_lora"}
  (_, held_ul), = methods["userllm_xattn"]["train"]["heldout"]
  assert {"next_item_distill_ce", "next_item_nll_users_zeroed", "fav_genre_nll",
          "next_item_distill_ce_users_zeroed"} <= set(held_ul)
  assert methods["tp_lora"]["train"]["heldout"] == []      # User-LLM's question only
  for name, m in methods.items():
    assert np.isfinite(m["train"]["final_loss"]), (name, m["train"])
    assert 0.0 <= m["genre_accuracy"] <= 1.0 and 0.0 <= m["recall@1"] <= m["recall@4"] <= 1.0
    for key in ("next_item_ttft_ms", "next_item_ms", "fav_genre_ttft_ms", "fav_genre_ms"):
      assert m[key] > 0, (name, key)
    assert m["next_item_ms"] >= m["next_item_ttft_ms"]
  # The text prompt carries the history; the User-LLM prompt does not.
  tp, xattn = methods["tp_lora"], methods["userllm_xattn"]
  assert tp["prompt_tokens"] > 2 * xattn["prompt_tokens"]
  assert tp["gflops_per_example"] > xattn["gflops_per_example"]
  # Equal training compute: TP trains for the steps (at least 1) that the first User-LLM
  # method's training FLOPs buy at TP's FLOPs per step.
  ul_flops = methods["userllm_xattn"]["train"]["train_flops"]
  assert tp["train"]["step_flops"] > methods["userllm_xattn"]["train"]["step_flops"]
  assert tp["train"]["steps"] == max(1, int(ul_flops // tp["train"]["step_flops"]))
  assert "same training compute" in res["table_header"]
  assert tp["train"]["batch_size"] == 8 and xattn["train"]["batch_size"] == 16
  # tasks.window_only: next item is evaluated at the window, genre at every length.
  for name, rows in res["sweep"].items():
    by_len = {r["history_len"]: r for r in rows}
    assert set(by_len) == {4, 12}, name
    assert "genre_accuracy" in by_len[4] and "recall@1" not in by_len[4], (name, by_len[4])
    assert "recall@1" in by_len[12] and "genre_accuracy" in by_len[12]
  # Baselines and ratios on the same users.
  assert res["baselines"]["majority_genre"]["n"] == res["num_test_examples"]["fav_genre"]
  assert {r["history_len"] for r in res["baselines"]["encoder_topk"]} == {12}
  assert {(r["method"], r["history_len"]) for r in res["ratios"]} >= {("userllm_xattn", 12)}
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["table"] == res["table"]
  for plot in ("quality_vs_history.png", "latency_vs_history.png", "gflops_vs_history.png"):
    assert (tmp_path / plot).stat().st_size > 0
  # A re-run finds every method's results and trains nothing.
  before = {m: os.path.getmtime(tmp_path / m / "results.json") for m in cfg.methods}
  res2 = userllm_job.run(cfg, str(tmp_path))
  assert res2["table"] == res["table"]
  assert before == {m: os.path.getmtime(tmp_path / m / "results.json") for m in cfg.methods}


def test_tasks_at_history_lengths():
  """``tasks.window_only``: those tasks at the window only; a name not in the tasks raises."""
  from userllm_jax.stage2 import examples as examples_lib
  cfg = tiny_config()
  assert examples_lib.tasks_at(cfg, 4) == examples_lib.tasks_at(cfg, 12) == (
      "fav_genre", "next_item")
  cfg.tasks.window_only = ("next_item",)
  assert examples_lib.tasks_at(cfg, 4) == ("fav_genre",)
  assert examples_lib.tasks_at(cfg, 12) == ("fav_genre", "next_item")
  cfg.tasks.window_only = ("review",)
  with pytest.raises(ValueError, match="window_only"):
    examples_lib.tasks_at(cfg, 4)
