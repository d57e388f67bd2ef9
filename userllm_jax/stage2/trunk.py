"""The frozen trunk of a cross-attention User-LLM, computed once per token sequence.

With cross-attention only after late layers (``userllm.xattn_layers``, e.g. ``(-1,)``) and a
frozen LLM (strategies 'enc' and 'proj'), the LLM's layers up to the first cross-attention
block see the tokens and nothing of the user: their output is the same every time a sequence
comes back -- every epoch, and every example that shares the prompt and the answer (a genre,
a popular title).  ``train.trunk_cache=True`` computes it once per distinct sequence, as a map
over the training batches (:class:`TrunkCache`), and the training step starts from it
(``trunk_BxLxD``, ``MethodSpec.forward`` -> ``Gemma3(trunk_BxLxD=...)``): it runs only the
blocks from the first cross-attention on, the same function of the parameters as the full
forward (``tests/test_trunk.py``).  TP reads the user's history in its prompt, so every
sequence is new: it has no such trunk.

The FLOPs of the trunk computations are counted (:attr:`TrunkCache.flops`) and the job adds
them to the method's training FLOPs, so an equal-compute comparison charges them.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from absl import logging
from flax import nnx

from userllm_jax.models import gemma as gemma_lib
from userllm_jax.stage2 import methods as methods_lib


class TrunkCache:
  """A batch map adding ``trunk_BxLxD`` (the hidden state after block ``layer`` of the frozen
  ``gemma``) to stage-2 training batches; one computation per distinct sequence.

  Rows are keyed by their valid tokens (``tokens_BxL`` where ``input_mask_BxL``): a row's
  trunk does not depend on the padding after it (causal attention, padding masked), which
  is left zero.  A batch with any new row is computed whole (one compiled shape per batch
  shape).  One process only: every process would compute the global batch.
  """

  def __init__(self, gemma: gemma_lib.Gemma3, layer: int):
    if not 0 <= int(layer) < gemma.cfg.num_layers:
      raise ValueError(f"TrunkCache: layer {layer} outside the LLM's {gemma.cfg.num_layers} "
                       "layers")
    self.layer = int(layer)
    graphdef, state = nnx.split(gemma)
    self._state = state
    self._fn = jax.jit(lambda st, tokens, mask: nnx.merge(graphdef, st)(
        tokens, input_mask_BxL=mask, stop_after_layer=self.layer))
    self._store: dict[bytes, np.ndarray] = {}
    self._flops_by_shape: dict[tuple, float] = {}
    self.flops = 0.0          # FLOPs of the trunk computations run so far
    self.batches_computed = 0

  @property
  def num_sequences(self) -> int:
    return len(self._store)

  def info(self) -> dict:
    return {"layer": self.layer, "sequences": self.num_sequences,
            "batches_computed": self.batches_computed, "flops": self.flops}

  def __call__(self, batch: dict) -> dict:
    for key in ("tokens_BxL", "input_mask_BxL"):
      if key not in batch:
        raise KeyError(f"TrunkCache: batch lacks {key!r}; keys: {sorted(batch)}")
    tokens = np.asarray(batch["tokens_BxL"], np.int32)
    mask = np.asarray(batch["input_mask_BxL"]).astype(bool)
    lengths = mask.sum(axis=1)
    if np.any(mask != (np.arange(mask.shape[1])[None, :] < lengths[:, None])):
      raise ValueError("TrunkCache: input_mask_BxL must be right-padded (valid tokens first)")
    keys = [tokens[b, :n].tobytes() for b, n in enumerate(lengths)]
    if any(k not in self._store for k in keys):
      hidden = np.asarray(jax.device_get(self._fn(self._state, tokens, mask)))
      self.flops += self._flops(tokens.shape)
      self.batches_computed += 1
      for b, (k, n) in enumerate(zip(keys, lengths)):
        # A copy: a view would keep the whole computed batch alive.
        self._store.setdefault(k, hidden[b, :n].copy())
    first = self._store[keys[0]]
    out = np.zeros(tokens.shape + (first.shape[-1],), first.dtype)
    for b, k in enumerate(keys):
      out[b, :lengths[b]] = self._store[k]
    return dict(batch, trunk_BxLxD=out)

  def _flops(self, shape: tuple) -> float:
    got = self._flops_by_shape.get(shape)
    if got is None:
      spec = jax.ShapeDtypeStruct(shape, np.int32)
      got = self._flops_by_shape[shape] = methods_lib.lowered_flops(
          self._fn.lower(self._state, spec, jax.ShapeDtypeStruct(shape, bool)))
    return got


def for_method(config, spec: methods_lib.MethodSpec,
               gemma: gemma_lib.Gemma3) -> Optional[TrunkCache]:
  """The trunk cache of ``spec`` when ``train.trunk_cache`` is on and it has a frozen trunk
  (``spec.trunk_layer``), else None.  ``gemma``: the pretrained LLM the method was built
  around (its frozen layers are the method's)."""
  if not bool(config.train.get("trunk_cache", False)) or spec.trunk_layer is None:
    return None
  if jax.process_count() > 1:
    raise ValueError("config.train.trunk_cache=True runs on one process only (every process "
                     "would compute the global batch's trunk); set it False for multi-process "
                     "runs")
  logging.info("%s: caching the frozen trunk (layers 0..%d) per training sequence", spec.name,
               spec.trunk_layer)
  return TrunkCache(gemma, spec.trunk_layer)
