"""Gemma 3 weights from a Hugging Face checkpoint directory (``google/gemma-3-*``).

Layout (transformers ``Gemma3ForCausalLM`` / ``Gemma3ForConditionalGeneration``):

  model.embed_tokens.weight                           [V, D]
  model.layers.N.self_attn.{q,k,v,o}_proj.weight      torch Linear [out, in]
  model.layers.N.self_attn.{q,k}_norm.weight          [Dh]
  model.layers.N.{input_layernorm, post_attention_layernorm,
                  pre_feedforward_layernorm, post_feedforward_layernorm}.weight  [D]
  model.layers.N.mlp.{gate,up,down}_proj.weight       [out, in]
  model.norm.weight                                   [D]
  lm_head.weight                                      optional; must equal the embedding (tied)

The multimodal (4B+) checkpoints prefix the text model with ``language_model.model.`` (older
exports) or ``model.language_model.`` (transformers >= 4.52); their vision tower and projector
tensors are skipped (and listed in the returned ``skipped``). HF's ``Gemma3RMSNorm`` applies
``1 + w`` like ours, so norm weights are copied as they are.

Files: ``model.safetensors`` or shards listed in ``model.safetensors.index.json``. They are
memory-mapped by a small reader of the safetensors format (8-byte little-endian header length,
JSON header, raw little-endian data), so bf16 stays bf16 (``ml_dtypes``) and nothing is copied
to a device here.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Optional

import ml_dtypes
import numpy as np

from userllm_jax.weights import assign

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_SKIP_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                  "model.multi_modal_projector.", "language_model.vision_tower.")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_LAYER_MAP = {
    "self_attn.q_proj": ("attn.q_proj.kernel", "q"),
    "self_attn.k_proj": ("attn.k_proj.kernel", "kv"),
    "self_attn.v_proj": ("attn.v_proj.kernel", "kv"),
    "self_attn.o_proj": ("attn.o_proj.kernel", "o"),
    "self_attn.q_norm": ("attn.q_norm.scale", "norm"),
    "self_attn.k_norm": ("attn.k_norm.scale", "norm"),
    "input_layernorm": ("pre_attention_norm.scale", "norm"),
    "post_attention_layernorm": ("post_attention_norm.scale", "norm"),
    "pre_feedforward_layernorm": ("pre_ffw_norm.scale", "norm"),
    "post_feedforward_layernorm": ("post_ffw_norm.scale", "norm"),
    "mlp.gate_proj": ("mlp.gate_proj.kernel", "in_out"),
    "mlp.up_proj": ("mlp.up_proj.kernel", "in_out"),
    "mlp.down_proj": ("mlp.down_proj.kernel", "in_out"),
}


class SafetensorsError(ValueError):
  """A malformed or unexpected safetensors checkpoint (names the file and tensor)."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as read-only memory-mapped numpy arrays."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise SafetensorsError(f"{path}: too short for a safetensors file ({size} bytes)")
    n = int.from_bytes(raw, "little")
    if n <= 0 or 8 + n > size:
      raise SafetensorsError(f"{path}: header length {n} does not fit the file ({size} bytes)")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise SafetensorsError(f"{path}: header is not JSON: {e}") from e
  base = 8 + n
  mm = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
  out: dict[str, np.ndarray] = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')}")
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    count = int(np.prod(shape)) if shape else 1
    if end - start != count * np.dtype(dtype).itemsize or base + end > size:
      raise SafetensorsError(f"{path}: tensor {name!r} offsets {start}..{end} do not match "
                             f"shape {shape} {info['dtype']} (file {size} bytes)")
    out[name] = mm[base + start:base + end].view(dtype).reshape(shape)
  return out


def checkpoint_files(directory: str | os.PathLike) -> list[pathlib.Path]:
  """The safetensors files of a HF checkpoint dir (single file or index.json shards)."""
  d = pathlib.Path(directory)
  index = d / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
      raise SafetensorsError(f"{index}: no 'weight_map' object")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (d / f).exists()]
    if missing:
      raise SafetensorsError(f"{index}: shards missing on disk: {missing}")
    return [d / f for f in files]
  single = d / "model.safetensors"
  if single.exists():
    return [single]
  others = sorted(d.glob("*.safetensors"))
  if others:
    return others
  raise FileNotFoundError(f"{d}: no model.safetensors, model.safetensors.index.json or "
                          "*.safetensors")


