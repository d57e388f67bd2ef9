"""The one place that builds a served model from a User-LLM config and a main-job workdir.

Everything that depends on how stage 2 is built and saved lives here, so a change of the
stage-2 layout changes this module only; the engine takes in-memory objects.

What :func:`load_parts` assumes about the workdir (``jobs/userllm_job.py``, the stage-2
package and ``train/loop.py``):

* the data: ``jobs/encoder_job.prepare(config.encoder.data)`` re-opens the prepared
  dataset (the cache directory the job used; idempotent) -> the catalogue and the vocabularies;
* stage 1: ``WORKDIR/stage1/checkpoints/<step>/state`` holds the pretrained encoder
  (``models/userllm.load_encoder_from_checkpoint`` finds its sub-tree);
* the LLM: ``stage2/llm.load_llm(config, catalog)`` (the pretrained Gemma, or the tiny
  random one for ``llm.name='tiny'``, with the same tokenizer the job trained with -- the
  tiny word tokenizer's corpus must match, so review texts are not added here);
* stage 2: ``WORKDIR/<method>/checkpoints/<latest step>/state`` is an Orbax StandardSave of
  ``{'step', 'params', 'rest', 'opt_state'}`` where ``params`` is the pure dict of the
  method's *trainable* parameters (``stage2/methods.build_method``'s filter: encoder,
  perceiver, projector and the cross-attention blocks under strategy 'enc') with the paths
  of the model its ``build_model`` returns; frozen parameters (the LLM) are not
  saved and come from ``load_llm``.  ``params`` is restored without a target (one process,
  any device) and written into that model;
* the text-prompt path serves ``WORKDIR/tp_lora`` (the LoRA Gemma) when its checkpoint
  exists, else the engine's own LLM without user tokens.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
from absl import logging
from flax import nnx


def _latest_state_dir(directory: str) -> Optional[str]:
  if not os.path.isdir(directory):
    return None
  steps = sorted(int(d) for d in os.listdir(directory)
                 if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state")))
  return os.path.join(directory, str(steps[-1]), "state") if steps else None


def _restore_params(state_dir: str) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restored = ocp.StandardCheckpointer().restore(state_dir)
  if not isinstance(restored, dict) or "params" not in restored:
    raise ValueError(f"{state_dir}: expected a saved train state with a 'params' entry "
                     f"(train/loop.py layout), got keys {sorted(restored)[:10]}")
  return restored["params"]


def _write_pure(module: nnx.Module, flt, restored: dict, where: str) -> None:
  """Writes the restored pure dict into ``nnx.state(module, flt)`` (str/int keys tolerated;
  shapes checked; every parameter of the filter must be present)."""
  target = nnx.state(module, flt)
  template = nnx.to_pure_dict(target)
  missing = []

  def fill(tpl, src, path):
    if isinstance(tpl, dict):
      out = {}
      for k, v in tpl.items():
        node = None
        if isinstance(src, dict):
          for cand in (k, str(k), int(k) if str(k).isdigit() else None):
            if cand is not None and cand in src:
              node = src[cand]
              break
        out[k] = fill(v, node, path + (str(k),)) if node is not None else v
        if node is None:
          missing.append("/".join(path + (str(k),)))
      return out
    arr = np.asarray(src)
    if arr.shape != tuple(np.shape(tpl)):
      raise ValueError(f"{where}: parameter {'/'.join(path)} has shape {arr.shape} in the "
                       f"checkpoint, {tuple(np.shape(tpl))} in the model")
    return jax.numpy.asarray(arr, dtype=tpl.dtype)

  filled = fill(template, restored, ())
  if missing:
    raise ValueError(f"{where}: {len(missing)} trainable parameters missing from the "
                     f"checkpoint, e.g. {missing[:3]}")
  nnx.replace_by_pure_dict(target, filled)
  nnx.update(module, target)


def served_method(config, method: Optional[str] = None) -> str:
  """``method``, or (None) the first User-LLM method of ``config.methods``: what the job trained."""
  if method is None:
    method = next((str(m) for m in config.methods if str(m).startswith("userllm_")), None)
    if method is None:
      raise ValueError(f"config.methods {tuple(config.methods)} has no User-LLM method to serve; "
                       "pass one (e.g. --method=userllm_xattn)")
  if not method.startswith("userllm_"):
    raise ValueError(f"load_parts: method must be a User-LLM method (userllm_xattn, "
                     f"userllm_soft_prompt_enc, ...), got {method!r}")
  return method


def load_parts(config, workdir: str, method: Optional[str] = None):
  """``(UserLLM, tokenizer, catalog, tp_llm or None)`` of a trained main-job ``workdir``;
  ``method`` None: the first User-LLM method of ``config.methods``."""
  from userllm_jax.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from userllm_jax.jobs import encoder_job  # pylint: disable=g-import-not-at-top
  from userllm_jax.models import userllm as ul  # pylint: disable=g-import-not-at-top
  from userllm_jax.stage2 import llm as llm_lib  # pylint: disable=g-import-not-at-top
  from userllm_jax.stage2 import methods as methods_lib  # pylint: disable=g-import-not-at-top

  method = served_method(config, method)
  workdir = os.path.abspath(workdir)
  prepared = encoder_job.prepare(config.encoder.data)
  catalog = tasks_lib.Catalog.from_dataset(prepared, domain=config.encoder.data.domain)
  ecfg = encoder_job.encoder_config(config.encoder, prepared)
  s1_dir = os.path.join(workdir, "stage1", "checkpoints")
  encoder = ul.load_encoder_from_checkpoint(s1_dir, ecfg)
  gemma, tok = llm_lib.load_llm(config, catalog)
  spec = methods_lib.build_method(config, method, encoder=encoder, gemma=gemma, tokenizer=tok,
                                  catalog=catalog)
  model, trainable = spec.build_model(nnx.Rngs(int(config.seed))), spec.trainable
  state_dir = _latest_state_dir(os.path.join(workdir, method, "checkpoints"))
  if state_dir is None:
    raise FileNotFoundError(f"load_parts: no stage-2 checkpoint under "
                            f"{os.path.join(workdir, method, 'checkpoints')} (train the method "
                            "with python -m userllm_jax.main first)")
  _write_pure(model, trainable, _restore_params(state_dir), state_dir)
  logging.info("serving %s from %s", method, state_dir)
  tp_llm = None
  tp_dir = _latest_state_dir(os.path.join(workdir, "tp_lora", "checkpoints"))
  if tp_dir is not None:
    tp_spec = methods_lib.build_method(config, "tp_lora", encoder=encoder, gemma=gemma,
                                       tokenizer=tok, catalog=catalog)
    tp_llm = tp_spec.build_model(nnx.Rngs(int(config.seed)))
    _write_pure(tp_llm, tp_spec.trainable, _restore_params(tp_dir), tp_dir)
    logging.info("text-prompt path: tp_lora from %s", tp_dir)
  return model, tok, catalog, tp_llm


def load_engine(config, workdir: str, method: Optional[str] = None, *, store=None,
                engine_config=None):
  """An :class:`~userllm_jax.serving.engine.Engine` of a trained workdir (see the module doc);
  the store defaults to ``WORKDIR/serving/users.sqlite``."""
  from userllm_jax.serving import engine as engine_lib  # pylint: disable=g-import-not-at-top
  from userllm_jax.serving import store as store_lib  # pylint: disable=g-import-not-at-top
  model, tok, catalog, tp_llm = load_parts(config, workdir, method)
  if store is None:
    store = store_lib.SQLiteStore(os.path.join(workdir, "serving", "users.sqlite"))
  return engine_lib.Engine(model, tok, catalog, store,
                           engine_config or engine_lib.EngineConfig(), tp_llm=tp_llm)
