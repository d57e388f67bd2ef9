"""Device mesh, logical-axis rules and parameter shardings.

One mesh with three axes, ``('data', 'fsdp', 'tensor')``:

* ``data``   -- pure data parallelism (the batch is split, params replicated);
* ``fsdp``   -- the batch is split *and* parameters are sharded along their
  ``'embed'`` dimension (ZeRO-3 style; XLA all-gathers them per use);
* ``tensor`` -- Megatron-style model parallelism over vocab / mlp / heads.

Axis types: the mesh uses ``AxisType.Auto`` for every axis (the classic GSPMD
behaviour: we place the inputs, XLA propagates shardings through the step).
``jax.make_mesh`` defaults to ``Explicit`` axes in JAX 0.10, which would make
sharding part of every array's type and require the model code (written
without any mesh knowledge) to resolve each ambiguous op; ``Auto`` keeps the
models mesh-agnostic, and the train step pins its inputs/outputs with explicit
``in_shardings``/``out_shardings`` so nothing is left to chance at the
boundary.

Models name the *logical* axes of each parameter (``models.common.param``
stores them as the ``logical_axes`` metadata of the ``nnx.Param``); the single
table :data:`LOGICAL_RULES` maps them to mesh axes.  A mesh axis that does not
divide a dimension is dropped for that dimension (logged), so any model runs on
any mesh -- it is only less sharded.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every axis that carries data parallelism.
BATCH_AXES = ("data", "fsdp")

MeshAxes = Union[None, str, Sequence[str]]

# logical name -> mesh axis (or axes, or None = replicated).  Order matters only
# in that a mesh axis already used by an earlier dimension of the same array is
# not reused.
LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),      # token embedding / output projection rows
    ("items", "tensor"),      # item-id embedding table rows
    ("embed", "fsdp"),        # model width: ZeRO-3 sharding of every matrix
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("latents", None),
)


def _rules_dict(rules) -> dict[str, tuple[str, ...]]:
  out = {}
  for name, axes in rules:
    if axes is None:
      out[name] = ()
    elif isinstance(axes, str):
      out[name] = (axes,)
    else:
      out[name] = tuple(axes)
  return out


def resolve_mesh_shape(mesh_cfg: Optional[Mapping[str, int]], num_devices: int) -> tuple[int, ...]:
  """Sizes for ``('data', 'fsdp', 'tensor')``; one entry may be -1 (= the rest).

  A missing ``mesh_cfg`` (or missing axes) means ``data=-1, fsdp=1, tensor=1``.
  """
  cfg = dict(mesh_cfg or {})
  unknown = set(cfg) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh config: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  if not cfg:
    cfg = {"data": -1}
  sizes = [int(cfg.get(a, 1)) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh config {cfg}: at most one axis may be -1")
  for axis, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"mesh config: mesh.{axis}={s}; expected a positive size or -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f"mesh config {cfg}: {num_devices} devices are not divisible by the fixed axes "
          f"(product {fixed})")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh config {cfg}: mesh shape {dict(zip(MESH_AXES, sizes))} has "
        f"{math.prod(sizes)} devices, but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_cfg: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
  """A ``('data', 'fsdp', 'tensor')`` mesh with ``AxisType.Auto`` axes (see module doc)."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), len(devices),
               jax.process_count())
  return mesh


def logical_to_spec(axes: Optional[Sequence[Optional[str]]], shape: Sequence[int],
                    mesh_shape: Mapping[str, int], *, rules=LOGICAL_RULES,
                    name: str = "") -> P:
  """PartitionSpec for an array with logical ``axes`` of ``shape`` on a mesh.

  ``mesh_shape`` maps mesh axis -> size (``mesh.shape`` of a Mesh or AbstractMesh).
  Size-1 mesh axes are left out; a mesh axis that does not divide its
  dimension is dropped (logged) so the dimension falls back to replication.
  """
  if axes is None:
    return P()
  axes = tuple(axes)
  if len(axes) != len(shape):
    raise ValueError(f"{name or 'array'}: logical axes {axes} do not match shape {tuple(shape)}")
  table = _rules_dict(rules)
  used: set[str] = set()
  spec = []
  for dim, logical in zip(shape, axes):
    if logical is None:
      spec.append(None)
      continue
    if logical not in table:
      raise ValueError(
          f"{name or 'array'}: unknown logical axis {logical!r} (shape {tuple(shape)}); "
          f"known: {sorted(table)} (train/mesh.py LOGICAL_RULES)")
    chosen = [a for a in table[logical] if a not in used and mesh_shape.get(a, 1) > 1]
    while chosen and dim % math.prod(mesh_shape[a] for a in chosen):
      dropped = chosen.pop()
      logging.info("%s: mesh axis %r (size %d) does not divide %s dim of size %d; "
                   "replicating over it", name or "array", dropped, mesh_shape[dropped],
                   logical, dim)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def _nest(items) -> dict:
  out: dict = {}
  for path, value in items:
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def state_partition_specs(state: nnx.State, mesh, *, rules=LOGICAL_RULES) -> dict:
  """Nested dict (same structure as ``nnx.to_pure_dict(state)``) of PartitionSpecs.

  Each ``nnx.Variable`` with ``logical_axes`` metadata is sharded by the rules;
  variables without it (RNG counters, keys, scalars) are replicated.
  """
  mesh_shape = dict(mesh.shape)
  items = []
  for path, var in nnx.to_flat_state(state):
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    axes = meta.get("logical_axes")
    shape = getattr(var, "shape", None)
    if shape is None:
      shape = np.shape(var[...])
    if axes is None or len(shape) == 0:
      spec = P()
    else:
      spec = logical_to_spec(axes, shape, mesh_shape, rules=rules, name=_path_str(path))
    items.append((path, spec))
  return _nest(items)


