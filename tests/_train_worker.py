"""A tiny model, a tiny Grain dataset and a CLI worker for the trainer tests.

Imported by tests/test_train_*.py and tests/test_mesh.py for in-process runs,
and run as a subprocess (with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
set in its environment *before* JAX starts) for multi-device / multi-process /
kill-and-restart runs::

    python tests/_train_worker.py --workdir=W --out=W/out.json [--mesh=2,4,1]
        [--num_processes=2 --process_id=0 --port=P] [--sigterm_at=K] [--kill_at=K]
        [--data=strided --dump=PREFIX]

``--data=strided`` feeds :func:`make_strided_iterator` (process i of N reads global
examples i, i+N, ... -- the layout whose position survives a change of process count)
and ``--dump=PREFIX`` writes, per process, its shards of the final params
(``PREFIX.p{i}.params.npz``, see :func:`load_dumped_params`) and the ids of the next
batch after training (``PREFIX.p{i}.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from userllm_jax.models.common import RMSNorm, param  # noqa: E402

VOCAB, EMBED, MLP, SEQ = 64, 16, 64, 12


class TinyLM(nnx.Module):
  """Embedding -> RMSNorm -> gelu MLP (residual) -> tied output projection."""

  def __init__(self, *, rngs: nnx.Rngs, vocab=VOCAB, embed=EMBED, mlp=MLP, dtype=jnp.float32):
    init = nnx.initializers.normal(0.3)
    self.dtype = dtype
    self.embed = param(rngs, init, (vocab, embed), ("vocab", "embed"))
    self.norm = RMSNorm(embed, rngs=rngs)
    self.w_in = param(rngs, init, (embed, mlp), ("embed", "mlp"))
    self.b_in = nnx.Param(jnp.zeros((mlp,)), logical_axes=("mlp",))
    self.w_out = param(rngs, init, (mlp, embed), ("mlp", "embed"))

  def __call__(self, tokens_BxL):
    x_BxLxD = self.embed[...][tokens_BxL].astype(self.dtype)
    h_BxLxF = jax.nn.gelu(self.norm(x_BxLxD) @ self.w_in[...].astype(self.dtype)
                          + self.b_in[...].astype(self.dtype))
    x_BxLxD = x_BxLxD + h_BxLxF @ self.w_out[...].astype(self.dtype)
    return (x_BxLxD @ self.embed[...].T.astype(self.dtype)).astype(jnp.float32)


def tiny_loss(model: TinyLM, batch, rng):
  """Next-token cross-entropy, mean over all predicted positions, times mean(weight)."""
  del rng
  tokens_BxL = batch["tokens"]
  logits_BxLxV = model(tokens_BxL[:, :-1])
  logp = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  nll_BxL = -jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  loss = nll_BxL.mean() * batch["weight"].mean()
  return loss, {"accuracy": (logits_BxLxV.argmax(-1) == tokens_BxL[:, 1:]).mean()}


def global_batch(step: int, global_size: int, seed: int = 0, nan_at: int = -1):
  """The global batch of ``step`` (a deterministic, learnable token pattern)."""
  rng = np.random.default_rng([seed, step])
  start = rng.integers(0, VOCAB, size=(global_size, 1))
  stride = rng.integers(1, 4, size=(global_size, 1))
  tokens = (start + stride * np.arange(SEQ)[None, :]) % VOCAB
  noise = rng.random((global_size, SEQ)) < 0.1
  tokens = np.where(noise, rng.integers(0, VOCAB, size=tokens.shape), tokens)
  weight = np.ones((global_size,), np.float32)
  if step == nan_at:
    weight[:] = np.nan
  return {"tokens": tokens.astype(np.int32), "weight": weight}


def make_iterator(global_size: int, *, shard_index: int = 0, shard_count: int = 1,
                  seed: int = 0, num_steps: int = 1000, nan_at: int = -1):
  """A Grain iterator of this process's rows of each global batch (checkpointable)."""
  per = global_size // shard_count

  def make(step):
    b = global_batch(int(step), global_size, seed, nan_at)
    return jax.tree.map(lambda x: x[shard_index * per:(shard_index + 1) * per], b)

  return iter(grain.MapDataset.range(num_steps).map(make).to_iter_dataset())


def example(e: int) -> dict:
  """Global example ``e`` of the strided data (a learnable token pattern, like global_batch)."""
  rng = np.random.default_rng([7, int(e)])
  start, stride = rng.integers(0, VOCAB), rng.integers(1, 4)
  tokens = (start + stride * np.arange(SEQ)) % VOCAB
  return {"tokens": tokens.astype(np.int32), "weight": np.float32(1.0),
          "id": np.int32(e)}


