"""Orbax checkpoints holding the train state *and* the Grain data iterator.

One ``ocp.CheckpointManager`` (async, ``max_to_keep``) per workdir.  A step is
saved as ``ocp.args.Composite(state=StandardSave(train_state),
data=grain.checkpoint.CheckpointSave(iterator))``; Grain writes one small JSON
per process (each process reads its own data shard).  The iterator state is
captured synchronously inside ``save`` (Grain's handler is blocking), so it is
exactly the position after the saved step even though the arrays are written
in the background.

Restoring goes into an *abstract sharded target* (``jax.ShapeDtypeStruct``
with the current mesh's shardings), so a checkpoint written on one mesh shape
restores on another (e.g. 8 devices as (2, 4) -> 1 device).

Typed PRNG key arrays (NNX ``RngKey`` variables) are stored as their raw
``key_data`` and re-wrapped on restore.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

try:
  import grain.checkpoint as grain_ckpt  # registers the Grain handler with Orbax
except ImportError:  # pragma: no cover
  grain_ckpt = None


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def to_saveable(state):
  """Replace typed PRNG key arrays by their ``key_data`` (Orbax stores plain arrays)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def abstract_saveable(abstract_state):
  """The abstract target matching :func:`to_saveable` of ``abstract_state``."""
  def conv(x):
    if _is_key(x):
      return jax.eval_shape(jax.random.key_data, x)
    return x
  def conv_with_sharding(x):
    out = conv(x)
    sharding = getattr(x, "sharding", None)
    if sharding is not None and out is not x:
      # key_data adds a trailing dim: replicate it.
      spec = tuple(sharding.spec) + (None,) * (out.ndim - len(sharding.spec))
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
      out = jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding)
    return out
  return jax.tree.map(conv_with_sharding, abstract_state)


def from_saveable(restored, abstract_state):
  """Inverse of :func:`to_saveable`, guided by the abstract (typed) target."""
  def conv(x, a):
    if _is_key(a):
      return jax.random.wrap_key_data(x, impl=jax.random.key_impl(a))
    return x
  return jax.tree.map(conv, restored, abstract_state)


class Checkpointer:
  """A thin wrapper of ``ocp.CheckpointManager`` for (train state, data iterator)."""

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    """Start saving ``state`` (and the iterator position) as ``step``; non-blocking."""
    items = {"state": ocp.args.StandardSave(to_saveable(state))}
    if data_iter is not None:
      items["data"] = grain_ckpt.CheckpointSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restore ``step`` into ``abstract_state`` (ShapeDtypeStructs with shardings).

    ``data_iter`` (if given) is repositioned in place.  Returns the state.
    """
    items = {"state": ocp.args.StandardRestore(abstract_saveable(abstract_state))}
    if data_iter is not None:
      items["data"] = grain_ckpt.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise RuntimeError(
          f"checkpoint: cannot restore step {step} from {self.directory} into the current "
          f"model/optimizer structure ({type(e).__name__}: {e}). A checkpoint of a "
          "different model or optimizer config cannot be resumed; use a fresh workdir."
      ) from e
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return from_saveable(restored["state"], abstract_state)

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption notice (all processes agree on the step)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
