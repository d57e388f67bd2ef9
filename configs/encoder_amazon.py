"""Stage 1 on one Amazon Reviews 2018 category (default Movies_and_TV; set data.source to the reviews/meta files): in-batch negatives with logQ correction for a 10^5+ item catalogue.

    python -m userllm_jax.main --config=configs/encoder_amazon.py --workdir=DIR [--config.data.source=PATH]

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
  c.data.name = "amazon-2018"
  c.data.source = ""
  c.data.dir = ""
  c.data.settings = ml_collections.ConfigDict({"min_user_count": 5, "min_item_count": 5, "reader_kwargs": {"category": "Movies_and_TV"}})
  c.data.max_len = 50
  c.data.batch_size = 256
  c.data.packing = False
  c.data.worker_count = 0

  c.model = ml_collections.ConfigDict(dict(
      features=("item", "genre", "rating", "timegap"), embed_dim=128, num_layers=2,
      num_heads=2, mlp_dim=4 * 128, dropout=0.2, position="learned", fusion="early",
      combine="sum", pooling="last", tie_output=True, attention="xla"))

  c.loss = ml_collections.ConfigDict(dict(
      item_softmax="in_batch", num_negatives=1024, genre_weight=0.1, rating_weight=0.1))

  c.train = ml_collections.ConfigDict(dict(
      steps=100000, batch_size=256, lr=1e-3, warmup_steps=500, weight_decay=0.0,
      grad_clip=1.0, grad_accum=1, dtype="bfloat16", remat=False, ckpt_every=2000, keep=3,
      log_every=100, eval_every=0, min_lr_ratio=0.1))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.eval = ml_collections.ConfigDict(dict(
      ks=(1, 5, 10, 20), exclude_seen=True, ties="pessimistic", batch_size=256,
      max_users=0))

  c.reference = ml_collections.ConfigDict()
  c.reference.protocol = "leave-one-out, full ranking, seen excluded"
  c.reference.note = "not measured in this repo"

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
