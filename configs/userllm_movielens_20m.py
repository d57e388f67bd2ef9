"""User-LLM on MovieLens 20M with Gemma 3 1B, sized for one accelerator (GPU / TPU host).

    python -m userllm_jax.main --config=configs/userllm_movielens_20m.py --workdir=DIR \
        --config.data.source=PATH/ml-20m --config.llm.name=PATH/gemma-3-1b-pt

``llm.name``: a Hugging Face safetensors directory or an Orbax checkpoint of
Gemma 3 1B (``weights.load_gemma``; nothing is downloaded).  Paper protocol:
history window 50, favourite genre and next item, 1,000 test users; bf16
compute; FSDP over the devices of one host.  Stage 1 trains the encoder on all
users' leave-one-out training parts (sampled softmax over the ~27k movies).
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
  c.data.name = "movielens-20m"
  c.data.source = "ml-20m"
  c.data.settings.min_user_count = 52      # window 50 + the two held-out events
  c.tasks.num_test_users = 1000
  c.tasks.max_train_users = 0
  c.tasks.stride = 25
  c.tasks.max_examples_per_user = 4
  c.encoder.model.embed_dim = 256
  c.encoder.model.num_layers = 4
  c.encoder.model.num_heads = 4
  c.encoder.model.dtype = "bfloat16"
  c.encoder.loss.item_softmax = "sampled"
  c.encoder.loss.num_negatives = 4096
  c.encoder_train.steps = 20000
  c.encoder_train.batch_size = 512
  c.llm.name = "gemma-3-1b-pt"
  c.llm.dtype = "bfloat16"
  c.userllm.num_latents = 16
  c.userllm.perceiver_layers = 2
  c.userllm.perceiver_head_dim = 64
  c.userllm.xattn_every = 2
  c.userllm.xattn_num_heads = 4
  c.userllm.xattn_head_dim = 128
  c.userllm.xattn_mlp_dim = 2048
  c.tp.budget_tokens = 1024
  c.train.steps = 5000
  c.train.batch_size = 64
  c.train.lr = 1e-4
  c.train.warmup_steps = 200
  c.eval.batch_size = 32
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
