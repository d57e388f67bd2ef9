"""User-LLM on Google Local Reviews (one US state) with Gemma 3 4B, for an accelerator pod slice.

    python -m userllm_jax.main --config=configs/userllm_google_local.py --workdir=DIR \
        --config.encoder.data.source=PATH/review-New_York_10.json.gz,PATH/meta-New_York.json.gz \
        --config.llm.name=PATH/gemma-3-4b-pt

``encoder.data.source`` is any state's reviews + metadata pair (``REVIEWS,META``), one
reviews file (its ``meta-<State>`` file is looked up next to it) or a
directory of states (``--config.encoder.data.settings.reader_kwargs.state=...`` picks
one; see ``userllm_jax/data/sources/google_local.py``).  Tasks: next item (the
next place's name), favourite category and review generation (ROUGE-L); the
sizes of configs/userllm_amazon.py.
"""

from userllm_jax import config_base as base

VARIANTS = ("",)


def get_config(arg: str = ""):
  del arg
  c = base.review_llm_job("google-local",
                          "review-New_York_10.json.gz,meta-New_York.json.gz")
  c.max_target_tokens = 48        # place names (+ EOS)
  c.max_prompt_tokens = 64        # the review prompt names the place
  c.max_review_tokens = 96        # most Google Local reviews are a few sentences
  return c
