"""AOT sharding and memory report of a User-LLM train step, built on abstract shapes only.

    python -m userllm_jax.train.sharding_report                      # Gemma 3 4B, 8 fake devices
    python -m userllm_jax.train.sharding_report --layers=2 --seq=256  # 4B width, 2 layers (tests)

Nothing is materialised: the model is ``nnx.eval_shape``'d, the optimizer state is
``jax.eval_shape``'d, and the train step (the same math as ``train/loop.py``: value_and_grad
of :func:`stage2.loss.next_token_loss`, clip + AdamW from ``train/optim.py``) is
``jit(...).lower(abstract sharded state, abstract batch).compile()``'d on a
``('data', 'fsdp', 'tensor')`` mesh whose parameter shardings come from ``train/mesh.py``'s
logical rules.  The report prints, per device:

* parameter and optimizer-state bytes (from each array's shard shape: exact);
* XLA's ``memory_analysis()`` of the compiled per-device program: arguments, outputs,
  aliased (donated) bytes and temporaries (activations, gradients, collectives' buffers);
* the peak estimate ``arguments + outputs - aliased + temp`` against the chip's HBM;

and fails (``AssertionError``) if any parameter with more than ``--min_sharded`` elements
is fully replicated, or (with ``--check_fit``) if the peak does not fit the chip.

When run as a script without ``XLA_FLAGS`` it asks XLA for ``--devices`` fake CPU devices
before JAX starts.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # fake CPU devices must be requested before JAX starts
  _n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_n}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # The report needs XLA's HLO passes and buffer assignment, not fast CPU code: skip LLVM's
  # optimisations (most of a CPU compile's time; the memory analysis does not depend on them).
  if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import argparse
import dataclasses
import json
import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from userllm_jax.models import gemma as gemma_lib
from userllm_jax.models import userllm as ul
from userllm_jax.stage2 import loss as stage2_loss
from userllm_jax.models.encoder import EncoderConfig
from userllm_jax.train import mesh as mesh_lib
from userllm_jax.train import optim

GiB = 2**30


@dataclasses.dataclass
class Report:
  mesh: dict
  num_params: int
  num_trainable: int
  param_bytes_per_device: int
  opt_bytes_per_device: int
  frozen_bytes_per_device: int
  memory: dict                 # compiled.memory_analysis(), per device
  peak_bytes_per_device: int   # arguments + outputs - aliased + temp
  flops_per_device: Optional[float]
  compile_s: float
  largest: list                # [(path, shape, spec, bytes per device)] of the biggest params
  replicated_large: list       # params with > min_sharded elements that are fully replicated
  chip_bytes: int

  @property
  def fits(self) -> bool:
    return self.peak_bytes_per_device <= self.chip_bytes

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["fits"] = self.fits
    return d


def _shard_bytes(sds) -> int:
  shape = sds.sharding.shard_shape(sds.shape) if sds.sharding is not None else sds.shape
  return int(math.prod(shape)) * jnp.dtype(sds.dtype).itemsize


def _tree_shard_bytes(tree) -> int:
  return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))


def _param_rows(abs_state, min_sharded: int):
  """([(name, shape, spec, bytes per device)] largest first, [replicated large params])."""
  rows, replicated = [], []
  for part in ("params", "frozen"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(abs_state[part])[0]:
      name = part + jax.tree_util.keystr(path)
      spec = leaf.sharding.spec
      rows.append((name, tuple(leaf.shape), str(spec), _shard_bytes(leaf)))
      if leaf.size > min_sharded and leaf.sharding.is_fully_replicated:
        replicated.append(f"{name} shape={tuple(leaf.shape)} spec={spec}")
  rows.sort(key=lambda r: -r[3])
  return rows, replicated


def abstract_batch(enc_cfg: EncoderConfig, batch: int, hist_len: int, seq_len: int,
                   target_len: int, sharding) -> dict:
  """Abstract stage-2 batch (history keys + tokens) with the leading dim on ``sharding``."""
  def sds(*shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct((batch,) + shape, dtype, sharding=sharding)
  del enc_cfg, target_len
  return {
      "item_BxT": sds(hist_len), "segment_BxT": sds(hist_len), "position_BxT": sds(hist_len),
      "tokens_BxL": sds(seq_len), "targets_BxL": sds(seq_len),
      "loss_mask_BxL": sds(seq_len), "input_mask_BxL": sds(seq_len), "prompt_len_B": sds(),
  }


def build_report(*, gemma_cfg: gemma_lib.GemmaConfig, enc_cfg: EncoderConfig,
                 ucfg: ul.UserLLMConfig, mesh_shape: dict, batch: int, hist_len: int,
                 seq_len: int, target_len: int, min_sharded: int = 2**20,
                 chip_gib: float = 16.0, devices=None,
                 fail_on_replicated: bool = True, compile: bool = True) -> Report:
  """Lower and compile the train step on abstract inputs; see the module doc.

  With ``fail_on_replicated`` a fully replicated parameter of more than ``min_sharded``
  elements raises ``AssertionError`` before anything is compiled.  ``compile=False``: only
  the exact per-device parameter / optimizer-state bytes (no XLA memory analysis).
  """
  mesh = mesh_lib.make_mesh(mesh_shape, devices=devices)
  tx, _ = optim.make_optimizer({"lr": 1e-4, "warmup_steps": 10, "grad_clip": 1.0,
                                "weight_decay": 0.01}, 1000)
  trainable = ul.trainable_filter(ucfg.strategy)
  with jax.set_mesh(mesh):
    abs_model = nnx.eval_shape(
        lambda: ul.init_userllm(ucfg, enc_cfg, gemma_cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_tr, abs_fr, abs_rest = nnx.split(abs_model, trainable, nnx.Param, ...)
    treedefs = tuple(jax.tree.structure(s) for s in (abs_tr, abs_fr, abs_rest))
    specs = {name: mesh_lib.state_partition_specs(s, mesh)
             for name, s in (("params", abs_tr), ("frozen", abs_fr), ("rest", abs_rest))}
    pure = {name: nnx.to_pure_dict(s)
            for name, s in (("params", abs_tr), ("frozen", abs_fr), ("rest", abs_rest))}
    abs_opt = jax.eval_shape(tx.init, pure["params"])
    state_specs = {"step": P(), **specs,
                   "opt_state": optim.opt_state_specs(tx, abs_opt, specs["params"])}
    abs_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), **pure, "opt_state": abs_opt}
    state_sh = mesh_lib.named_shardings(state_specs, mesh)
    abs_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, state_sh)

    def merge(params, frozen, rest):
      states = [jax.tree.unflatten(td, jax.tree.leaves(p))
                for td, p in zip(treedefs, (params, frozen, rest))]
      return nnx.merge(graphdef, *states)

    def train_step(state, batch_):
      rng = jax.random.fold_in(jax.random.key(0), state["step"])

      def loss_of(params):
        model = merge(params, state["frozen"], state["rest"])
        fwd = lambda t, m, lp, v: model(batch_, t, m, logits_positions=lp,
                                        deterministic=False, rng=rng)
        loss, metrics = stage2_loss.next_token_loss(fwd, batch_, max_target_tokens=target_len)
        return loss, metrics

      (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
      return new_state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}

    rows, replicated = _param_rows(abs_state, min_sharded)
    if replicated and fail_on_replicated:
      raise AssertionError(f"{len(replicated)} parameters with > {min_sharded} elements are "
                           f"fully replicated on mesh {dict(mesh.shape)} (check their "
                           "logical_axes and train/mesh.py LOGICAL_RULES):\n  "
                           + "\n  ".join(replicated))
    batch_sh = mesh_lib.batch_sharding(mesh)
    abs_batch = abstract_batch(enc_cfg, batch, hist_len, seq_len, target_len, batch_sh)
    jitted = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))
    t0 = time.time()
    compiled = jitted.lower(abs_state, abs_batch).compile() if compile else None
    compile_s = time.time() - t0

  mem = compiled.memory_analysis() if compiled is not None else None
  memory = {k: int(getattr(mem, k)) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
      "temp_size_in_bytes", "generated_code_size_in_bytes") if hasattr(mem, k)}
  peak = (memory.get("argument_size_in_bytes", 0) + memory.get("output_size_in_bytes", 0)
          - memory.get("alias_size_in_bytes", 0) + memory.get("temp_size_in_bytes", 0))
  if compiled is None:   # a lower bound: the state and f32-sized gradients, no activations
    memory = {"argument_size_in_bytes": _tree_shard_bytes(abs_state)}
    peak = memory["argument_size_in_bytes"] + _tree_shard_bytes(abs_state["params"])
  cost = compiled.cost_analysis() if compiled is not None else None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float(cost["flops"]) if cost and "flops" in cost else None

  n_tr = sum(x.size for x in jax.tree.leaves(abs_state["params"]))
  n_fr = sum(x.size for x in jax.tree.leaves(abs_state["frozen"]))
  return Report(mesh=dict(mesh.shape), num_params=int(n_tr + n_fr), num_trainable=int(n_tr),
                param_bytes_per_device=_tree_shard_bytes(abs_state["params"]),
                opt_bytes_per_device=_tree_shard_bytes(abs_state["opt_state"]),
                frozen_bytes_per_device=_tree_shard_bytes(abs_state["frozen"]),
                memory=memory, peak_bytes_per_device=int(peak), flops_per_device=flops,
                compile_s=compile_s, largest=rows[:8], replicated_large=replicated,
                chip_bytes=int(chip_gib * GiB))


def format_report(r: Report, title: str = "") -> str:
  g = lambda b: f"{b / GiB:8.3f} GiB"
  lines = [title] if title else []
  lines += [
      f"mesh {r.mesh}  params {r.num_params:,} ({r.num_trainable:,} trainable)  "
      f"compile {r.compile_s:.1f} s",
      "per device:",
      f"  parameters (trainable)   {g(r.param_bytes_per_device)}",
      f"  parameters (frozen)      {g(r.frozen_bytes_per_device)}",
      f"  optimizer state          {g(r.opt_bytes_per_device)}",
      f"  XLA arguments            {g(r.memory.get('argument_size_in_bytes', 0))}",
      f"  XLA outputs              {g(r.memory.get('output_size_in_bytes', 0))}",
      f"  XLA aliased (donated)    {g(r.memory.get('alias_size_in_bytes', 0))}",
      f"  XLA temp (activations, grads, buffers) {g(r.memory.get('temp_size_in_bytes', 0))}",
      (f"  peak = args + out - alias + temp       {g(r.peak_bytes_per_device)}"
       if "temp_size_in_bytes" in r.memory else
       f"  not compiled: state + gradients (a lower bound, no activations) "
       f"{g(r.peak_bytes_per_device)}") +
      f"  of {r.chip_bytes / GiB:.0f} GiB: {'fits' if r.fits else 'DOES NOT FIT'}",
  ]
  if r.flops_per_device is not None:
    lines.append(f"  step FLOPs (XLA cost analysis, per device) {r.flops_per_device:.4g}")
  lines.append("largest parameters (per-device bytes):")
  for name, shape, spec, b in r.largest:
    lines.append(f"  {name:60s} {str(shape):22s} {spec:32s} {b / 2**20:9.1f} MiB")
  lines.append(f"parameters > min size fully replicated: {len(r.replicated_large)}")
  lines += [f"  {x}" for x in r.replicated_large]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", type=int, default=8, help="fake CPU devices (before JAX starts)")
  p.add_argument("--mesh", default="1,4,2",
                 help="data,fsdp,tensor (default: FSDP 4 x tensor 2, the layout that fits a v5e-8)")
  p.add_argument("--llm", default="gemma3-4b")
  p.add_argument("--layers", type=int, default=0, help="LLM depth override (0 = the preset's)")
  p.add_argument("--strategy", default="full", choices=ul.STRATEGIES)
  p.add_argument("--mode", default="xattn", choices=ul.MODES)
  p.add_argument("--xattn_every", type=int, default=6)
  p.add_argument("--batch", type=int, default=8, help="global batch")
  p.add_argument("--seq", type=int, default=128,
                 help="LLM tokens per example (User-LLM: prompt + answer; the history is "
                      "in the user tokens, not the prompt)")
  p.add_argument("--target", type=int, default=32, help="tokens with a loss (logits computed)")
  p.add_argument("--hist", type=int, default=256, help="history items per user")
  p.add_argument("--num_items", type=int, default=100_000)
  p.add_argument("--dtype", default="bfloat16", help="LLM compute dtype (params stay f32)")
  p.add_argument("--remat", type=int, default=1,
                 help="1: rematerialise each Gemma block in the backward pass (train.remat)")
  p.add_argument("--min_sharded", type=int, default=2**20)
  p.add_argument("--chip_gib", type=float, default=16.0)
  p.add_argument("--check_fit", type=int, default=1)
  p.add_argument("--compile", type=int, default=1,
                 help="0: exact parameter/optimizer bytes and the sharding check only")
  p.add_argument("--json", default="", help="also write the report here")
  args = p.parse_args(argv)
  data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
  gcfg = gemma_lib.get_config(args.llm, dtype=args.dtype)
  gcfg = gcfg.replace(remat=bool(args.remat))
  if args.layers:
    gcfg = gcfg.replace(num_layers=args.layers)
  enc_cfg = EncoderConfig(num_items=args.num_items, embed_dim=256, num_layers=2, num_heads=4,
                          max_len=args.hist, dropout=0.1)
  ucfg = ul.UserLLMConfig(mode=args.mode, strategy=args.strategy, num_latents=16,
                          perceiver_layers=2, perceiver_heads=4, perceiver_head_dim=64,
                          xattn_every=min(args.xattn_every, gcfg.num_layers), xattn_num_heads=4, xattn_head_dim=128,
                          xattn_mlp_dim=2048)
  r = build_report(gemma_cfg=gcfg, enc_cfg=enc_cfg, ucfg=ucfg,
                   mesh_shape={"data": data, "fsdp": fsdp, "tensor": tensor},
                   batch=args.batch, hist_len=args.hist, seq_len=args.seq,
                   target_len=args.target, min_sharded=args.min_sharded,
                   chip_gib=args.chip_gib, compile=bool(args.compile))
  title = (f"User-LLM train step: {args.llm} ({gcfg.num_layers} layers, D={gcfg.embed_dim}, "
           f"{args.dtype} compute, f32 params{', remat' if args.remat else ''}) + encoder D=256 + perceiver, mode={args.mode}, "
           f"strategy={args.strategy}; global batch {args.batch} x {args.seq} tokens "
           f"({args.target} with a loss), history {args.hist}; jax {jax.__version__}, "
           f"{jax.device_count()} x {jax.devices()[0].platform}")
  print(format_report(r, title), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(r.to_dict(), f, indent=2, default=str)
  if args.check_fit and not r.fits:
    raise AssertionError(f"peak {r.peak_bytes_per_device / GiB:.2f} GiB per device does not "
                         f"fit a {args.chip_gib:g} GiB chip")
  return 0


if __name__ == "__main__":
  sys.exit(main())
