"""Stage 1 on MovieLens 1M (6,040 users, 3,706 movies): user-encoder pretraining, full softmax.

    python -m userllm_jax.main --config=configs/encoder_movielens_1m.py --workdir=DIR [--config.data.source=PATH]

Same fields as configs/encoder_movielens_100k.py (see its table).  Sized for one accelerator;
`get_config('tiny')` is a CPU smoke-test size.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  tiny = arg in ("tiny", "runlocal")
  c = ml_collections.ConfigDict()
  c.job = "encoder"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "movielens-1m"
  c.data.source = ""
  c.data.dir = ""
  c.data.settings = ml_collections.ConfigDict({"min_user_count": 5, "min_item_count": 1})
  c.data.max_len = 200
  c.data.batch_size = 128
  c.data.packing = False
  c.data.worker_count = 0

  c.model = ml_collections.ConfigDict(dict(
      features=("item", "genre", "rating", "timegap"), embed_dim=64, num_layers=2,
      num_heads=2, mlp_dim=4 * 64, dropout=0.2, position="learned", fusion="early",
      combine="sum", pooling="last", tie_output=True, attention="xla"))

  c.loss = ml_collections.ConfigDict(dict(
      item_softmax="full", num_negatives=1024, genre_weight=0.1, rating_weight=0.1))

  c.train = ml_collections.ConfigDict(dict(
      steps=20000, batch_size=128, lr=1e-3, warmup_steps=500, weight_decay=0.0,
      grad_clip=1.0, grad_accum=1, dtype="bfloat16", remat=False, ckpt_every=2000, keep=3,
      log_every=100, eval_every=0, min_lr_ratio=0.1))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.eval = ml_collections.ConfigDict(dict(
      ks=(1, 5, 10, 20), exclude_seen=True, ties="pessimistic", batch_size=256,
      max_users=0))

  c.reference = ml_collections.ConfigDict()
  c.reference.protocol = "leave-one-out, full ranking, seen excluded"
  c.reference.note = ("not measured in this repo; SASRec with a full-softmax CE loss on ml-1m is "
                      "reported by Klenitskiy & Vasilev 2023, arXiv 2309.07602")

  if tiny:
    c.data.max_len = 20
    c.model.embed_dim = 32
    c.model.mlp_dim = 64
    c.model.num_layers = 1
    c.train.steps = 20
    c.train.batch_size = 32
    c.data.batch_size = 32
    c.train.dtype = "float32"
    c.train.warmup_steps = 5
    c.train.ckpt_every = 0
  return c
