"""Stage 1 on MovieLens 100k: user-encoder pretraining, leave-one-out, full-ranking eval.

    python -m userllm_jax.main --config=configs/encoder_movielens_100k.py --workdir=DIR
    python -m userllm_jax.main --config=configs/encoder_movielens_100k.py:tiny --workdir=DIR

Protocol: per-user chronological sequences (stable sort by timestamp), leave-one-out (train =
all but the last two items, valid = second to last, test = last), 50-item history, the
held-out item ranked against the whole catalogue (1,682 movies; already-seen items excluded;
ties pessimistic; the seen-kept ranking is reported beside it).  Sized for a few minutes on 2
CPU cores; measured figures (and the tuned-SASRec comparison) are in README.md.

Fields (read by jobs/encoder_job.py, train/loop.py, train/optim.py, train/mesh.py):

  ======================  ============================================================
  job                     'encoder'
  seed                    model init, data order, dropout
  data.name               dataset registry name (data/sources), e.g. 'movielens-100k'
  data.source             path of the raw files; '' = the default (embedded ml-100k)
  data.dir                prepared ArrayRecord dir; '' = cache_dir()/prepared/<hash>
  data.domain             task wording of the User-LLM job (movielens | amazon | ...)
  data.settings           prepare settings: min_user_count, min_item_count (k-core off)
  data.max_len            history length T (training crop = T+1; eval = last T items)
  data.batch_size         global batch (train.batch_size wins when set)
  data.packing            pack several users per row (segment ids) instead of padding
  data.worker_count       Grain worker processes (0 = in-process; -1 = auto: 0 below 4 CPUs,
                          else half the CPUs, at most 16: data/pipeline.resolve_worker_count).
                          With workers the data position cannot move to another process
                          count (train/checkpoint.py says so); set 0 to keep that
  model.*                 models/encoder.py EncoderConfig (vocab sizes come from data):
                          features, embed_dim, num_layers, num_heads, mlp_dim, dropout,
                          emb_dropout, position ('learned'|'rotary'|'none'), fusion
                          ('early'|'late'), combine ('sum'|'concat'), pooling
                          ('last'|'mean'), tie_output, attention ('xla'|'cudnn'|registered)
  loss.item_softmax       'full' | 'sampled' (logQ) | 'in_batch' (logQ)
  loss.num_negatives      negatives per step for 'sampled'
  loss.genre_weight       weight of the next-genre multi-label head (0 = off)
  loss.rating_weight      weight of the next-rating head (0 = off)
  train.steps, lr, warmup_steps, weight_decay, grad_clip, grad_accum,
  train.batch_size        global batch size
  train.dtype             compute dtype override ('float32' | 'bfloat16'); remat: bool
  train.ckpt_every, keep  Orbax checkpoints (0 = only at the end), how many to keep
  train.log_every, eval_every   metrics cadence; periodic eval = valid split
  mesh.data/fsdp/tensor   mesh axis sizes (-1 = the rest of the devices)
  eval.ks                 cut-offs for HR@K / NDCG@K; eval.exclude_seen; eval.ties
  ======================  ============================================================
"""

from userllm_jax import config_base as base

VARIANTS = ("", "tiny")


def get_config(arg: str = ""):
  return base.encoder_job("movielens-100k", arg)
