"""The User-LLM main job on MovieLens 100k with Gemma 3 270M.

    python -m userllm_jax.main --config=configs/userllm_movielens_100k.py --workdir=runs/main
    python -m userllm_jax.main --config=configs/userllm_movielens_100k.py:full --workdir=DIR
    python -m userllm_jax.main --config=configs/userllm_movielens_100k.py:tiny --workdir=DIR

Stage 1 (the user encoder of configs/encoder_movielens_100k.py, as is), stage 2 (User-LLM:
the encoder's outputs reach Gemma through gated cross-attention or as a soft prompt) and the
text-prompt baseline (Gemma + LoRA reading the history as text) on the same tasks (next
item, favourite genre), prompts and test users, beside simple baselines on the same users
(majority genre, popularity, the stage-1 encoder's own top-K).

Variants:
  ''      (default) sized for 2 CPU cores (under 20 minutes): 200 test users, favourite
          genre at histories of 5 and 20 events, next item at 20; cross-attention after
          Gemma's last layer (strategy 'proj'), the encoder's user vector as one more user
          token, the stage-1 encoder's distribution distilled on the title trie; TP trains
          on the same training FLOPs as User-LLM (``tp.budget='flops'``), which buys it
          fewer steps (its prompt is ~20x longer).
  'genre' the favourite genre alone with the soft prompt (strategy 'enc'), TP on the same
          training FLOPs (the main job until 2026-12-05).
  'next_item'  next item alone, history 20, the default's User-LLM for 200 steps with 200
          validation users for the held-out loss with the users vs zeroed.
  'full'  the paper's comparison for one GPU: all eligible users, window 200, histories
          10-200, the four strategies for both User-LLM modes and TP with LoRA.
  'tiny'  planted synthetic data, a random tiny Gemma with a word tokenizer (tests).
"""

from userllm_jax import config_base as base

VARIANTS = ("", "genre", "next_item", "full", "tiny")


def get_config(arg: str = ""):
  if arg not in VARIANTS:
    raise ValueError(f"userllm_movielens_100k: unknown variant {arg!r}; known: {VARIANTS}")
  if arg == "tiny":
    return _tiny()
  c = base.userllm_job(base.encoder_job("movielens-100k"))
  c.max_prompt_tokens = 16       # "Which movie will the user watch next?" is 11 with BOS
  c.max_target_tokens = 30       # the longest ml-100k title is 28 Gemma tokens (+ EOS)
  if arg == "full":
    # Histories up to 200 events: the encoder's positions must cover them.
    c.encoder.data.max_len = 200
    # The most informative first: a run stopped by a time limit keeps what finished, and a
    # re-run in the same workdir continues (benchmarks/full_scale.sh).
    c.methods = ("userllm_soft_prompt_enc", "userllm_xattn_enc", "tp_lora",
                 "userllm_soft_prompt_lora", "userllm_xattn_lora", "userllm_soft_prompt_proj",
                 "userllm_xattn_proj", "userllm_soft_prompt_full", "userllm_xattn_full")
    c.tasks.update(dict(window=200, history_lengths=(10, 25, 50, 100, 200),
                        num_test_users=200, stride=10, max_examples_per_user=8))
    c.tp.budget_tokens = 2048     # ~100 items of text: TP reads the newest ones that fit
    c.train.update(dict(steps=400, batch_size=16, lr=3e-3, warmup_steps=30, log_every=50))
    c.eval.batch_size = 50
    c.llm.dtype = "bfloat16"
    return c
  if arg == "genre":
    # The favourite genre alone with the soft prompt (the main job until 2026-12-05; README).
    c.methods = ("userllm_soft_prompt", "tp_lora")
    c.tasks.update(dict(names=("fav_genre",), window=20, history_lengths=(5, 20),
                        num_test_users=200, stride=10, max_examples_per_user=2))
    c.userllm.update(dict(num_latents=8, perceiver_layers=1))
    c.tp.update(dict(budget_tokens=192, budget="flops"))
    c.train.update(dict(steps=300, batch_size=8, lr=3e-3, warmup_steps=20, log_every=20))
    return c
  # 2 CPU cores, under 20 minutes: both tasks with cross-attention after Gemma's last layer
  # (strategy 'proj': the bridge trains, encoder and Gemma frozen; the frozen layers below it
  # computed once per distinct training sequence), the encoder's user vector as one more user
  # token, the stage-1 encoder's distribution distilled on the title trie; next item at the
  # window only (its beam search dominates evaluation); TP on the same training FLOPs in
  # batches of 8 (its prompts are ~20x longer).
  c.methods = ("userllm_xattn_proj", "tp_lora")
  c.tasks.update(dict(names=("fav_genre", "next_item"), window=20, history_lengths=(5, 20),
                      window_only=("next_item",), num_test_users=200, stride=10,
                      max_examples_per_user=2))
  c.userllm.update(dict(num_latents=8, perceiver_layers=1, xattn_layers=(-1,),
                        user_vector_token=True))
  c.tp.update(dict(budget_tokens=192, budget="flops", batch_size=8))
  c.train.update(dict(steps=900, batch_size=32, lr=3e-3, warmup_steps=20, log_every=100,
                      distill_weight=1.0, trunk_cache=True))
  if arg == "next_item":
    # Next item alone, with 200 validation users for the held-out loss (users vs zeroed).
    c.tasks.update(dict(names=("next_item",), history_lengths=(20,), window_only=(),
                        num_valid_users=200))
    c.tp.update(dict(batch_size=0, grad_accum=4))   # batch 32 in microbatches of 8
    c.train.update(dict(steps=200, log_every=20, eval_every=50, trunk_cache=False))
  return c


def _tiny():
  """Planted-preference synthetic data, a tiny encoder and a random tiny Gemma (tests)."""
  enc = base.encoder_job("synthetic", "tiny")
  enc.data.max_len = 12
  enc.model.dropout = 0.0
  enc.train.update(dict(steps=60, lr=3e-3))
  c = base.userllm_job(enc, llm="tiny")
  c.methods = ("userllm_soft_prompt",)
  c.tasks.update(dict(names=("fav_genre", "next_item"), window=12, history_lengths=(4, 12),
                      num_test_users=40, min_history=6, stride=3, max_examples_per_user=2))
  # The tiny preset has a 4-token sliding window: widen it so the prompt sees the soft prompt.
  c.llm.tiny.update(dict(num_layers=2, embed_dim=32, mlp_dim=64, sliding_window=64))
  # A random tiny LLM knows no language: let it train too (the 270M config freezes Gemma).
  c.userllm.update(dict(strategy="full", use_perceiver=False, num_latents=4,
                        perceiver_head_dim=8, xattn_every=1, xattn_num_heads=2,
                        xattn_head_dim=8, xattn_mlp_dim=32))
  c.tp.budget_tokens = 96
  c.max_prompt_tokens = 16
  c.max_target_tokens = 8
  c.train.update(dict(steps=120, batch_size=16, lr=3e-3, warmup_steps=5, log_every=20))
  c.eval.update(dict(beams=4, ks=(1, 4), batch_size=20))
  return c
