"""The User-LLM main job on MovieLens 100k with Gemma 3 270M, sized for a 2-core CPU (~15 min).

    python -m userllm_jax.main --config=configs/userllm_movielens_100k.py --workdir=runs/main

Stage 1 (user encoder, next-item pretraining), stage 2 (User-LLM with gated
cross-attention and with a soft prompt, strategy 'enc': encoder + bridge
train, Gemma frozen) and the text-prompt baseline (Gemma + LoRA reading the
history as text) on the same tasks (next item, favourite genre), prompts and
test users.  At this scale (a few hundred stage-2 steps would be needed; we
run tens) the quality numbers are close to chance: the run shows the
machinery, the prompt-length and FLOPs gap between TP and User-LLM, and the
relative cost, not the paper's quality gains.  ``get_config('full')`` gives
the paper-like sizes (window 50, thousands of steps) for an accelerator.
"""

import ml_collections


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  full = arg == "full"
  c = ml_collections.ConfigDict()
  c.job = "userllm"
  c.seed = 0
  c.methods = ("userllm_xattn", "userllm_soft_prompt", "tp_lora")

  c.data = ml_collections.ConfigDict()
  c.data.name = "movielens-100k"
  c.data.source = ""          # '' = the embedded copy (recbole wheel)
  c.data.dir = ""             # prepared ArrayRecord dir; '' = $USERLLM_CACHE/prepared/<name>-<hash>
  c.data.domain = "movielens"
  c.data.settings = ml_collections.ConfigDict(
      {"min_user_count": 5, "min_item_count": 1})

  c.tasks = ml_collections.ConfigDict()
  c.tasks.names = ("next_item", "fav_genre")
  c.tasks.window = 50 if full else 20            # history events per example
  c.tasks.history_lengths = (10, 25, 50) if full else (5, 20)
  c.tasks.num_test_users = 200 if full else 16
  c.tasks.min_history = 5
  c.tasks.stride = 5 if full else 20
  c.tasks.max_examples_per_user = 8 if full else 1
  c.tasks.max_train_users = 0 if full else 96    # 0 = all

  # Stage 1: the user encoder (models/encoder.py EncoderConfig fields; vocab sizes come
  # from the data).
  c.encoder = ml_collections.ConfigDict()
  c.encoder.max_len = 50 if full else 20         # pretraining crop length
  c.encoder.model = ml_collections.ConfigDict(dict(
      features=("item", "genre", "rating", "timegap"), embed_dim=64, num_layers=2,
      num_heads=2, dropout=0.2, position="learned", fusion="early", combine="sum",
      pooling="last"))
  c.encoder.loss = ml_collections.ConfigDict(dict(item_softmax="full", genre_weight=0.5,
                                                  rating_weight=0.1))
  c.encoder_train = ml_collections.ConfigDict(dict(
      steps=2000 if full else 150, batch_size=128 if full else 64, lr=1e-3, warmup_steps=20,
      weight_decay=0.01, grad_clip=1.0, log_every=50, ckpt_every=0, keep=1))

  # The LLM: a name for weights.load_gemma, or 'tiny' (random, word tokenizer).
  c.llm = ml_collections.ConfigDict()
  c.llm.name = "gemma3-270m"
  c.llm.dtype = "float32"
  c.llm.tiny = ml_collections.ConfigDict()

  # Stage 2: models/userllm.py UserLLMConfig fields (mode is set per method).
  c.userllm = ml_collections.ConfigDict(dict(
      strategy="enc", use_perceiver=True, num_latents=8 if not full else 16,
      perceiver_layers=1 if not full else 2, perceiver_heads=4, perceiver_head_dim=16,
      xattn_every=6, xattn_num_heads=2, xattn_head_dim=64, xattn_mlp_dim=512))

  # The text-prompt baseline.
  c.tp = ml_collections.ConfigDict(dict(
      budget_tokens=512 if full else 192, lora_rank=8, lora_alpha=16.0,
      lora_targets=("q", "v")))

  c.max_prompt_tokens = 24      # the User-LLM prompt (TP adds its history budget)
  c.max_target_tokens = 40      # longest tokenized title + EOS must fit (else an error)
  c.max_review_tokens = 64      # task 'review' (Amazon, Google Local): training targets are cut
                                # to this (no EOS when cut); new tokens generated at eval

  # Stage-2 training (train/loop.py fields).
  c.train = ml_collections.ConfigDict(dict(
      steps=1000 if full else 12, batch_size=16 if full else 4, lr=3e-4 if full else 1e-3,
      warmup_steps=50 if full else 2, weight_decay=0.0, grad_clip=1.0, log_every=4,
      ckpt_every=0, keep=1))

  # review_beams: 1 = greedy review generation (scored with ROUGE-L).
  c.eval = ml_collections.ConfigDict(dict(beams=10, ks=(1, 5, 10), batch_size=8,
                                          review_beams=1))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c