def spec_from_hf_config(config: dict[str, Any], *, source: str = "config.json"
                        ) -> dict[str, Any]:
  """Our architecture spec from a HF ``config.json`` dict (text or multimodal)."""
  cfg = config.get("text_config", config) if config.get("model_type") == "gemma3" else config
  mt = cfg.get("model_type", "gemma3_text")
  if mt not in ("gemma3_text", "gemma3"):
    raise SafetensorsError(f"{source}: model_type {mt!r}, expected 'gemma3_text' or 'gemma3'")

  def need(key):
    if key not in cfg:
      raise SafetensorsError(f"{source}: field {key!r} missing")
    return cfg[key]

  d, h = int(need("hidden_size")), int(need("num_attention_heads"))
  num_layers = int(need("num_hidden_layers"))
  # Rope: transformers 5 writes rope_parameters per layer type; 4.x rope_theta + rope_scaling.
  rp = cfg.get("rope_parameters") or {}
  full = rp.get("full_attention", {}) if isinstance(rp, dict) else {}
  sliding = rp.get("sliding_attention", {}) if isinstance(rp, dict) else {}
  rope_global = full.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))
  rope_local = sliding.get("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
  scaling = full if full.get("rope_type") else (cfg.get("rope_scaling") or {})
  rope_scale = 1.0
  if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
    if scaling.get("rope_type", scaling.get("type")) != "linear":
      raise SafetensorsError(f"{source}: rope scaling {scaling} is not supported (linear only)")
    rope_scale = float(scaling.get("factor", 1.0))
  # Local/global pattern.
  pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)) or 6)
  layer_types = cfg.get("layer_types")
  if layer_types is not None:
    if "full_attention" in layer_types:
      pattern = list(layer_types).index("full_attention") + 1
    want = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(num_layers)]
    if list(layer_types) != want:
      raise SafetensorsError(f"{source}: layer_types {layer_types} is not 'every "
                             f"{pattern}th layer global', which models/gemma.py implements")
  spec = {
      "vocab_size": int(need("vocab_size")),
      "num_layers": num_layers,
      "embed_dim": d,
      "mlp_dim": int(need("intermediate_size")),
      "num_heads": h,
      "num_kv_heads": int(cfg.get("num_key_value_heads", h)),
      "head_dim": int(cfg.get("head_dim", d // h)),
      "sliding_window": int(cfg.get("sliding_window", 512)),
      "sliding_pattern": pattern,
      "rope_base_global": float(rope_global),
      "rope_base_local": float(rope_local),
      "max_seq_len": int(cfg.get("max_position_embeddings", 32768)),
      "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
      "query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar", cfg.get("head_dim", 256))),
      "attn_logit_softcap": cfg.get("attn_logit_softcapping"),
      "final_logit_softcap": cfg.get("final_logit_softcapping"),
  }
  if rope_scale != 1.0:
    spec["rope_scale_global"] = rope_scale
  act = cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh"))
  if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise SafetensorsError(f"{source}: hidden_activation {act!r}; models/gemma.py uses gelu-tanh")
  return spec


def _strip(name: str) -> Optional[str]:
  for p in _PREFIXES:
    if name.startswith(p):
      return name[len(p):]
  if name == "lm_head.weight" or name.startswith("language_model.lm_head"):
    return "lm_head.weight"
  return None


def convert(tensors: dict[str, np.ndarray], spec: dict[str, Any], *, source: str = "checkpoint",
            dtype=None) -> tuple[dict[str, np.ndarray], list[str]]:
  """HF tensors -> ``({our path: array}, skipped names)``; arrays keep their dtype unless
  ``dtype`` is given."""
  d, h, k, dh = spec["embed_dim"], spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
  params: dict[str, np.ndarray] = {}
  skipped: list[str] = []
  lm_head = None
  for name, arr in tensors.items():
    if name.startswith(_SKIP_PREFIXES) or ".vision_tower." in name:
      skipped.append(name)
      continue
    short = _strip(name)
    if short is None:
      raise SafetensorsError(f"{source}: unexpected tensor {name!r}")
    if short == "lm_head.weight":
      lm_head = (name, arr)
      continue
    if short == "embed_tokens.weight":
      path, kind = "embedder.input_embedding", "embed"
    elif short == "norm.weight":
      path, kind = "final_norm.scale", "norm"
    else:
      m = _LAYER_RE.match(short)
      if m is None or m.group(2) not in _LAYER_MAP:
        raise SafetensorsError(f"{source}: unexpected tensor {name!r}")
      sub, kind = _LAYER_MAP[m.group(2)]
      path = f"layers.{int(m.group(1))}.{sub}"
    if path in params:
      raise SafetensorsError(f"{source}: two tensors map to {path} (second: {name!r})")

    def need(shape, arr=arr, name=name):
      if tuple(arr.shape) != tuple(shape):
        raise SafetensorsError(f"{source}: {name!r} has shape {tuple(arr.shape)}, expected "
                               f"{tuple(shape)} from config.json")

    if kind == "q":
      need((h * dh, d))
      out = arr.T.reshape(d, h, dh)
    elif kind == "kv":
      need((k * dh, d))
      out = arr.T.reshape(d, k, dh)
    elif kind == "o":
      need((d, h * dh))
      out = arr.T.reshape(h, dh, d)
    elif kind == "in_out":
      out = arr.T
    else:
      out = arr
    out = np.ascontiguousarray(out) if kind not in ("embed", "norm") else out
    params[path] = out.astype(dtype) if dtype is not None else out
  if lm_head is not None and "embedder.input_embedding" in params:
    name, arr = lm_head
    emb = params["embedder.input_embedding"]
    if arr.shape != emb.shape or not np.array_equal(
        np.asarray(arr[:64], np.float32), np.asarray(emb[:64], np.float32)):
      raise SafetensorsError(f"{source}: {name!r} differs from the embedding; models/gemma.py "
                             "ties the output projection")
  return params, skipped


def load_safetensors(directory: str | os.PathLike, *, dtype=None
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
  """A HF Gemma 3 checkpoint dir -> ``(params, spec, skipped tensor names)``."""
  d = pathlib.Path(directory)
  cfg_path = d / "config.json"
  if not cfg_path.exists():
    raise FileNotFoundError(f"{cfg_path} not found (needed for the architecture)")
  spec = spec_from_hf_config(json.loads(cfg_path.read_text()), source=str(cfg_path))
  tensors: dict[str, np.ndarray] = {}
  for f in checkpoint_files(d):
    for name, arr in read_safetensors(f).items():
      if name in tensors:
        raise SafetensorsError(f"{f}: tensor {name!r} also in another shard")
      tensors[name] = arr
  params, skipped = convert(tensors, spec, source=str(d), dtype=dtype)
  assign.check_params(params, spec, source=str(d))
  return params, spec, skipped
