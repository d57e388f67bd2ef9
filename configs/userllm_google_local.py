"""User-LLM on Google Local Reviews (one US state) with Gemma 3 4B, for an accelerator pod slice.

    python -m userllm_jax.main --config=configs/userllm_google_local.py --workdir=DIR \
        --config.data.source=PATH/review-New_York_10.json.gz,PATH/meta-New_York.json.gz \
        --config.llm.name=PATH/gemma-3-4b-pt

``data.source`` is any state's reviews + metadata pair (``REVIEWS,META``), one
reviews file (its ``meta-<State>`` file is looked up next to it) or a
directory of states (``--config.data.settings.reader_kwargs.state=...`` picks
one; see ``userllm_jax/data/sources/google_local.py``).  Tasks: next item (the
next place's name), favourite category and review generation (the user's
review of the place the prompt names, greedy, up to ``max_review_tokens`` new
tokens; scored with ROUGE-L, column ``rougeL``); history window 50; bf16;
FSDP x tensor parallelism.  Multi-host: add ``--distributed=auto``.
"""

import importlib.util
import pathlib


def _amazon(arg):
  path = pathlib.Path(__file__).with_name("userllm_amazon.py")
  spec = importlib.util.spec_from_file_location("_userllm_amazon", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str = "full"):
  # The Amazon config's sizes (encoder, Gemma 3 4B, bridge, training, mesh); Google Local data.
  c = _amazon(arg)
  c.data.name = "google-local"
  c.data.source = "review-New_York_10.json.gz,meta-New_York.json.gz"
  c.data.domain = "google-local"
  c.data.settings.max_genres = 4   # places list up to ~10 categories; keep the first 4
  c.max_target_tokens = 48        # place names (+ EOS)
  c.max_prompt_tokens = 64        # the review prompt names the place
  c.max_review_tokens = 96        # most Google Local reviews are a few sentences
  return c
