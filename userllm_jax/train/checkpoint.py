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
and process count restores on another (e.g. 2 processes x 4 devices -> 1 x 8
or 1 x 1): Orbax reads each array's global value and lays it out anew.

The directory is any :mod:`userllm_jax.paths` location (``/local/dir`` or
``gs://bucket/run/checkpoints``); it is never turned into a local path.

The data position across a change of process count
--------------------------------------------------
Grain writes one ``process_{i}-of-{N}.json`` per process. Restored on the same
N, each process reads its own file. Restored on M != N processes, the rule
depends on the iterator's *shard layout* (declared with :func:`set_shard_layout`,
or recognised from Grain's own state):

* ``"elastic"`` (``grain.experimental.ElasticIterator``; state
  ``{"global_next_index": g}``, the same in every process): every process
  restores ``g`` and reads its shard of the global order from there.
* ``"strided"``: process ``i`` of ``N`` reads examples ``i, i+N, i+2N, ...`` of
  one deterministic global order (``ds[i::N]`` after a seeded shuffle, then
  per-example maps and an iterator-level ``batch``); its state is ``{"next_index": n}``,
  the number of examples it has taken. Processes move in lockstep (same per-process
  batch), so all N states hold the same ``n``, and the examples consumed are
  exactly global positions ``0 .. N*n - 1`` (= global step x global batch). On M
  processes each one restarts its slice ``ds[i::M]`` at ``N*n / M``: together they
  continue at global position ``N*n`` -- nothing lost and nothing repeated within
  an epoch (epoch boundaries are positions of the global order, so they hold too).
  ``N*n`` must divide by M; it always does when the new global batch divides by M.
* ``"replicated"``: process ``i``'s batch ``k`` is its block of rows of global batch ``k``
  (``data/pipeline.make_train_iterator`` without packing or worker processes,
  ``stage2/examples.training_stream``); the state (the number of global batches taken) is
  the same in every process and means the same on any process count: every process
  restores it.
* anything else (packing buffers, ``mp_prefetch`` worker states, an undeclared
  iterator): :class:`DataTopologyError` naming both process counts and the ways
  forward (restore on N processes, or use an elastic/strided pipeline).

Typed PRNG key arrays (NNX ``RngKey`` variables) are stored as their raw
``key_data`` and re-wrapped on restore.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from userllm_jax import paths

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
      # key_impl() takes arrays only; an abstract target carries the impl in its dtype.
      impl = (jax.random.key_impl(a) if isinstance(a, jax.Array)
              else a.dtype._impl)  # pylint: disable=protected-access
      return jax.random.wrap_key_data(x, impl=impl)
    return x
  return jax.tree.map(conv, restored, abstract_state)


class DataTopologyError(RuntimeError):
  """The data iterator's position cannot be carried to this process count."""


ELASTIC = "elastic"
STRIDED = "strided"
REPLICATED = "replicated"
_LAYOUT_ATTR = "_userllm_shard_layout"
_STATE_FILE = re.compile(r"^process_(\d+)-of-(\d+)\.json$")


def set_shard_layout(iterator, layout: str):
  """Declares how ``iterator`` shards its data over processes (see the module doc);
  returns ``iterator``. ``layout`` is ``"strided"``, ``"elastic"`` or ``"replicated"``."""
  if layout not in (ELASTIC, STRIDED, REPLICATED):
    raise ValueError(f"layout must be {ELASTIC!r}, {STRIDED!r} or {REPLICATED!r}, got "
                     f"{layout!r}")
  setattr(iterator, _LAYOUT_ATTR, layout)
  return iterator


def shard_layout(iterator) -> Optional[str]:
  return getattr(iterator, _LAYOUT_ATTR, None)


def reshard_data_state(states: dict[int, Any], new_index: int, new_count: int, *,
                       layout: Optional[str], where: str = "") -> Any:
  """The iterator state for process ``new_index`` of ``new_count`` from the saved per-process
  ``states`` ({old process index: state}) of another process count (rule: module doc)."""
  old_count = len(states)
  ways = (f"Ways forward: resume on {old_count} processes (the data position then restores "
          f"exactly), or train with a data iterator whose shard layout is {ELASTIC!r} "
          f"(grain.experimental.ElasticIterator), {REPLICATED!r} (data/pipeline "
          "make_train_iterator without packing and without worker processes, the "
          f"encoder job's default) or {STRIDED!r}, or start a fresh workdir.")
  head = (f"checkpoint{' ' + where if where else ''}: the data iterator was saved by "
          f"{old_count} processes and is restored on {new_count}")
  values = list(states.values())
  if all(isinstance(s, dict) and set(s) == {"global_next_index"} for s in values):
    if len({s["global_next_index"] for s in values}) != 1:
      raise DataTopologyError(f"{head}, but the saved global positions differ "
                              f"({sorted({s['global_next_index'] for s in values})}). {ways}")
    return dict(values[0])
  if layout == REPLICATED:
    if any(s != values[0] for s in values):
      raise DataTopologyError(f"{head}, but the saved states differ ({values}); the "
                              f"{REPLICATED!r} layout needs one global position. {ways}")
    return values[0]
  if layout == STRIDED and all(isinstance(s, dict) and set(s) == {"next_index"}
                               for s in values):
    per = {s["next_index"] for s in values}
    if len(per) != 1:
      raise DataTopologyError(
          f"{head}, but the processes had taken different numbers of examples "
          f"({sorted(per)}); the strided rule needs lockstep processes. {ways}")
    consumed = old_count * per.pop()
    if consumed % new_count:
      raise DataTopologyError(
          f"{head}: {consumed} examples were consumed in the global order, which does "
          f"not split evenly over {new_count} processes. {ways}")
    return {"next_index": consumed // new_count}
  kind = (f"its shard layout is {layout!r} and its state has keys "
          f"{sorted(values[0]) if isinstance(values[0], dict) else type(values[0]).__name__}")
  raise DataTopologyError(f"{head}; {kind}, for which no rule carries the position "
                          f"across process counts. {ways}")


class Checkpointer:
  """A thin wrapper of ``ocp.CheckpointManager`` for (train state, data iterator)."""

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3,
               async_save: bool = True):
    # paths.path keeps gs:// URIs intact (os.path.abspath would make them $PWD/gs:/...).
    self.directory = paths.path(directory)
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
    data_state = None
    if data_iter is not None:
      # Check the data first (cheap, and its error must not be blamed on the model).
      data_state = self._data_state_for_this_process(step, data_iter)
      if data_state is None:
        items["data"] = grain_ckpt.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise RuntimeError(
          f"checkpoint: cannot restore step {step} from {self.directory} into the current "
          f"model/optimizer structure ({type(e).__name__}: {e}). A checkpoint of a "
          "different model or optimizer config cannot be resumed; use a fresh workdir."
      ) from e
    if data_state is not None:
      data_iter.set_state(data_state)
      if hasattr(data_iter, "start_prefetch"):
        data_iter.start_prefetch()
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return from_saveable(restored["state"], abstract_state)

  def _data_state_for_this_process(self, step: int, data_iter):
    """None when Grain's own restore applies (same process count); else this process's
    iterator state by :func:`reshard_data_state`."""
    index, count = jax.process_index(), jax.process_count()
    data_dir = self.directory / str(step) / "data"
    if (data_dir / f"process_{index}-of-{count}.json").exists():
      return None
    if not data_dir.exists():
      raise DataTopologyError(
          f"checkpoint step {step} in {self.directory} has no data iterator state "
          f"({data_dir} missing); it was saved without one")
    saved: dict[int, dict[int, Any]] = {}
    for f in data_dir.iterdir():
      m = _STATE_FILE.match(f.name)
      if m:
        saved.setdefault(int(m.group(2)), {})[int(m.group(1))] = json.loads(f.read_text())
    complete = {n: st for n, st in saved.items() if sorted(st) == list(range(n))}
    if not complete:
      raise DataTopologyError(
          f"checkpoint step {step} in {self.directory}: no complete set of data iterator "
          f"states in {data_dir} (found {sorted(f.name for f in data_dir.iterdir())})")
    old_count = max(complete)
    new = reshard_data_state(complete[old_count], index, count,
                             layout=shard_layout(data_iter), where=f"step {step}")
    logging.info("checkpoint: data position of %d processes carried to %d (process %d: %s)",
                 old_count, count, index, new)
    return new

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption notice (all processes agree on the step)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