def make_strided_iterator(global_size: int, *, shard_index: int = 0, shard_count: int = 1,
                          seed: int = 0):
  """Process ``shard_index``'s batches of a shuffled global order of examples, strided over
  processes and declared ``"strided"`` for the checkpointer (see train/checkpoint.py)."""
  from userllm_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  ds = grain.MapDataset.range(1 << 20).shuffle(seed=seed)[shard_index::shard_count]
  it = iter(ds.map(example).to_iter_dataset().batch(global_size // shard_count))
  return ckpt_lib.set_shard_layout(it, ckpt_lib.STRIDED)


def global_order(n: int, seed: int = 0) -> list[int]:
  """The first ``n`` example ids of the strided data's global order."""
  ds = grain.MapDataset.range(1 << 20).shuffle(seed=seed)
  return [int(ds[i]) for i in range(n)]


def load_dumped_params(prefix: str, num_processes: int) -> dict:
  """The full params from the per-process shard files of ``--dump=prefix``."""
  out = {}
  for i in range(num_processes):
    with np.load(f"{prefix}.p{i}.params.npz") as z:
      for key in z.files:
        name, where = key.rsplit("|", 1)
        if where == "shape":
          continue
        if name not in out:
          out[name] = np.full(tuple(z[f"{name}|shape"]), np.nan, np.float32)
        out[name][tuple(slice(a, b) for a, b in json.loads(where))] = z[key]
  return out


def make_config(**train_overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.train = ml_collections.ConfigDict(dict(
      steps=8, lr=3e-2, warmup_steps=2, weight_decay=0.01, grad_clip=1.0, grad_accum=1,
      ckpt_every=0, keep=3, log_every=1, eval_every=0, batch_size=8,
      assert_sharded_min_size=0))
  # No device prefetch: the worker reads the *live* iterator's next batch after training, which
  # a prefetcher would already have advanced (checkpoints record the consumed position either
  # way; tests/test_mfu_and_prefetch.py covers that).
  cfg.train.prefetch = 0
  cfg.train.update(train_overrides)
  cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return cfg


def build_model(rngs):
  return TinyLM(rngs=rngs)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--mesh", default="-1,1,1")
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--ckpt_every", type=int, default=0)
  ap.add_argument("--min_shard", type=int, default=0)
  ap.add_argument("--num_processes", type=int, default=1)
  ap.add_argument("--process_id", type=int, default=0)
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--sigterm_at", type=int, default=-1)
  ap.add_argument("--kill_at", type=int, default=-1)
  ap.add_argument("--data", default="blocks", choices=["blocks", "strided"])
  ap.add_argument("--dump", default="")
  args = ap.parse_args(argv)

  from absl import logging  # pylint: disable=g-import-not-at-top
  from userllm_jax.train import distributed, loop  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  if args.num_processes > 1:
    distributed.maybe_initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
  data, fsdp, tensor = (int(v) for v in args.mesh.split(","))
  cfg = make_config(steps=args.steps, ckpt_every=args.ckpt_every, batch_size=args.batch,
                    assert_sharded_min_size=args.min_shard)
  cfg.mesh.update(data=data, fsdp=fsdp, tensor=tensor)

  def hook(step, ctx):
    if step == args.sigterm_at:
      os.kill(os.getpid(), 15)
    if step == args.kill_at:
      ctx.checkpointer.wait()        # a committed checkpoint exists before the kill
      os.kill(os.getpid(), 9)

  make = make_strided_iterator if args.data == "strided" else make_iterator
  it = make(args.batch, shard_index=jax.process_index(), shard_count=jax.process_count())
  result = loop.run_training(cfg, args.workdir, build_model=build_model, loss_fn=tiny_loss,
                             train_iter=it, step_hook=hook)
  if args.dump:
    # Each process writes its own shards (no collective: nothing to time out under load).
    shards = {}
    for p, x in jax.tree_util.tree_flatten_with_path(result.state["params"])[0]:
      name = jax.tree_util.keystr(p)
      shards[f"{name}|shape"] = np.asarray(x.shape)
      for sh in x.addressable_shards:
        bounds = [(s.start or 0, x.shape[d] if s.stop is None else s.stop)
                  for d, s in enumerate(sh.index)]
        shards[f"{name}|{json.dumps(bounds)}"] = np.asarray(sh.data)
    np.savez(f"{args.dump}.p{jax.process_index()}.params.npz", **shards)
    with open(f"{args.dump}.p{jax.process_index()}.json", "w") as f:
      json.dump({"next_ids": [int(i) for i in next(it)["id"]]}, f)
  specs = {jax.tree_util.keystr(p): str(x.sharding.spec)
           for p, x in jax.tree_util.tree_flatten_with_path(result.state["params"])[0]}
  if jax.process_index() == 0:
    with open(args.out, "w") as f:
      json.dump({"start_step": result.start_step, "step": result.step,
                 "losses": {s: m["loss"] for s, m in result.history},
                 "specs": specs, "mesh": dict(result.mesh.shape),
                 "devices": jax.device_count(), "processes": jax.process_count(),
                 "compile_stats": {k: v for k, v in result.compile_stats.items()}}, f)


if __name__ == "__main__":
  main()
