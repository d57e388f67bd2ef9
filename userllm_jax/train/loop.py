"""The shared training loop: one jitted, mesh-sharded, donated train step.

Used by every job (user-encoder pretraining, User-LLM stage 2, the text-prompt
baseline)::

    result = run_training(config, workdir, build_model=lambda rngs: Model(cfg, rngs=rngs),
                          loss_fn=pretrain_loss, train_iter=grain_iterator,
                          trainable=nnx.Param, eval_fn=None)

* ``build_model(rngs: nnx.Rngs) -> nnx.Module`` builds the model (params carry
  ``logical_axes`` metadata); it runs under ``jax.jit`` with the params placed
  by ``train/mesh.py``'s rules straight away (no host copy of the full model).
* ``loss_fn(model, batch, rng) -> (loss, metrics)``: scalar mean loss and a
  dict of scalar metrics; ``batch`` is the global batch (dict of arrays whose
  leading dimension is split over ``('data', 'fsdp')``); ``rng`` differs per step
  (and per microbatch).
* ``train_iter``: this process's data (numpy batches of the *per-process*
  batch size).  A Grain ``DatasetIterator`` is checkpointed with the state.
* ``trainable``: an nnx filter; other ``nnx.Param``s are frozen (no gradient,
  no optimizer state, bit-identical after training).
* ``eval_fn(model, step) -> dict`` runs every ``train.eval_every`` steps.

The train state is a plain pytree of global ``jax.Array``s::

    {'step': int32[], 'params': trainable params (pure dict), 'frozen': frozen
     params, 'rest': other nnx variables (RNG counters, ...), 'opt_state': optax}

Checkpoints hold all of it but ``frozen``: on resume the frozen params are rebuilt
by ``build_model`` (which loads the pretrained LLM / encoder), so a stage-2 run
under strategy enc/proj/lora does not rewrite the whole LLM at every checkpoint.
``train.save_frozen=True`` writes them too.

Config fields read (``config.train``): ``steps, lr, warmup_steps,
weight_decay, grad_clip, grad_accum, ckpt_every, keep, log_every, eval_every``
and optionally ``min_lr_ratio, b1, b2, eps, assert_sharded_min_size, save_frozen,
prefetch`` (batches placed on the devices ahead of the step, default 2; 0 = none);
``config.mesh`` and ``config.seed``.  ``train.dtype`` / ``train.remat`` are the
model's business (jobs pass them into the model config).

Host/device overlap: step n is dispatched before step n-1's metrics are
fetched, so the host never waits for the device except at checkpoints/evals; a
background thread (``train/prefetch.py``) reads the next ``train.prefetch`` batches
and places them on the devices while the step runs (the checkpointed data position
is that of the last batch consumed, not of the prefetched ones).

Every ``log_every`` steps the log line and ``metrics.jsonl``/TensorBoard carry
steps/s, examples/s, tokens/s (global batch x sequence positions, padding included),
``data_wait`` (the fraction of wall time the loop spent blocked waiting for the next
batch) and, on devices with a known peak (``train/mfu.py``), the MFU: the compiled
step's FLOPs per device (XLA cost analysis) over step time x peak.
Every step's metrics are checked; a NaN/Inf stops the run with an error naming
the step and the metric (the state of that step is never checkpointed).

Preemption (``train/preemption.py``): a stop request -- SIGTERM on one process, JAX's
preemption sync point on several -- is polled at every step boundary: checkpoint, then
``SystemExit(0)``.  The loop uses the job's preemption scope (``main.py`` opens one for the
whole job) or, outside one, opens its own for the training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from userllm_jax import paths
from userllm_jax.train import checkpoint as ckpt_lib
from userllm_jax.train import mesh as mesh_lib
from userllm_jax.train import mfu as mfu_lib
from userllm_jax.train import optim
from userllm_jax.train import preemption as preemption_lib
from userllm_jax.train import prefetch as prefetch_lib
from userllm_jax.train.metrics_writer import MetricsWriter


class NonFiniteError(FloatingPointError):
  """A train metric became NaN or Inf."""


@dataclasses.dataclass
class TrainResult:
  model: nnx.Module            # the trained model (params = final state), sharded on `mesh`
  state: dict                  # the final train state pytree
  step: int                    # steps done in total
  start_step: int              # 0, or the checkpoint step this run resumed from
  history: list                # [(step, {metric: float})] fetched in this run
  eval_history: list           # [(step, {metric: float})]
  mesh: jax.sharding.Mesh
  compile_stats: dict          # memory / cost analysis of the compiled step
  throughput: list = dataclasses.field(default_factory=list)  # [(step, {steps_per_sec, ...})]


@dataclasses.dataclass
class LoopContext:
  """What a ``step_hook(step, ctx)`` may look at (tests use it)."""
  checkpointer: ckpt_lib.Checkpointer
  state: Any
  workdir: str


def _cfg_get(cfg, name, default):
  try:
    value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
  except AttributeError:
    value = default
  return default if value is None else value


def _shapes(tree) -> tuple:
  return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


def _to_float_dict(metrics) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def _analysis_dict(obj) -> dict:
  if obj is None:
    return {}
  if isinstance(obj, (list, tuple)):
    obj = obj[0] if obj else {}
  if isinstance(obj, dict):
    return {k: v for k, v in obj.items() if isinstance(v, (int, float))}
  out = {}
  for name in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
               "alias_size_in_bytes", "generated_code_size_in_bytes"):
    if hasattr(obj, name):
      out[name] = int(getattr(obj, name))
  return out


def _batch_geometry(abs_batch) -> tuple[int, int]:
  """(global examples, sequence positions per example) of a batch: the second dim of a leaf
  named ``tokens*`` (LLM batches), else of the first leaf with >= 2 dims (e.g. ``*_BxT``)."""
  leaves = jax.tree_util.tree_flatten_with_path(abs_batch)[0]
  named = [x for p, x in leaves if "tokens" in jax.tree_util.keystr(p) and x.ndim >= 2]
  wide = named or [x for _, x in leaves if x.ndim >= 2]
  examples = leaves[0][1].shape[0]
  return examples, (wide[0].shape[1] if wide else 1)


def run_training(config, workdir: str, *, build_model: Callable[[nnx.Rngs], nnx.Module],
                 loss_fn: Callable, train_iter, trainable: Any = nnx.Param,
                 eval_fn: Optional[Callable[[nnx.Module, int], dict]] = None,
                 mesh: Optional[jax.sharding.Mesh] = None,
                 step_hook: Optional[Callable[[int, LoopContext], None]] = None,
                 exit_on_preemption: bool = True,
                 train_config: Any = None) -> TrainResult:
  """Train (or resume training) to ``config.train.steps``; see the module doc.

  ``train_config`` replaces ``config.train`` (a job that trains several models, each with
  its own section, passes it instead of re-packing the config).
  """
  tcfg = config.train if train_config is None else train_config
  total_steps = int(tcfg.steps)
  if total_steps < 0:
    raise ValueError(f"train.steps={total_steps}: must be >= 0")
  seed = int(_cfg_get(config, "seed", 0))
  accum = int(_cfg_get(tcfg, "grad_accum", 1))
  if accum < 1:
    raise ValueError(f"train.grad_accum={accum}: must be >= 1")
  ckpt_every = int(_cfg_get(tcfg, "ckpt_every", 0))
  log_every = max(1, int(_cfg_get(tcfg, "log_every", 50)))
  eval_every = int(_cfg_get(tcfg, "eval_every", 0))
  keep = _cfg_get(tcfg, "keep", 3)
  # Frozen params (e.g. the pretrained LLM under strategy enc/proj/lora) are rebuilt by
  # build_model on resume, so checkpoints leave them out unless train.save_frozen is set.
  save_frozen = bool(_cfg_get(tcfg, "save_frozen", False))
  min_shard = _cfg_get(tcfg, "assert_sharded_min_size", 0)
  prefetch_size = int(_cfg_get(tcfg, "prefetch", 2))
  if mesh is None:
    mesh = mesh_lib.make_mesh(_cfg_get(config, "mesh", None))
  tx, schedule = optim.make_optimizer(tcfg, total_steps)
  primary = jax.process_index() == 0
  paths.makedirs(workdir)   # local dir or object-store prefix (gs://...)

  with jax.set_mesh(mesh):
    # --- structure, shardings --------------------------------------------
    abs_model = nnx.eval_shape(lambda: build_model(nnx.Rngs(seed)))
    graphdef, abs_tr, abs_fr, abs_rest = nnx.split(abs_model, trainable, nnx.Param, ...)
    treedefs = tuple(jax.tree.structure(s) for s in (abs_tr, abs_fr, abs_rest))
    part_specs = {name: mesh_lib.state_partition_specs(s, mesh)
                  for name, s in (("params", abs_tr), ("frozen", abs_fr), ("rest", abs_rest))}
    for name, s in (("params", abs_tr), ("frozen", abs_fr), ("rest", abs_rest)):
      pure_td = jax.tree.structure(nnx.to_pure_dict(s))
      spec_td = jax.tree.structure(part_specs[name], is_leaf=lambda x: isinstance(x, P))
      if pure_td != spec_td:
        raise RuntimeError(f"internal: {name} spec tree {spec_td} != state tree {pure_td}")

    def split_pure(model):
      _, tr, fr, rest = nnx.split(model, trainable, nnx.Param, ...)
      return nnx.to_pure_dict(tr), nnx.to_pure_dict(fr), nnx.to_pure_dict(rest)

    def merge(params, frozen, rest):
      states = [jax.tree.unflatten(td, jax.tree.leaves(p))
                for td, p in zip(treedefs, (params, frozen, rest))]
      return nnx.merge(graphdef, *states)

    def init_fn():
      params, frozen, rest = split_pure(build_model(nnx.Rngs(seed)))
      return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen,
              "rest": rest, "opt_state": tx.init(params)}

    abs_state = jax.eval_shape(init_fn)
    state_specs = {"step": P(), **part_specs,
                   "opt_state": optim.opt_state_specs(tx, abs_state["opt_state"],
                                                      part_specs["params"])}
    state_sh = mesh_lib.named_shardings(state_specs, mesh)
    abs_state_sh = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, state_sh)
    n_train = sum(x.size for x in jax.tree.leaves(abs_state["params"]))
    n_frozen = sum(x.size for x in jax.tree.leaves(abs_state["frozen"]))
    logging.info("model: %s trainable params, %s frozen; grad_accum=%d; mesh %s",
                 f"{n_train:,}", f"{n_frozen:,}", accum, dict(mesh.shape))

    # --- init or resume ------------------------------------------------------
    checkpointer = ckpt_lib.Checkpointer(paths.join(workdir, "checkpoints"),
                                         max_to_keep=keep)
    data_ckpt = train_iter if hasattr(train_iter, "get_state") else None
    if data_ckpt is None:
      logging.warning("train_iter has no get_state(): the data position is not checkpointed")
    def saved_part(tree):
      return tree if save_frozen else {k: v for k, v in tree.items() if k != "frozen"}

    latest = checkpointer.latest_step()
    if latest is not None:
      try:
        state = checkpointer.restore(latest, saved_part(abs_state_sh), data_ckpt)
      except ckpt_lib.DataTopologyError as e:
        if latest < total_steps:
          raise
        # A finished training reads no more data: it resumes on any process count.
        logging.warning("%s -- training is finished (step %d), so no data position is needed",
                        e, latest)
        state = checkpointer.restore(latest, saved_part(abs_state_sh), None)
      if not save_frozen:
        state["frozen"] = jax.jit(lambda: init_fn()["frozen"],
                                  out_shardings=state_sh["frozen"])()
      restored_step = int(jax.device_get(state["step"]))
      if restored_step != latest:
        raise RuntimeError(f"checkpoint {latest} in {checkpointer.directory} holds step "
                           f"{restored_step}")
      start_step = latest
      logging.info("resumed from step %d", start_step)
    else:
      state = jax.jit(init_fn, out_shardings=state_sh)()
      start_step = 0
    if min_shard:
      mesh_lib.assert_sharded(state["params"], mesh, int(min_shard))

    # --- the train step ------------------------------------------------------
    batch_sh = mesh_lib.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    base_key = jax.random.key(seed)

    def train_step(state, batch):
      step = state["step"]
      rng = jax.random.fold_in(base_key, step)

      def loss_of(params, mb, r):
        model = merge(params, state["frozen"], state["rest"])
        loss, metrics = loss_fn(model, mb, r)
        _, _, new_rest = split_pure(model)
        return loss.astype(jnp.float32), (dict(metrics), new_rest)

      grad_fn = jax.value_and_grad(loss_of, has_aux=True)
      (loss, (metrics, new_rest)), grads = optim.accumulate_gradients(
          grad_fn, state["params"], batch, accum, rng, mesh_lib.BATCH_AXES)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
      metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                     lr=jnp.asarray(schedule(step), jnp.float32))
      new_state = {"step": step + 1, "params": params, "frozen": state["frozen"],
                   "rest": new_rest, "opt_state": opt_state}
      return new_state, metrics

    jitted = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, replicated), donate_argnums=(0,))

    def to_global(local):
      def one(x):
        x = np.asarray(x)
        if x.ndim == 0:
          raise ValueError(f"batch leaf of shape {x.shape}: every batch array needs a "
                           "leading batch dimension")
        return jax.make_array_from_process_local_data(batch_sh, x)
      return jax.tree.map(one, local)

    history: list = []
    eval_history: list = []
    throughput: list = []
    compile_stats: dict = {}
    feed = None                 # DevicePrefetcher over `iterator`, after the first batch
    perf = {"flops": None, "peak": None, "examples": 0, "tokens": 0}
    writer = MetricsWriter(workdir, enabled=primary)
    scopes = contextlib.ExitStack()
    preemption = scopes.enter_context(preemption_lib.scope())
    ctx = LoopContext(checkpointer=checkpointer, state=state, workdir=workdir)
    step = start_step
    pending = None
    last_log = [time.time(), step]
    iterator = iter(train_iter)

    def consume(item):
      s, metrics = item
      values = _to_float_dict(jax.device_get(metrics))
      bad = sorted((k for k, v in values.items() if not math.isfinite(v)),
                   key=lambda k: (k != "loss", k))
      if bad:
        raise NonFiniteError(
            f"step {s}: metric {bad[0]!r} = {values[bad[0]]} is not finite (NaN/Inf); "
            f"all metrics: {values}. Training stopped; last checkpoint: "
            f"{checkpointer.latest_step()} in {checkpointer.directory}")
      history.append((s, values))
      if (s + 1) % log_every == 0 or s == start_step or s + 1 == total_steps:
        now = time.time()
        window = max(now - last_log[0], 1e-9)
        rate = (s + 1 - last_log[1]) / window
        wait = 0.0
        if feed is not None:
          wait, feed.wait_s = feed.wait_s, 0.0
        last_log[:] = [now, s + 1]
        perf_now = {"steps_per_sec": rate, "examples_per_sec": perf["examples"] * rate,
                    "tokens_per_sec": perf["tokens"] * rate,
                    "data_wait_frac": min(wait / window, 1.0)}
        util = mfu_lib.mfu(perf["flops"], 1.0 / rate if rate > 0 else 0.0, perf["peak"])
        if util is not None:
          perf_now["mfu"] = util
        throughput.append((s, perf_now))
        logging.info("step %d/%d %s %.2f steps/s %.4g tokens/s data_wait=%.1f%%%s", s,
                     total_steps, " ".join(f"{k}={v:.5g}" for k, v in sorted(values.items())),
                     rate, perf_now["tokens_per_sec"], 100 * perf_now["data_wait_frac"],
                     "" if util is None else f" MFU={100 * util:.1f}%")
        writer.write_scalars(s, {f"train/{k}": v for k, v in values.items()}
                             | {f"train/{k}": v for k, v in perf_now.items()})

    try:
      first_batch = None
      if step < total_steps:
        try:
          first_batch = next(iterator)
        except StopIteration as e:
          raise RuntimeError(f"train_iter is empty at step {step}") from e
        abs_batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((np.shape(x)[0] * jax.process_count(),)
                                           + np.shape(x)[1:], np.asarray(x).dtype,
                                           sharding=batch_sh), first_batch)
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        for leaf in jax.tree.leaves(abs_batch):
          if leaf.shape[0] % (dp * accum):
            raise ValueError(
                f"global batch {leaf.shape[0]} (per-process {leaf.shape[0] // jax.process_count()}"
                f" x {jax.process_count()} processes) is not divisible by data*fsdp={dp} x "
                f"train.grad_accum={accum}")
        first_shapes = _shapes(abs_batch)
        t0 = time.time()
        compiled = jitted.lower(abs_state_sh, abs_batch).compile()
        compile_stats = {"compile_s": time.time() - t0,
                         **_analysis_dict(compiled.memory_analysis()),
                         **{f"cost_{k}": v for k, v in
                            _analysis_dict(compiled.cost_analysis()).items()
                            if k in ("flops", "bytes accessed", "transcendentals")}}
        logging.info("compiled train step in %.1fs: %s", compile_stats["compile_s"],
                     {k: v for k, v in compile_stats.items() if k != "compile_s"})
        examples, positions = _batch_geometry(abs_batch)
        perf.update(flops=compile_stats.get("cost_flops"),
                    peak=mfu_lib.device_peak_flops(mesh.devices.flat[0]),
                    examples=examples, tokens=examples * positions)
        compile_stats.update(device_kind=getattr(mesh.devices.flat[0], "device_kind", ""),
                             peak_flops_per_device=perf["peak"])
        if perf["peak"] is None:
          logging.info("no peak FLOP/s known for device %r: logging throughput, not MFU",
                       compile_stats["device_kind"])
        feed = prefetch_lib.DevicePrefetcher(iterator, to_global, prefetch_size,
                                             first=first_batch)
        first_batch = None
        last_log[:] = [time.time(), step]     # steps/s excludes the compile

      while step < total_steps:
        try:
          batch = next(feed)
        except StopIteration as e:
          raise RuntimeError(f"train_iter ran out of data at step {step} of "
                             f"{total_steps}") from e
        # The AOT-compiled step serves the first batch's shapes; a batch of other shapes (e.g.
        # stage 2's one-task batches, each padded to its task's longest target) goes through
        # the jit cache, which compiles once per shape.
        step_fn = compiled if _shapes(batch) == first_shapes else jitted
        state, metrics = step_fn(state, batch)
        if pending is not None:
          consume(pending)
        pending = (step, metrics)
        step += 1
        ctx.state = state

        want_ckpt = (ckpt_every > 0 and step % ckpt_every == 0) or step == total_steps
        want_eval = eval_fn is not None and eval_every > 0 and step % eval_every == 0
        preempted = preemption.requested()
        if want_ckpt or want_eval or preempted:
          consume(pending)       # never checkpoint a NaN state
          pending = None
        if want_eval:
          values = _to_float_dict(eval_fn(merge(state["params"], state["frozen"],
                                                state["rest"]), step))
          eval_history.append((step, values))
          logging.info("eval step %d: %s", step, values)
          writer.write_scalars(step, {f"eval/{k}": v for k, v in values.items()})
        if want_ckpt or preempted:
          checkpointer.save(step, saved_part(state),
                            feed.position() if data_ckpt is not None else None,
                            force=preempted)
          writer.flush()   # on an object store, the metrics up to the checkpoint survive a kill
        if step_hook is not None:
          step_hook(step, ctx)
        if preempted:
          checkpointer.wait()
          logging.warning("preempted: checkpoint of step %d written; exiting", step)
          if exit_on_preemption:
            writer.close()
            checkpointer.close()
            raise SystemExit(0)
          break
      if pending is not None:
        consume(pending)
        pending = None
    finally:
      if feed is not None:
        feed.close()
      scopes.close()
      writer.close()
      checkpointer.close()

    model = merge(state["params"], state["frozen"], state["rest"])
  return TrainResult(model=model, state=state, step=step, start_step=start_step,
                     history=history, eval_history=eval_history, mesh=mesh,
                     compile_stats=compile_stats, throughput=throughput)
