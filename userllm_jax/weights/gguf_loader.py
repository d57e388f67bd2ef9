"""Gemma 3 weights from a llama.cpp GGUF file (``gguf.GGUFReader`` + ``gguf.quants.dequantize``).

Layout facts (checked against the transformers reference logits in tests/test_weights.py):

* GGUF lists shapes innermost-first; the reader's arrays are in numpy order, i.e. torch's
  ``[out, in]``: ``attn_q`` is ``[H*Dh, D]``, ``attn_output`` ``[D, H*Dh]``, ``ffn_down`` ``[D, F]``.
  We transpose and reshape into ``[D,H,Dh]`` / ``[H,Dh,D]`` / ``[D,F]`` / ``[F,D]``.
* llama.cpp's converter stores every RMSNorm weight (q/k norms included) as the *applied* scale
  ``1 + w``; our RMSNorm stores ``w``, so we subtract 1 (in float32; a Q-type norm never occurs).
* Q/K are not permuted (Gemma uses split-halves rotary); there is no ``output.weight`` (the
  embedding is tied).
* Not in the file: the local/global layer pattern (every 6th layer global), the local RoPE base
  (1e4), the query scale (``head_dim**-0.5`` via ``query_pre_attn_scalar = head_dim``). These come
  from the Gemma 3 defaults; every value the file *does* state is read from it.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Optional

import numpy as np

from userllm_jax.weights import assign

# Tensor types we dequantise; anything else is refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K")

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")
# GGUF per-layer tensor -> (our sub-path, kind)
_LAYER_MAP = {
    "attn_q": ("attn.q_proj.kernel", "q"),
    "attn_k": ("attn.k_proj.kernel", "kv"),
    "attn_v": ("attn.v_proj.kernel", "kv"),
    "attn_output": ("attn.o_proj.kernel", "o"),
    "attn_q_norm": ("attn.q_norm.scale", "norm"),
    "attn_k_norm": ("attn.k_norm.scale", "norm"),
    "attn_norm": ("pre_attention_norm.scale", "norm"),
    "post_attention_norm": ("post_attention_norm.scale", "norm"),
    "ffn_norm": ("pre_ffw_norm.scale", "norm"),
    "post_ffw_norm": ("post_ffw_norm.scale", "norm"),
    "ffn_gate": ("mlp.gate_proj.kernel", "in_out"),
    "ffn_up": ("mlp.up_proj.kernel", "in_out"),
    "ffn_down": ("mlp.down_proj.kernel", "in_out"),
}
_GLOBAL_MAP = {
    "token_embd.weight": ("embedder.input_embedding", "embed"),
    "output_norm.weight": ("final_norm.scale", "norm"),
}


class GGUFError(ValueError):
  """A GGUF file that is not a Gemma 3 checkpoint we can read (names the field or tensor)."""


def _field(reader, key: str, default: Any = None, *, required: bool = False) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if required:
      raise GGUFError(f"{_src(reader)}: metadata field {key!r} missing")
    return default
  return field.contents()


def open_reader(path: str | os.PathLike):
  """``gguf.GGUFReader(path)`` (slow for big vocabularies: ~30 s for Gemma's 262k tokens)."""
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading GGUF needs the 'gguf' package: pip install gguf") from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  reader = gguf.GGUFReader(os.fspath(path))
  reader.userllm_source = os.fspath(path)
  return reader


def _src(reader) -> str:
  return getattr(reader, "userllm_source", "<gguf>")


def _f32(x) -> float:
  """A float32 metadata value as the shortest decimal that round-trips (1e-06, not 9.99e-07)."""
  return float(str(np.float32(x)))


def spec_from_metadata(reader, vocab_size: int) -> dict[str, Any]:
  """The architecture spec (assign.SPEC_FIELDS) from GGUF metadata."""
  arch = _field(reader, "general.architecture", required=True)
  if arch != "gemma3":
    raise GGUFError(f"{_src(reader)}: general.architecture is {arch!r}, expected 'gemma3'")
  g = lambda k, **kw: _field(reader, f"gemma3.{k}", **kw)  # noqa: E731
  d = int(g("embedding_length", required=True))
  h = int(g("attention.head_count", required=True))
  key_length = g("attention.key_length")
  dh = int(key_length) if key_length is not None else d // h
  value_length = g("attention.value_length")
  if value_length is not None and int(value_length) != dh:
    raise GGUFError(f"{_src(reader)}: gemma3.attention.value_length {value_length} != "
                    f"key_length {dh}")
  kv = g("attention.head_count_kv")
  spec = {
      "vocab_size": int(vocab_size),
      "num_layers": int(g("block_count", required=True)),
      "embed_dim": d,
      "mlp_dim": int(g("feed_forward_length", required=True)),
      "num_heads": h,
      "num_kv_heads": int(kv) if kv is not None else h,
      "head_dim": dh,
      "sliding_window": int(g("attention.sliding_window", default=512)),
      "sliding_pattern": 6,
      "rope_base_global": _f32(g("rope.freq_base", default=1e6)),
      "rope_base_local": 10_000.0,
      "max_seq_len": int(g("context_length", default=32768)),
      "norm_eps": _f32(g("attention.layer_norm_rms_epsilon", default=1e-6)),
      "query_pre_attn_scalar": float(dh),
      "attn_logit_softcap": None,
      "final_logit_softcap": g("final_logit_softcapping"),
  }
  scaling = g("rope.scaling.factor")
  if scaling is not None and float(scaling) != 1.0:
    spec["rope_scaling_factor"] = float(scaling)
  return spec


def dequantize_tensor(tensor) -> np.ndarray:
  """A reader tensor as float32 in numpy order; refuses unsupported types by name."""
  import gguf  # pylint: disable=import-outside-toplevel
  qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
  if qtype.name not in SUPPORTED_TYPES:
    raise GGUFError(f"tensor {tensor.name!r} has type {qtype.name}, supported: "
                    f"{', '.join(SUPPORTED_TYPES)}")
  arr = gguf.quants.dequantize(tensor.data, qtype)
  want = tuple(int(n) for n in reversed(tensor.shape.tolist()))
  arr = np.asarray(arr, dtype=np.float32).reshape(want)
  return arr


def convert_tensor(name: str, arr: np.ndarray, spec: dict[str, Any]) -> tuple[str, np.ndarray]:
  """One GGUF tensor (numpy order, float32) -> (our tree path, array in our layout)."""
  d, h, k, dh = spec["embed_dim"], spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
  if name in _GLOBAL_MAP:
    path, kind = _GLOBAL_MAP[name]
  else:
    m = _LAYER_RE.match(name)
    if m is None or m.group(2) not in _LAYER_MAP:
      raise GGUFError(f"unexpected GGUF tensor {name!r} (not part of a Gemma 3 text model)")
    sub, kind = _LAYER_MAP[m.group(2)]
    path = f"layers.{int(m.group(1))}.{sub}"

  def need(shape):
    if tuple(arr.shape) != tuple(shape):
      raise GGUFError(f"tensor {name!r}: expected numpy shape {tuple(shape)}, got {arr.shape}")

  if kind == "embed":
    return path, arr
  if kind == "norm":
    return path, arr - np.float32(1.0)  # stored as applied scale 1 + w
  if kind == "q":
    need((h * dh, d))
    return path, np.ascontiguousarray(arr.T.reshape(d, h, dh))
  if kind == "kv":
    need((k * dh, d))
    return path, np.ascontiguousarray(arr.T.reshape(d, k, dh))
  if kind == "o":
    need((d, h * dh))
    return path, np.ascontiguousarray(arr.T.reshape(h, dh, d))
  if kind == "in_out":
    return path, np.ascontiguousarray(arr.T)
  raise AssertionError(kind)


def tensor_infos(reader) -> list[tuple[str, str, tuple[int, ...]]]:
  """``(name, type name, numpy shape)`` for every tensor in the file."""
  import gguf  # pylint: disable=import-outside-toplevel
  return [(t.name, gguf.GGMLQuantizationType(t.tensor_type).name,
           tuple(int(n) for n in reversed(t.shape.tolist()))) for t in reader.tensors]


def read_params(reader, spec: Optional[dict[str, Any]] = None,
                out_dtype=np.float32) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """All weights of an open GGUF reader as ``({tree path: array}, spec)``, checked."""
  by_name = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in by_name:
    raise GGUFError(f"{_src(reader)}: no token_embd.weight tensor")
  vocab = int(by_name["token_embd.weight"].shape.tolist()[-1])
  if spec is None:
    spec = spec_from_metadata(reader, vocab)
  params: dict[str, np.ndarray] = {}
  for name, tensor in by_name.items():
    if name == "output.weight":
      raise GGUFError(f"{_src(reader)}: untied output.weight present; Gemma 3 ties the embedding")
    if name.startswith(("rope_freqs", "rope_factors")):
      raise GGUFError(f"{_src(reader)}: tensor {name!r} (rope scaling) is not supported")
    path, arr = convert_tensor(name, dequantize_tensor(tensor), spec)
    params[path] = arr.astype(out_dtype, copy=False)
  assign.check_params(params, spec, source=str(_src(reader)))
  return params, spec


def tokenizer_metadata(reader) -> dict[str, Any]:
  """The ``tokenizer.ggml.*`` fields needed to rebuild the SentencePiece model."""
  tokens = _field(reader, "tokenizer.ggml.tokens", required=True)
  scores = _field(reader, "tokenizer.ggml.scores")
  types = _field(reader, "tokenizer.ggml.token_type")
  return {
      "model": _field(reader, "tokenizer.ggml.model", "llama"),
      "tokens": tokens,
      "scores": scores if scores is not None else [0.0] * len(tokens),
      "token_type": types if types is not None else [1] * len(tokens),
      "bos_id": _field(reader, "tokenizer.ggml.bos_token_id", 2),
      "eos_id": _field(reader, "tokenizer.ggml.eos_token_id", 1),
      "pad_id": _field(reader, "tokenizer.ggml.padding_token_id", 0),
      "unk_id": _field(reader, "tokenizer.ggml.unknown_token_id", 3),
  }


def load_gguf(path: str | os.PathLike, *, verbose: bool = False
              ) -> tuple[dict[str, np.ndarray], dict[str, Any], bytes]:
  """Reads a Gemma 3 GGUF: ``(params, spec, serialized SentencePiece ModelProto)``."""
  from userllm_jax.weights import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  reader = open_reader(path)
  t1 = time.time()
  params, spec = read_params(reader)
  proto = tok_lib.proto_from_gguf_metadata(tokenizer_metadata(reader))
  if verbose:
    print(f"GGUF {path}: opened in {t1 - t0:.1f} s, dequantised in {time.time() - t1:.1f} s")
  return params, spec, proto
