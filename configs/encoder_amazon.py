"""Stage 1 on one Amazon Reviews 2018 category (default Movies_and_TV; set data.source to the
reviews/meta files): sampled softmax with logQ correction for a 10^5+ item catalogue.

    python -m userllm_jax.main --config=configs/encoder_amazon.py --workdir=DIR [--config.data.source=PATH]

Fields: configs/encoder_movielens_100k.py's table.  Sized for one accelerator; ``:tiny`` is a
CPU smoke-test size.  Not measured in this repo (the data is not installable from PyPI).
"""

from userllm_jax import config_base as base

VARIANTS = ("", "tiny")


def get_config(arg: str = ""):
  return base.encoder_job("amazon-2018", arg)
