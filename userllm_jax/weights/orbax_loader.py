"""Gemma 3 weights from an official Flax/Orbax checkpoint (the ``gemma`` library's tree).

Layout (google-deepmind/gemma ``gemma/gm/nn/_modules.py``, ``_transformer.py``), under a top-level
``transformer`` key (also accepted without it):

  embedder/input_embedding                 [V, D]
  layer_N/pre_attention_norm/scale         [D]    (RMSNorm applies 1 + scale, like ours)
  layer_N/attn/q_einsum/w                  [H, D, Dh]     einsum 'BTD,NDH->BTNH'
  layer_N/attn/kv_einsum/w                 [2, K, D, Dh]  (k = [0], v = [1])
  layer_N/attn/qkv_einsum/w                [3, H, D, Dh]  (instead of q/kv when K == H)
  layer_N/attn/attn_vec_einsum/w           [H, Dh, D]     einsum 'BTNH,NHD->BTD'
  layer_N/attn/_query_norm/scale, _key_norm/scale  [Dh]
  layer_N/post_attention_norm/scale, pre_ffw_norm/scale, post_ffw_norm/scale
  layer_N/mlp/gating_einsum                [2, F, D] (transpose_gating_einsum=True, Gemma 2/3)
                                           or [2, D, F] (older); gate = [0], up = [1]
  layer_N/mlp/linear                       [F, D]
  final_norm/scale                         [D]

The vision encoder (``SigLiPFromPatches_0``) and the embedder's ``mm_*`` params are skipped.
The checkpoint stores no config: shapes give V, D, F, H, K, Dh and the layer count; the rest
(sliding window, RoPE bases and scale, query scale) come from the Gemma 3 preset with the same
shapes, or from the ``config`` argument.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

import numpy as np

from userllm_jax import paths
from userllm_jax.weights import assign

_LAYER_RE = re.compile(r"^layer_(\d+)/(.+)$")
_NORMS = {
    "pre_attention_norm/scale": "pre_attention_norm.scale",
    "post_attention_norm/scale": "post_attention_norm.scale",
    "pre_ffw_norm/scale": "pre_ffw_norm.scale",
    "post_ffw_norm/scale": "post_ffw_norm.scale",
    "attn/_query_norm/scale": "attn.q_norm.scale",
    "attn/_key_norm/scale": "attn.k_norm.scale",
}


class OrbaxError(ValueError):
  """An Orbax checkpoint that is not a Gemma 3 parameter tree (names the key at fault)."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}/"))
  else:
    out[prefix[:-1]] = tree
  return out


