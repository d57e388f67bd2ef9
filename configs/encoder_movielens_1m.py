"""Stage 1 on MovieLens 1M (6,040 users, 3,706 movies): user-encoder pretraining, full softmax.

    python -m userllm_jax.main --config=configs/encoder_movielens_1m.py --workdir=DIR [--config.data.source=PATH]

Fields: configs/encoder_movielens_100k.py's table.  Sized for one accelerator; ``:tiny`` is a
CPU smoke-test size.  Not measured in this repo (the data is not installable from PyPI).
"""

from userllm_jax import config_base as base

VARIANTS = ("", "tiny")


def get_config(arg: str = ""):
  return base.encoder_job("movielens-1m", arg)