def named_shardings(specs, mesh) -> Any:
  """Map a pytree of PartitionSpecs to NamedShardings on ``mesh``."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def state_shardings(state: nnx.State, mesh, *, rules=LOGICAL_RULES) -> dict:
  """Nested dict of NamedShardings for an nnx state (see :func:`state_partition_specs`)."""
  return named_shardings(state_partition_specs(state, mesh, rules=rules), mesh)


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over ``('data', 'fsdp')``."""
  return NamedSharding(mesh, P(BATCH_AXES))


def process_batch_block(mesh, global_batch: int) -> tuple[int, int]:
  """``(index, count)``: this process's rows of a global batch of ``global_batch`` rows split by
  :func:`batch_sharding` are block ``index`` of ``count`` equal, contiguous blocks.

  Feed block ``index`` (rows ``index * global_batch // count`` onwards) to
  ``jax.make_array_from_process_local_data`` and the global array is the 1-process batch, row
  for row.  Raises if the process's devices do not hold one contiguous block.
  """
  rows = set()
  for (sl, *_) in batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values():
    rows.add((sl.start or 0, global_batch if sl.stop is None else sl.stop))
  lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
  covered = sum(b - a for a, b in rows)
  size = hi - lo
  if covered != size or global_batch % size or lo % size:
    raise ValueError(f"mesh {dict(mesh.shape)}: process {jax.process_index()}'s devices hold "
                     f"batch rows {sorted(rows)} of {global_batch}, not one contiguous block; "
                     "order the mesh's devices by process along ('data', 'fsdp')")
  return lo // size, global_batch // size


def host_to_global(x, mesh) -> jax.Array:
  """A host array that every process holds whole -> a global array on ``mesh``.

  The leading (batch) dimension is split over ``('data', 'fsdp')`` when they divide it, else
  the array is replicated; each process fills only its own devices' rows from ``x``, so
  nothing crosses hosts.  For inputs every process builds identically (evaluation batches);
  training batches, of which each process reads its own part, use
  ``jax.make_array_from_process_local_data``.
  """
  x = np.asarray(x)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  spec = P(BATCH_AXES) if x.ndim and x.shape[0] % dp == 0 else P()
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


def shard_model(model: nnx.Module, mesh, *, rules=LOGICAL_RULES) -> nnx.Module:
  """Place ``model``'s variables on ``mesh`` by the rules (in place); returns it."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules=rules)
  pure = nnx.to_pure_dict(state)
  placed = jax.device_put(pure, shardings)
  nnx.replace_by_pure_dict(state, placed)
  nnx.update(model, state)
  return model


def assert_sharded(tree, mesh, min_size: int = 2**20, *, name: str = "params") -> None:
  """Raise AssertionError if any array with >= ``min_size`` elements is fully replicated.

  ``tree`` is a pytree of ``jax.Array`` (e.g. the param part of the train
  state).  A 1-device mesh cannot shard anything: the check is skipped there.
  """
  if mesh.size == 1:
    logging.info("assert_sharded: 1-device mesh, nothing to check")
    return
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not isinstance(leaf, jax.Array) or leaf.size < min_size:
      continue
    if leaf.sharding.is_fully_replicated:
      spec = getattr(leaf.sharding, "spec", None)
      bad.append(f"{name}{jax.tree_util.keystr(path)} shape={leaf.shape} "
                 f"size={leaf.size} sharding={spec}")
  if bad:
    raise AssertionError(
        f"{len(bad)} arrays with >= {min_size} elements are fully replicated on mesh "
        f"{dict(mesh.shape)} (check their logical_axes and train/mesh.py LOGICAL_RULES):\n  "
        + "\n  ".join(bad))