def restore_tree(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Restores an Orbax PyTree checkpoint as a flat ``{'a/b/c': np.ndarray}`` (host memory)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  path = paths.path(path)          # local or gs:// (Orbax reads both through epath)
  if not path.is_dir():
    raise FileNotFoundError(f"Orbax checkpoint directory not found: {path}")
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  meta_tree = getattr(meta, "item_metadata", None)
  meta_tree = getattr(meta_tree, "tree", meta_tree) if meta_tree is not None else meta
  meta_tree = getattr(meta_tree, "tree", meta_tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta_tree)
  tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return {k: np.asarray(v) for k, v in _flatten(dict(tree)).items()}


def infer_shapes(flat: dict[str, np.ndarray], *, source: str) -> dict[str, Any]:
  """V, D, F, H, K, Dh and the layer count from the tensors."""
  if "embedder/input_embedding" not in flat:
    raise OrbaxError(f"{source}: no embedder/input_embedding (keys: {sorted(flat)[:8]} ...)")
  v, d = flat["embedder/input_embedding"].shape
  layers = sorted({int(m.group(1)) for k in flat if (m := _LAYER_RE.match(k))})
  if not layers or layers != list(range(len(layers))):
    raise OrbaxError(f"{source}: layer indices {layers[:10]} are not 0..N-1")
  if "layer_0/attn/q_einsum/w" in flat:
    h, _, dh = flat["layer_0/attn/q_einsum/w"].shape
    k = flat["layer_0/attn/kv_einsum/w"].shape[1]
  elif "layer_0/attn/qkv_einsum/w" in flat:
    _, h, _, dh = flat["layer_0/attn/qkv_einsum/w"].shape
    k = h
  else:
    raise OrbaxError(f"{source}: layer_0/attn has neither q_einsum/w nor qkv_einsum/w")
  f = flat["layer_0/mlp/linear"].shape[0]
  return {"vocab_size": int(v), "num_layers": len(layers), "embed_dim": int(d),
          "mlp_dim": int(f), "num_heads": int(h), "num_kv_heads": int(k), "head_dim": int(dh)}


def convert(flat: dict[str, np.ndarray], shapes: dict[str, Any], *, source: str,
            transpose_gating: Optional[bool] = None, dtype=None
            ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Gemma-library flat tree -> ``({our path: array}, skipped keys)``."""
  d, f = shapes["embed_dim"], shapes["mlp_dim"]
  h, k, dh = shapes["num_heads"], shapes["num_kv_heads"], shapes["head_dim"]
  params: dict[str, np.ndarray] = {}
  skipped: list[str] = []

  def put(path, arr, want, name):
    if tuple(arr.shape) != tuple(want):
      raise OrbaxError(f"{source}: {name} has shape {tuple(arr.shape)}, expected {tuple(want)}")
    params[path] = arr.astype(dtype) if dtype is not None else arr

  for name, arr in flat.items():
    if name == "embedder/input_embedding":
      put("embedder.input_embedding", arr, arr.shape, name)
      continue
    if name == "final_norm/scale":
      put("final_norm.scale", arr, (d,), name)
      continue
    if name.startswith(("embedder/mm_", "SigLiP", "vision_encoder")):
      skipped.append(name)
      continue
    m = _LAYER_RE.match(name)
    if m is None:
      raise OrbaxError(f"{source}: unexpected parameter {name!r}")
    i, sub = int(m.group(1)), m.group(2)
    p = f"layers.{i}."
    if sub in _NORMS:
      dim = dh if sub.startswith("attn/") else d
      put(p + _NORMS[sub], arr, (dim,), name)
    elif sub == "attn/q_einsum/w":
      put(p + "attn.q_proj.kernel", np.transpose(arr, (1, 0, 2)), (d, h, dh), name)
    elif sub == "attn/kv_einsum/w":
      if arr.shape != (2, k, d, dh):
        raise OrbaxError(f"{source}: {name} has shape {arr.shape}, expected {(2, k, d, dh)}")
      put(p + "attn.k_proj.kernel", np.transpose(arr[0], (1, 0, 2)), (d, k, dh), name)
      put(p + "attn.v_proj.kernel", np.transpose(arr[1], (1, 0, 2)), (d, k, dh), name)
    elif sub == "attn/qkv_einsum/w":
      if arr.shape != (3, h, d, dh):
        raise OrbaxError(f"{source}: {name} has shape {arr.shape}, expected {(3, h, d, dh)}")
      for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        put(p + f"attn.{proj}.kernel", np.transpose(arr[j], (1, 0, 2)), (d, h, dh), name)
    elif sub == "attn/attn_vec_einsum/w":
      put(p + "attn.o_proj.kernel", arr, (h, dh, d), name)
    elif sub == "mlp/gating_einsum" or sub == "mlp/gating_einsum/w":
      tg = transpose_gating
      if tg is None:
        if d == f:
          raise OrbaxError(f"{source}: {name} is [2, {d}, {d}] (embed_dim == mlp_dim): pass "
                           "transpose_gating= to say whether it is [2, F, D] or [2, D, F]")
        tg = arr.shape == (2, f, d)
      want = (2, f, d) if tg else (2, d, f)
      if arr.shape != want:
        raise OrbaxError(f"{source}: {name} has shape {arr.shape}, expected {want}")
      gate, up = (arr[0].T, arr[1].T) if tg else (arr[0], arr[1])
      put(p + "mlp.gate_proj.kernel", np.ascontiguousarray(gate), (d, f), name)
      put(p + "mlp.up_proj.kernel", np.ascontiguousarray(up), (d, f), name)
    elif sub == "mlp/linear" or sub == "mlp/linear/w":
      put(p + "mlp.down_proj.kernel", arr, (f, d), name)
    else:
      raise OrbaxError(f"{source}: unexpected parameter {name!r}")
  return params, skipped


def spec_for(shapes: dict[str, Any], config: Any = None, *, source: str) -> dict[str, Any]:
  """The full spec: shapes from the checkpoint, the rest from ``config`` or a matching preset."""
  from userllm_jax.models import gemma as gemma_lib  # pylint: disable=import-outside-toplevel
  if config is None:
    for name, make in getattr(gemma_lib, "PRESETS", {}).items():
      if name == "tiny":
        continue
      cand = make()
      if all(getattr(cand, key) == value for key, value in shapes.items()):
        config = cand
        break
  if config is None:
    raise OrbaxError(f"{source}: shapes {shapes} match no Gemma 3 preset; pass config= "
                     "(a GemmaConfig) for the sliding window / RoPE / query scale")
  spec = dict(shapes)
  mismatch = {key: (getattr(config, key), value) for key, value in shapes.items()
              if getattr(config, key) != value}
  if mismatch:
    raise OrbaxError(f"{source}: config disagrees with the checkpoint shapes "
                     f"(config, checkpoint): {mismatch}")
  spec.update({
      "sliding_window": config.sliding_window, "sliding_pattern": config.global_every,
      "rope_base_global": config.global_rope_base, "rope_base_local": config.local_rope_base,
      "norm_eps": config.rms_eps, "query_pre_attn_scalar": float(config.query_pre_attn_scalar),
  })
  if config.global_rope_scale != 1.0:
    spec["rope_scale_global"] = config.global_rope_scale
  return spec


def load_orbax(path: str | os.PathLike, *, config: Any = None,
               transpose_gating: Optional[bool] = None, dtype=None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
  """An Orbax Gemma 3 checkpoint dir -> ``(params, spec, skipped keys)``."""
  source = os.fspath(path)
  flat = restore_tree(path)
  if any(k.startswith("transformer/") for k in flat):
    flat = {k[len("transformer/"):]: v for k, v in flat.items() if k.startswith("transformer/")}
  shapes = infer_shapes(flat, source=source)
  spec = spec_for(shapes, config, source=source)
  params, skipped = convert(flat, shapes, source=source, transpose_gating=transpose_gating,
                            dtype=dtype)
  assign.check_params(params, spec, source=source)
  return params, spec, skipped


def save_gemma_tree(path: str | os.PathLike, params: dict[str, np.ndarray], *,
                    transpose_gating: bool = True) -> None:
  """Writes our flat params as a gemma-library Orbax checkpoint (for tests and export)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  tree: dict[str, Any] = {"embedder": {"input_embedding": params["embedder.input_embedding"]},
                          "final_norm": {"scale": params["final_norm.scale"]}}
  inv_norms = {v: k for k, v in _NORMS.items()}
  n = 1 + max(int(k.split(".")[1]) for k in params if k.startswith("layers."))
  for i in range(n):
    p = f"layers.{i}."
    layer: dict[str, Any] = {}

    def setp(keys, value, layer=layer):
      node = layer
      for key in keys[:-1]:
        node = node.setdefault(key, {})
      node[keys[-1]] = np.asarray(value)

    for ours, theirs in inv_norms.items():
      setp(theirs.split("/"), params[p + ours])
    q = np.transpose(params[p + "attn.q_proj.kernel"], (1, 0, 2))
    kk = np.transpose(params[p + "attn.k_proj.kernel"], (1, 0, 2))
    vv = np.transpose(params[p + "attn.v_proj.kernel"], (1, 0, 2))
    if q.shape == kk.shape:
      setp(["attn", "qkv_einsum", "w"], np.stack([q, kk, vv]))
    else:
      setp(["attn", "q_einsum", "w"], q)
      setp(["attn", "kv_einsum", "w"], np.stack([kk, vv]))
    setp(["attn", "attn_vec_einsum", "w"], params[p + "attn.o_proj.kernel"])
    gate, up = params[p + "mlp.gate_proj.kernel"], params[p + "mlp.up_proj.kernel"]
    setp(["mlp", "gating_einsum"], np.stack([gate.T, up.T]) if transpose_gating
         else np.stack([gate, up]))
    setp(["mlp", "linear"], params[p + "mlp.down_proj.kernel"])
    tree[f"layer_{i}"] = layer
  ocp.PyTreeCheckpointer().save(paths.path(path), {"transformer": tree})
