"""Assigning a flat ``{tree path: np.ndarray}`` of Gemma 3 weights into an NNX ``Gemma3``.

Every loader (GGUF, safetensors, Orbax) produces the same two things:

* ``params``: a flat dict keyed by the dotted NNX tree path of ``models/gemma.py``
  (``embedder.input_embedding``, ``layers.3.attn.q_proj.kernel``, ``final_norm.scale`` ...),
  values are host numpy arrays in our layout (``[D,H,Dh]`` kernels, norm weights ``w`` with the
  applied scale ``1 + w``).
* ``spec``: a dict of architecture fields (:data:`SPEC_FIELDS`), turned into a ``GemmaConfig``
  by :func:`make_config`.

:func:`build_model` makes the model abstractly with ``nnx.eval_shape`` (no random init, no memory
for weights), checks every key, shape and dtype against the loaded dict, reports missing and
unexpected keys by name, and fills the state: with a mesh each array goes straight to its
``NamedSharding`` (from the param's ``logical_axes`` metadata and the rules table) with
``jax.device_put`` -- no full copy per device.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from userllm_jax.train import mesh as mesh_lib

# Architecture fields every loader derives (our names; make_config maps them onto GemmaConfig).
SPEC_FIELDS = (
    "vocab_size", "num_layers", "embed_dim", "mlp_dim", "num_heads", "num_kv_heads", "head_dim",
    "sliding_window", "sliding_pattern", "rope_base_global", "rope_base_local", "max_seq_len",
    "norm_eps", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
)



class WeightsError(ValueError):
  """A checkpoint does not match the model (names the keys, shapes or dtypes at fault)."""


def expected_shapes(spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """The parameter tree a Gemma 3 with ``spec`` has: ``{path: shape}`` (no cross-attention)."""
  v, d, f = spec["vocab_size"], spec["embed_dim"], spec["mlp_dim"]
  h, k, dh = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
  out = {"embedder.input_embedding": (v, d), "final_norm.scale": (d,)}
  for i in range(spec["num_layers"]):
    p = f"layers.{i}."
    out.update({
        p + "pre_attention_norm.scale": (d,), p + "post_attention_norm.scale": (d,),
        p + "pre_ffw_norm.scale": (d,), p + "post_ffw_norm.scale": (d,),
        p + "attn.q_proj.kernel": (d, h, dh), p + "attn.k_proj.kernel": (d, k, dh),
        p + "attn.v_proj.kernel": (d, k, dh), p + "attn.o_proj.kernel": (h, dh, d),
        p + "attn.q_norm.scale": (dh,), p + "attn.k_norm.scale": (dh,),
        p + "mlp.gate_proj.kernel": (d, f), p + "mlp.up_proj.kernel": (d, f),
        p + "mlp.down_proj.kernel": (f, d),
    })
  return out


def check_params(params: Mapping[str, np.ndarray], spec: Mapping[str, Any], *,
                 source: str = "checkpoint") -> None:
  """Raises :class:`WeightsError` unless ``params`` is exactly the tree of ``spec``."""
  _compare({k: tuple(np.shape(v)) for k, v in params.items()}, expected_shapes(spec), source)


def _compare(got: Mapping[str, tuple], want: Mapping[str, tuple], source: str) -> None:
  missing = sorted(set(want) - set(got), key=_natural)
  unexpected = sorted(set(got) - set(want), key=_natural)
  bad_shape = [f"{k}: expected {want[k]}, got {got[k]}" for k in sorted(want, key=_natural)
               if k in got and tuple(got[k]) != tuple(want[k])]
  if missing or unexpected or bad_shape:
    lines = [f"{source} does not match the model parameter tree:"]
    if missing:
      lines.append(f"  missing ({len(missing)}): {_abbrev(missing)}")
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): {_abbrev(unexpected)}")
    if bad_shape:
      lines.append(f"  wrong shape ({len(bad_shape)}): " + "; ".join(bad_shape[:12])
                   + (" ..." if len(bad_shape) > 12 else ""))
    raise WeightsError("\n".join(lines))


def _abbrev(keys: Sequence[str], n: int = 20) -> str:
  return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _natural(key: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def path_str(path: Sequence[Any]) -> str:
  """An NNX state path tuple as the dotted key used by the loaders."""
  return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


# ----------------------------------------------------------------------------------------------
# GemmaConfig construction

_CONFIG_ALIASES = {  # our spec name -> the GemmaConfig field
    "vocab_size": "vocab_size", "num_layers": "num_layers", "embed_dim": "embed_dim",
    "mlp_dim": "mlp_dim", "num_heads": "num_heads", "num_kv_heads": "num_kv_heads",
    "head_dim": "head_dim", "sliding_window": "sliding_window", "sliding_pattern": "global_every",
    "rope_base_global": "global_rope_base", "rope_base_local": "local_rope_base",
    "rope_scale_global": "global_rope_scale", "norm_eps": "rms_eps",
    "query_pre_attn_scalar": "query_pre_attn_scalar",
}
# Spec fields the model does not have; the checkpoint is only representable with these values.
_IMPLIED = {"attn_logit_softcap": None, "final_logit_softcap": None}
# Informational spec fields (not architecture).
_INFO = ("max_seq_len",)


def make_config(spec: Mapping[str, Any], base: Any = None, **overrides) -> Any:
  """A ``models.gemma.GemmaConfig`` with the architecture in ``spec``.

  Starts from ``base`` (a GemmaConfig; default: the spec's own fields plus GemmaConfig defaults)
  and replaces every field the spec determines; ``overrides`` (e.g. ``dtype='bfloat16'``) win.
  Raises :class:`WeightsError` when the spec needs something GemmaConfig cannot express
  (logit soft-capping, an unknown field).
  """
  from userllm_jax.models import gemma as gemma_lib  # pylint: disable=import-outside-toplevel
  fields = {}
  for key, value in spec.items():
    if key in _INFO:
      continue
    if key in _IMPLIED:
      if value != _IMPLIED[key]:
        raise WeightsError(f"checkpoint needs {key}={value!r}; models/gemma.py does not "
                           "implement it")
      continue
    if key not in _CONFIG_ALIASES:
      raise WeightsError(f"spec field {key!r}={value!r} has no GemmaConfig counterpart")
    fields[_CONFIG_ALIASES[key]] = value
  fields.update(overrides)
  if base is None:
    return gemma_lib.GemmaConfig(**fields)
  return dataclasses.replace(base, **fields)


def check_against_preset(spec: Mapping[str, Any], preset: Any, *, source: str) -> None:
  """Raises if ``spec`` disagrees with a GemmaConfig ``preset`` on any field both define."""
  names = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)}
  diffs = []
  for key, value in spec.items():
    field = _CONFIG_ALIASES.get(key)
    if field is None or field not in names or value is None:
      continue
    pv = names[field]
    if isinstance(value, float) or isinstance(pv, float):
      same = pv is not None and np.isclose(float(pv), float(value), rtol=1e-6)
    else:
      same = pv == value
    if not same:
      diffs.append(f"{field}: preset {pv!r}, {source} {value!r}")
  if diffs:
    raise WeightsError(f"{source} disagrees with the preset: " + "; ".join(diffs))


# ----------------------------------------------------------------------------------------------
# Sharding


def logical_rules() -> tuple:
  """The one logical-axis rules table: ``train/mesh.py``'s :data:`LOGICAL_RULES`."""
  return tuple(mesh_lib.LOGICAL_RULES)


def partition_spec(logical_axes: Optional[Sequence[Optional[str]]], shape: Sequence[int],
                   mesh: jax.sharding.Mesh, rules: Sequence = None) -> jax.sharding.PartitionSpec:
  """A PartitionSpec for one param by ``train/mesh.py``'s :func:`logical_to_spec` (the same
  table and the same rule the trainer uses: an axis stays unsharded if its mesh axis is absent,
  of size 1, already used, or does not divide the dimension)."""
  if logical_axes is None:
    return jax.sharding.PartitionSpec()
  kw = {} if rules is None else {"rules": tuple(rules)}
  return mesh_lib.logical_to_spec(tuple(logical_axes), tuple(shape), dict(mesh.shape), **kw)


# ----------------------------------------------------------------------------------------------
# Assignment


def assign_state(state: nnx.State, params: Mapping[str, np.ndarray], *,
                 mesh: Optional[jax.sharding.Mesh] = None, rules: Sequence = None,
                 source: str = "checkpoint", allow_missing: Callable[[str], bool] = None,
                 cast: bool = True) -> nnx.State:
  """Fills an (abstract or concrete) param ``state`` from ``params``; returns the new state.

  Every key of ``state`` must be in ``params`` (except those ``allow_missing(key)`` accepts,
  which keep their current value and so must be concrete), and every key of ``params`` must be
  in ``state``; shapes must match exactly. Values are cast to the state's dtype (``cast=False``
  makes a dtype difference an error instead).
  """
  flat = _flat(state)
  entries = [(path_str(path), path, var) for path, var in flat]
  want = {k: tuple(var.shape if hasattr(var, "shape") else np.shape(var[...]))
          for k, _, var in entries}
  skipped = {k for k in want if k not in params and allow_missing is not None and allow_missing(k)}
  _compare({k: tuple(np.shape(v)) for k, v in params.items()},
           {k: s for k, s in want.items() if k not in skipped}, source)
  dtype_errors = []
  new_leaves = []
  for key, path, var in entries:
    target_dtype = _var_dtype(var)
    if key in skipped:
      value = var.get_value() if isinstance(var, nnx.Variable) else var
      if isinstance(value, jax.ShapeDtypeStruct):
        raise WeightsError(f"{source}: {key} is missing and has no initial value")
      if mesh is not None:
        value = jax.device_put(value, _sharding(var, value.shape, mesh, rules))
      new_leaves.append((path, _replace_value(var, value)))
      continue
    value = params[key]
    if not cast and np.dtype(value.dtype) != np.dtype(target_dtype):
      dtype_errors.append(f"{key}: expected {np.dtype(target_dtype)}, got {value.dtype}")
      continue
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
      raise WeightsError(f"{source}: {key} contains non-finite values")
    if mesh is not None:
      arr = _put_sharded(value, target_dtype, _sharding(var, value.shape, mesh, rules))
    else:
      arr = jnp.asarray(np.asarray(value), dtype=target_dtype)
    new_leaves.append((path, _replace_value(var, arr)))
  if dtype_errors:
    raise WeightsError(f"{source}: dtype mismatch: " + "; ".join(dtype_errors))
  return nnx.from_flat_state(new_leaves)


def _sharding(var, shape, mesh, rules) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, partition_spec(_logical_axes(var), shape, mesh, rules))


