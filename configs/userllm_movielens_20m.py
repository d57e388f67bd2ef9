"""User-LLM on MovieLens 20M with Gemma 3 1B, sized for one accelerator (GPU / TPU host).

    python -m userllm_jax.main --config=configs/userllm_movielens_20m.py --workdir=DIR \
        --config.encoder.data.source=PATH/ml-20m --config.llm.name=PATH/gemma-3-1b-pt

``llm.name``: a Hugging Face safetensors directory or an Orbax checkpoint of
Gemma 3 1B (``weights.load_gemma``; nothing is downloaded).  Paper protocol:
history window 50, favourite genre and next item, 1,000 test users; bf16
compute; FSDP over the devices of one host.  Stage 1 trains the encoder on all
users' leave-one-out training parts (sampled softmax over the ~27k movies).
"""

from userllm_jax import config_base as base

VARIANTS = ("",)


def get_config(arg: str = ""):
  del arg
  enc = base.encoder_job("movielens-20m", source="ml-20m")
  enc.data.settings.min_user_count = 52      # window 50 + the two held-out events
  enc.model.update(dict(embed_dim=256, mlp_dim=1024, num_layers=4, num_heads=4))
  enc.loss.num_negatives = 4096
  enc.train.update(dict(steps=20000, batch_size=512, dtype="bfloat16"))
  c = base.userllm_job(enc, llm="gemma-3-1b-pt", llm_preset="gemma3-1b")
  c.tasks.update(dict(num_test_users=1000, stride=25, max_examples_per_user=4))
  c.llm.dtype = "bfloat16"
  c.userllm.update(dict(perceiver_head_dim=64, xattn_every=2, xattn_num_heads=4,
                        xattn_head_dim=128, xattn_mlp_dim=2048))
  c.tp.budget_tokens = 1024
  c.train.update(dict(steps=5000, batch_size=64, lr=1e-4, warmup_steps=200))
  c.mesh.update(dict(data=1, fsdp=-1))
  return c
