"""End to end: the User-LLM job on synthetic planted data with a tiny encoder and a tiny Gemma."""

import importlib.util
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from userllm_jax.data import tasks as tasks_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config(methods=("userllm_soft_prompt",), steps=120):
  c = _load("userllm_movielens_100k")
  c.methods = methods
  c.data.name = "synthetic"
  c.data.domain = "synthetic"
  c.data.settings = ml_collections.ConfigDict({"reader_kwargs": dict(
      num_users=240, num_items=60, num_genres=4, mean_length=24.0, min_length=12, seed=3,
      p_markov=0.2, p_favourite=0.9, with_reviews=False)})
  c.tasks.names = ("fav_genre", "next_item")
  c.tasks.window = 12
  c.tasks.history_lengths = (4, 12)
  c.tasks.num_test_users = 40
  c.tasks.min_history = 6
  c.tasks.stride = 3
  c.tasks.max_examples_per_user = 2
  c.tasks.max_train_users = 0
  c.encoder.max_len = 12
  c.encoder.model.embed_dim = 32
  c.encoder.model.num_layers = 1
  c.encoder.model.dropout = 0.0
  c.encoder_train.steps = 60
  c.encoder_train.batch_size = 32
  c.encoder_train.lr = 3e-3
  c.llm.name = "tiny"
  # The tiny preset has a 4-token sliding window: widen it so the prompt sees the soft prompt.
  c.llm.tiny = ml_collections.ConfigDict(dict(num_layers=2, embed_dim=32, mlp_dim=64,
                                              sliding_window=64))
  # A random tiny LLM knows no language: let it train too (the 270M config freezes Gemma).
  c.userllm.strategy = "full"
  c.userllm.use_perceiver = False  # the T item embeddings are the user tokens
  c.userllm.num_latents = 4
  c.userllm.perceiver_head_dim = 8
  c.userllm.xattn_every = 1
  c.userllm.xattn_num_heads = 2
  c.userllm.xattn_head_dim = 8
  c.userllm.xattn_mlp_dim = 32
  c.tp.budget_tokens = 96
  c.max_prompt_tokens = 16
  c.max_target_tokens = 8
  c.train.steps = steps
  c.train.batch_size = 16
  c.train.lr = 3e-3
  c.train.warmup_steps = 5
  c.train.log_every = 20
  c.eval.beams = 4
  c.eval.ks = (1, 4)
  c.eval.batch_size = 20
  return c


def test_job_end_to_end_learns_favourite_genre(tmp_path):
  from userllm_jax.jobs import userllm_job
  cfg = tiny_config()
  res = userllm_job.run(cfg, str(tmp_path))
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["table"] == res["table"]
  m = res["methods"]["userllm_soft_prompt"]
  # 4 genres: chance is ~0.25 (the favourite is computed from the history, so a model that
  # reads the user embedding can do much better).
  assert m["genre_accuracy"] >= 0.6, m
  assert m["train"]["final_loss"] < m["train"]["first_loss"]
  # Constrained beams are always catalogue titles; Recall@K is monotone in K.
  assert m["next_item_catalogue_beams"] == 1.0
  assert m["recall@1"] <= m["recall@4"]
  assert {r["history_len"] for r in res["sweep"]["userllm_soft_prompt"]} == {4, 12}
  assert m["gflops_per_example"] > 0 and m["prompt_tokens"] > 0


def test_job_runs_all_three_methods_on_the_same_users(tmp_path):
  """Cross-attention, soft prompt and TP run through the job; TP pays for the history in tokens."""
  from userllm_jax.jobs import userllm_job
  cfg = tiny_config(methods=("userllm_xattn", "userllm_soft_prompt", "tp_lora"), steps=3)
  cfg.tasks.num_test_users = 8
  cfg.tasks.history_lengths = (12,)
  cfg.encoder_train.steps = 10
  cfg.eval.batch_size = 8
  res = userllm_job.run(cfg, str(tmp_path))
  methods = res["methods"]
  assert set(methods) == {"userllm_xattn", "userllm_soft_prompt", "tp_lora"}
  for name, m in methods.items():
    assert np.isfinite(m["train"]["final_loss"]), (name, m["train"])
    assert 0.0 <= m["genre_accuracy"] <= 1.0 and 0.0 <= m["recall@1"] <= m["recall@4"] <= 1.0
    assert m["next_item_catalogue_beams"] == 1.0, name
  # The text prompt carries the history; the User-LLM prompt does not.
  tp, xattn = methods["tp_lora"], methods["userllm_xattn"]
  assert tp["prompt_tokens"] > 2 * xattn["prompt_tokens"], (tp["prompt_tokens"],
                                                            xattn["prompt_tokens"])
  assert tp["gflops_per_example"] > xattn["gflops_per_example"]
  assert json.loads((tmp_path / "results.json").read_text())["table"] == res["table"]