def _put_sharded(value: np.ndarray, dtype, sharding: jax.sharding.NamedSharding) -> jax.Array:
  """Places ``value`` on ``sharding``: each device receives only its own shard (cast on host
  shard by shard, so no full-size device copy exists at any time)."""
  shape = tuple(value.shape)

  def shard(index):
    return np.asarray(value[index]).astype(dtype)

  return jax.make_array_from_callback(shape, sharding, shard)


def _var_dtype(var) -> Any:
  if hasattr(var, "dtype"):
    return var.dtype
  inner = var[...] if isinstance(var, nnx.Variable) else var
  return inner.dtype


def _logical_axes(var) -> Optional[tuple]:
  if isinstance(var, nnx.Variable):
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    axes = meta.get("logical_axes")
    return tuple(axes) if axes is not None else None
  return None


def _replace_value(var, arr):
  if isinstance(var, nnx.Variable):
    return var.replace(arr)
  return arr


# Params a pretrained Gemma checkpoint never contains: User-LLM cross-attention and LoRA factors.
_FRESH_RE = re.compile(r"(^xattn\.|\.lora_[ab]$)")


def build_model(cfg: Any, params: Mapping[str, np.ndarray], *,
                mesh: Optional[jax.sharding.Mesh] = None, source: str = "checkpoint",
                rules: Sequence = None, seed: int = 0,
                model_factory: Callable[[Any, nnx.Rngs], nnx.Module] = None) -> nnx.Module:
  """Builds ``Gemma3(cfg)`` and fills every ``nnx.Param`` from ``params``.

  The model is built abstractly (``nnx.eval_shape``: no random init, no memory), so the only
  device memory used is the loaded weights, cast to ``cfg.param_dtype``. Params a pretrained
  checkpoint cannot have (``xattn.*`` blocks, LoRA factors) keep a real seed-``seed``
  initialisation when ``params`` lacks them; every other key must be present with the exact
  shape, and ``params`` may hold nothing else.
  """
  if model_factory is None:
    from userllm_jax.models import gemma as gemma_lib  # pylint: disable=import-outside-toplevel
    model_factory = lambda c, rngs: gemma_lib.Gemma3(c, rngs=rngs)  # noqa: E731
  abstract = nnx.eval_shape(lambda: model_factory(cfg, nnx.Rngs(seed)))
  graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
  keys = [path_str(p) for p, _ in _flat(abs_params)]
  fresh = [k for k in keys if k not in params and _FRESH_RE.search(k)]
  needs_concrete = bool(fresh) or any(
      isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(rest))
  if needs_concrete:
    # Rare path (User-LLM configs): initialise for real, then overwrite the pretrained part.
    concrete = model_factory(cfg, nnx.Rngs(seed))
    _, conc_params, rest = nnx.split(concrete, nnx.Param, ...)
    fresh_set = set(fresh)
    state = conc_params
    allow = fresh_set.__contains__
  else:
    state, allow = abs_params, None
  filled = assign_state(state, params, mesh=mesh, rules=rules, source=source,
                        allow_missing=allow)
  return nnx.merge(graphdef, filled, rest)


def _flat(state):
  return nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
