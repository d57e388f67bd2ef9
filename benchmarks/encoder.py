"""User-encoder training throughput: steps/s, interactions/s and peak memory per history length.

    python benchmarks/encoder.py                       # T = 50, 1000, 8192 on the default backend
    python benchmarks/encoder.py --lengths=50,1000 --steps=10 --remat=1 --dtype=bfloat16

One jitted train step (pretrain_loss + AdamW, donated state) on random inputs with every
feature fused; the batch shrinks with T so each row holds about ``--tokens`` interactions.
Peak memory: the device's ``peak_bytes_in_use`` where the backend reports it (GPU/TPU), else
the compiled step's temp + argument + output bytes from XLA's memory analysis and the
process's peak RSS (CPU).  Timings exclude compilation.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from userllm_jax.models import encoder as enc


def make_batch(rng, B, T, V, G=3, num_genres=20, num_ratings=7, num_tg=38):
  return {
      "item_BxT": rng.integers(2, V, (B, T), dtype=np.int32),
      "genre_BxTxG": rng.integers(0, num_genres, (B, T, G), dtype=np.int32),
      "rating_BxT": rng.integers(2, num_ratings, (B, T), dtype=np.int32),
      "timegap_BxT": rng.integers(1, num_tg, (B, T), dtype=np.int32),
      "position_BxT": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
      "segment_BxT": np.ones((B, T), np.int32),
      "target_item_BxT": rng.integers(2, V, (B, T), dtype=np.int32),
      "target_genre_BxTxG": rng.integers(0, num_genres, (B, T, G), dtype=np.int32),
      "target_rating_BxT": rng.integers(2, num_ratings, (B, T), dtype=np.int32),
  }


def bench(T, args):
  B = max(1, args.tokens // T)
  cfg = enc.EncoderConfig(
      num_items=args.num_items, num_genres=20, num_ratings=7, num_timegap_buckets=38,
      features=tuple(args.features.split(",")), embed_dim=args.embed_dim,
      num_layers=args.num_layers, num_heads=args.num_heads, max_len=T, dropout=0.1,
      position=args.position, attention=args.attention, remat=bool(args.remat),
      dtype=args.dtype)
  loss_cfg = dict(item_softmax=args.item_softmax, num_negatives=args.num_negatives,
                  genre_weight=0.1, rating_weight=0.1)
  model = enc.UserEncoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)

  def step(params, opt_state, batch, key):
    def f(p):
      return enc.pretrain_loss(nnx.merge(graphdef, p), batch, key, loss_cfg)
    (loss, _), grads = jax.value_and_grad(f, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  batch = jax.device_put(make_batch(rng, B, T, args.num_items))
  key = jax.random.key(0)
  t0 = time.time()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch, key).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  xla_bytes = None
  if mem is not None:
    xla_bytes = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                 + mem.output_size_in_bytes - mem.alias_size_in_bytes)
  params, opt_state, loss = compiled(params, opt_state, batch, key)  # warm-up
  jax.block_until_ready(loss)
  t0 = time.time()
  for s in range(args.steps):
    params, opt_state, loss = compiled(params, opt_state, batch, jax.random.fold_in(key, s))
  jax.block_until_ready(loss)
  dt = (time.time() - t0) / args.steps
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  peak_dev = (stats or {}).get("peak_bytes_in_use")
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return dict(T=T, B=B, step_s=dt, steps_per_s=1 / dt, interactions_per_s=B * T / dt,
              compile_s=compile_s, loss=float(loss), xla_step_bytes=xla_bytes,
              device_peak_bytes=peak_dev, process_peak_rss=rss)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--lengths", default="50,1000,8192")
  p.add_argument("--tokens", type=int, default=8192, help="interactions per batch (B = tokens/T)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--num_items", type=int, default=1684)
  p.add_argument("--features", default="item,genre,rating,timegap")
  p.add_argument("--embed_dim", type=int, default=64)
  p.add_argument("--num_layers", type=int, default=2)
  p.add_argument("--num_heads", type=int, default=2)
  p.add_argument("--position", default="rotary")
  p.add_argument("--attention", default="xla")
  p.add_argument("--remat", type=int, default=0)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--item_softmax", default="full")
  p.add_argument("--num_negatives", type=int, default=1024)
  args = p.parse_args()
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"D={args.embed_dim} layers={args.num_layers} features={args.features} "
        f"softmax={args.item_softmax} dtype={args.dtype} remat={args.remat} "
        f"attention={args.attention}")
  print(f"{'T':>6} {'B':>4} {'steps/s':>9} {'interactions/s':>15} {'compile s':>10} "
        f"{'XLA step MiB':>13} {'dev peak MiB':>13} {'RSS MiB':>8}")
  mib = lambda x: "-" if x is None else f"{x / 2**20:.0f}"
  for T in (int(t) for t in args.lengths.split(",")):
    r = bench(T, args)
    print(f"{r['T']:>6} {r['B']:>4} {r['steps_per_s']:>9.2f} {r['interactions_per_s']:>15.0f} "
          f"{r['compile_s']:>10.1f} {mib(r['xla_step_bytes']):>13} "
          f"{mib(r['device_peak_bytes']):>13} {mib(r['process_peak_rss']):>8}", flush=True)


if __name__ == "__main__":
  main()
