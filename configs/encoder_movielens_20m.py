"""Stage 1 on MovieLens 20M (138k users, ~27k movies): sampled softmax with logQ correction.

    python -m userllm_jax.main --config=configs/encoder_movielens_20m.py --workdir=DIR [--config.data.source=PATH]

Fields: configs/encoder_movielens_100k.py's table.  Sized for one accelerator; ``:tiny`` is a
CPU smoke-test size.  Not measured in this repo (the data is not installable from PyPI).
"""

from userllm_jax import config_base as base

VARIANTS = ("", "tiny")


def get_config(arg: str = ""):
  return base.encoder_job("movielens-20m", arg)
