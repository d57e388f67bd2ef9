"""Shared config sections: experiment files in ``configs/`` derive from these.

    from userllm_jax import config_base as base
    def get_config(arg=""):
      c = base.encoder_job("movielens-100k", variant=arg)
      c.train.steps = 800          # an experiment overrides a few fields
      return c

* :func:`encoder_job` is the whole stage-1 (``jobs/encoder_job.py``) config; a User-LLM
  config's ``encoder`` section *is* one, read as it is by both jobs.
* :func:`userllm_job` is the User-LLM (``jobs/userllm_job.py``) config around an encoder-job
  config.
* Configs carry settings, not results: measured figures live in README.md and
  ``benchmarks/results/``.
* Each config file lists the variants its ``get_config(arg)`` accepts in ``VARIANTS``; a
  test loads every variant of every file and builds its model on abstract shapes.
"""

from __future__ import annotations

from typing import Optional

import ml_collections

ConfigDict = ml_collections.ConfigDict

# Datasets: registry name -> (domain of the task wording, prepare settings, stage-1 loss).
DATASETS = {
    "movielens-100k": ("movielens", dict(min_user_count=5, min_item_count=1), "full"),
    "movielens-1m": ("movielens", dict(min_user_count=5, min_item_count=1), "full"),
    "movielens-20m": ("movielens", dict(min_user_count=5, min_item_count=5), "sampled"),
    "amazon-2018": ("amazon", dict(min_user_count=20, min_item_count=5,
                                   reader_kwargs={"category": "Movies_and_TV"}), "in_batch"),
    "google-local": ("google-local", dict(min_user_count=20, min_item_count=5, max_genres=4),
                     "sampled"),
    # The planted-preference generator (data/sources/synthetic.py): tests and smoke runs.
    "synthetic": ("synthetic", dict(reader_kwargs=dict(
        num_users=240, num_items=60, num_genres=4, mean_length=24.0, min_length=12, seed=3,
        p_markov=0.2, p_favourite=0.9, with_reviews=False)), "full"),
}


def _check_variant(variant: str, allowed: tuple[str, ...], who: str) -> None:
  if variant not in allowed:
    raise ValueError(f"{who}: unknown variant {variant!r}; known: {allowed}")


def data_section(name: str, *, source: str = "", max_len: int = 50,
                 batch_size: int = 128) -> ConfigDict:
  """``data``: the dataset (``data/sources`` registry name), its prepare settings, the crop."""
  if name not in DATASETS:
    raise ValueError(f"data_section: unknown dataset {name!r}; known: {sorted(DATASETS)}")
  domain, settings, _ = DATASETS[name]
  return ConfigDict(dict(name=name, source=source, dir="", domain=domain,
                         settings=ConfigDict(dict(settings)), max_len=max_len,
                         batch_size=batch_size, packing=False, worker_count=-1))


def encoder_model(embed_dim: int = 64, num_layers: int = 2, num_heads: int = 2,
                  **kw) -> ConfigDict:
  """``model``: models/encoder.py EncoderConfig fields (vocabulary sizes come from the data)."""
  d = dict(features=("item", "genre", "rating", "timegap"), embed_dim=embed_dim,
           num_layers=num_layers, num_heads=num_heads, mlp_dim=4 * embed_dim, dropout=0.2,
           position="learned", fusion="early", combine="sum", pooling="last", tie_output=True,
           attention="xla")
  d.update(kw)
  return ConfigDict(d)


def train_section(steps: int, batch_size: int, lr: float, *, warmup_steps: int = 50,
                  **kw) -> ConfigDict:
  """``train``: train/loop.py + train/optim.py fields."""
  d = dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
           weight_decay=0.0, grad_clip=1.0, grad_accum=1, dtype="float32", remat=False,
           ckpt_every=0, keep=1, log_every=50, eval_every=0, min_lr_ratio=0.1)
  d.update(kw)
  return ConfigDict(d)


