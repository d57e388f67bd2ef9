"""User-LLM on Amazon Movies & TV (2018 reviews) with Gemma 3 4B, sized for an accelerator pod slice.

    python -m userllm_jax.main --config=configs/userllm_amazon.py --workdir=DIR \
        --config.data.source=PATH/Movies_and_TV.json.gz,PATH/meta_Movies_and_TV.json.gz \
        --config.llm.name=PATH/gemma-3-4b-pt

Next item (the next product's title), favourite category and review
generation (the user's review of the product the prompt names, greedy, up to
``max_review_tokens`` new tokens; scored with ROUGE-L, column ``rougeL``);
history window 50; bf16; FSDP x tensor parallelism
(``--config.mesh.tensor=...``).  Multi-host: add ``--distributed=auto``.
"""

import importlib.util
import pathlib


def _base(arg):
  path = pathlib.Path(__file__).with_name("userllm_movielens_100k.py")
  spec = importlib.util.spec_from_file_location("_userllm_movielens_100k", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str = "full"):
  c = _base("full")
  c.data.name = "amazon-2018"
  c.data.source = "Movies_and_TV.json.gz,meta_Movies_and_TV.json.gz"
  c.data.domain = "amazon"
  c.data.settings.min_user_count = 20
  c.data.settings.min_item_count = 5
  c.tasks.names = ("next_item", "fav_genre", "review")
  c.tasks.num_test_users = 1000
  c.tasks.stride = 25
  c.tasks.max_examples_per_user = 4
  c.encoder.model.features = ("item", "genre", "rating", "timegap")
  c.encoder.model.embed_dim = 256
  c.encoder.model.num_layers = 4
  c.encoder.model.num_heads = 4
  c.encoder.model.dtype = "bfloat16"
  c.encoder.loss.item_softmax = "sampled"
  c.encoder.loss.num_negatives = 8192
  c.encoder_train.steps = 30000
  c.encoder_train.batch_size = 512
  c.llm.name = "gemma-3-4b-pt"
  c.llm.dtype = "bfloat16"
  c.userllm.num_latents = 32
  c.userllm.perceiver_layers = 2
  c.userllm.perceiver_head_dim = 64
  c.userllm.xattn_every = 4
  c.userllm.xattn_num_heads = 8
  c.userllm.xattn_head_dim = 128
  c.userllm.xattn_mlp_dim = 4096
  c.max_target_tokens = 64        # product titles are long
  c.max_prompt_tokens = 80        # the review prompt names the product (title <= 63 tokens)
  c.max_review_tokens = 128
  c.tp.budget_tokens = 2048
  c.train.steps = 5000
  c.train.batch_size = 64
  c.train.lr = 1e-4
  c.train.warmup_steps = 200
  c.eval.batch_size = 16
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
