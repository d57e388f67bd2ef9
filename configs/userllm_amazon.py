"""User-LLM on Amazon Movies & TV (2018 reviews) with Gemma 3 4B, sized for an accelerator pod slice.

    python -m userllm_jax.main --config=configs/userllm_amazon.py --workdir=DIR \
        --config.encoder.data.source=PATH/Movies_and_TV.json.gz,PATH/meta_Movies_and_TV.json.gz \
        --config.llm.name=PATH/gemma-3-4b-pt

Next item (the next product's title), favourite category and review
generation (the user's review of the product the prompt names, greedy, up to
``max_review_tokens`` new tokens; scored with ROUGE-L, column ``rougeL``);
history window 50; bf16; FSDP x tensor parallelism
(``--config.mesh.tensor=...``).  Multi-host: add ``--distributed=auto``.
"""

from userllm_jax import config_base as base

VARIANTS = ("",)


def get_config(arg: str = ""):
  del arg
  return base.review_llm_job("amazon-2018", "Movies_and_TV.json.gz,meta_Movies_and_TV.json.gz")