def mesh_section(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ConfigDict:
  return ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def encoder_job(dataset: str = "movielens-100k", variant: str = "", *,
                source: str = "") -> ConfigDict:
  """The stage-1 job config (``jobs/encoder_job.py``; field table in configs/encoder_movielens_100k.py).

  ``variant='tiny'``: a smoke-test size (one small layer, 20 steps).
  """
  _check_variant(variant, ("", "tiny"), "encoder_job")
  _, _, softmax = DATASETS[dataset]
  big = dataset not in ("movielens-100k", "movielens-1m", "synthetic")
  c = ConfigDict()
  c.job = "encoder"
  c.seed = 0
  c.data = data_section(dataset, source=source, batch_size=256 if big else 128)
  c.model = encoder_model(embed_dim=128 if big else 64)
  c.loss = ConfigDict(dict(item_softmax=softmax, num_negatives=8192 if big else 1024,
                           genre_weight=0.1, rating_weight=0.1))
  if dataset in ("movielens-100k", "synthetic"):
    c.train = train_section(400, 128, 2e-3)
  else:
    c.train = train_section(100_000 if big else 20_000, 256 if big else 128, 1e-3,
                            warmup_steps=500, ckpt_every=2000, keep=3, log_every=100,
                            dtype="bfloat16" if big else "float32")
  c.mesh = mesh_section()
  c.eval = ConfigDict(dict(ks=(1, 5, 10, 20), exclude_seen=True, ties="pessimistic",
                           batch_size=256, max_users=0))
  if variant == "tiny":
    c.data.max_len = 20
    c.data.batch_size = 32
    c.model.embed_dim = 32
    c.model.mlp_dim = 64
    c.model.num_layers = 1
    c.train.steps = 20
    c.train.batch_size = 32
    c.train.warmup_steps = 5
    c.train.log_every = 5
    c.train.dtype = "float32"
    c.train.ckpt_every = 0
  return c


def userllm_job(encoder: ConfigDict, *, llm: str = "gemma3-270m",
                llm_preset: Optional[str] = None) -> ConfigDict:
  """The User-LLM job config (``jobs/userllm_job.py``) around a stage-1 config ``encoder``.

  Sections: ``encoder`` (an encoder-job config, as is), ``tasks``, ``llm``, ``userllm``
  (models/userllm.py UserLLMConfig fields; ``mode`` and ``strategy`` come from the method
  name), ``tp`` (the text-prompt baseline), ``train`` (stage 2), ``eval``, ``mesh``.
  The sizes are the paper-like accelerator ones; configs shrink them for CPUs.
  """
  c = ConfigDict()
  c.job = "userllm"
  c.seed = 0
  c.methods = ("userllm_xattn", "userllm_soft_prompt", "tp_lora")
  c.encoder = encoder

  # num_valid_users > 0: that many of the non-test users are held out of training; with
  # train.eval_every > 0 stage 2 logs their loss with the users and with the user tokens
  # zeroed (stage2/methods.heldout_eval_fn: does the model use the user?).
  # window_only: tasks evaluated at the full window only, not at the shorter history lengths.
  c.tasks = ConfigDict(dict(
      names=("next_item", "fav_genre"), window=50, history_lengths=(10, 25, 50),
      num_test_users=200, num_valid_users=0, min_history=5, stride=5,
      max_examples_per_user=8, max_train_users=0, window_only=()))

  # llm.name: a weights.load_gemma name or path, or 'tiny' (random, word tokenizer);
  # llm.preset: the models/gemma.py shape preset (abstract builds, FLOPs) when the name is a path.
  c.llm = ConfigDict(dict(name=llm, preset=llm_preset or llm, dtype="float32",
                          tiny=ConfigDict()))

  c.userllm = ConfigDict(dict(
      strategy="enc", use_perceiver=True, num_latents=16, perceiver_layers=2,
      perceiver_heads=4, perceiver_head_dim=16, user_vector_token=False, xattn_every=6,
      xattn_layers=(), xattn_num_heads=2, xattn_head_dim=64, xattn_mlp_dim=512))

  # steps: 0 = train.steps; budget 'flops': TP trains for as many steps as buy the training
  # FLOPs of the first User-LLM method (the paper's efficiency argument; says so in the table);
  # grad_accum: 0 = train.grad_accum, else TP's batch in that many microbatches (memory);
  # batch_size: 0 = train.batch_size.
  c.tp = ConfigDict(dict(budget_tokens=512, lora_rank=8, lora_alpha=16.0,
                         lora_targets=("q", "v"), steps=0, budget="steps", grad_accum=0,
                         batch_size=0))

  c.max_prompt_tokens = 24        # the User-LLM prompt (TP adds its history budget)
  c.max_target_tokens = 40        # longest tokenized title + EOS must fit (else an error)
  c.max_review_tokens = 64        # task 'review': targets cut to this; new tokens at eval

  # loss_vocab 'trie': each target token's softmax over what its task's answer trie allows
  # (what constrained decoding ranks by; targets cut to their deciding tokens), 'answers':
  # over the tokens of all answers, 'full': over all LLM tokens (free text: reviews);
  # stage2/loss.py.  distill_weight > 0: next-item answers also learn the stage-1 encoder's
  # distribution over the catalogue (softmax(scores / distill_temperature)) as soft targets on
  # the title trie, with this weight (User-LLM methods only; stage2/distill.py).
  # trunk_cache: cross-attention with a frozen LLM computes the layers below its first block
  # once per training sequence (stage2/trunk.py; one process only).
  c.train = train_section(1000, 16, 1e-3, warmup_steps=50, log_every=50, keep=1,
                          loss_vocab="trie", distill_weight=0.0, distill_temperature=1.0,
                          trunk_cache=False)
  c.eval = ConfigDict(dict(beams=10, ks=(1, 5, 10), batch_size=32, review_beams=1,
                           confidence=0.95))
  c.mesh = mesh_section()
  return c


def review_llm_job(dataset: str, source: str) -> ConfigDict:
  """User-LLM with Gemma 3 4B on a review dataset (Amazon, Google Local): three tasks incl. review."""
  enc = encoder_job(dataset, source=source)
  enc.model.update(dict(embed_dim=256, mlp_dim=1024, num_layers=4, num_heads=4))
  enc.loss.update(dict(item_softmax="sampled", num_negatives=8192))
  enc.train.update(dict(steps=30000, batch_size=512, dtype="bfloat16"))
  c = userllm_job(enc, llm="gemma-3-4b-pt", llm_preset="gemma3-4b")
  c.tasks.update(dict(names=("next_item", "fav_genre", "review"), num_test_users=1000,
                      stride=25, max_examples_per_user=4))
  c.llm.dtype = "bfloat16"
  c.userllm.update(dict(num_latents=32, perceiver_head_dim=64, xattn_every=4,
                        xattn_num_heads=8, xattn_head_dim=128, xattn_mlp_dim=4096))
  c.max_target_tokens = 64        # product titles are long
  c.max_prompt_tokens = 80        # the review prompt names the product (title <= 63 tokens)
  c.max_review_tokens = 128
  c.tp.budget_tokens = 2048
  c.train.update(dict(steps=5000, batch_size=64, lr=1e-4, warmup_steps=200,
                      loss_vocab="full"))  # reviews are free text
  c.eval.batch_size = 16
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  return c
