"""The LLM of a User-LLM job: the pretrained Gemma, or a random tiny one with a word tokenizer."""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from userllm_jax.data import tasks as tasks_lib
from userllm_jax.train import mesh as mesh_lib


def _text_corpus(catalog: tasks_lib.Catalog, extra_texts: Sequence[str] = ()) -> list[str]:
  corpus = [t for t in catalog.item_titles if t]
  corpus += [str(g) for g in catalog.genre_names]
  corpus += [catalog.rating_text(i) or "" for i in range(len(catalog.rating_names))]
  corpus += [tasks_lib.TP_HEADER, ", rated 0123456789 (, ) \n item"]
  corpus += [tasks_lib.prompt_for(t, catalog, title="x") for t in ("next_item", "fav_genre")]
  return corpus + list(extra_texts)


def load_llm(config, catalog: tasks_lib.Catalog, extra_texts: Sequence[str] = (), *,
             mesh=None):
  """(gemma, tokenizer) for ``config.llm``.

  ``llm.name='tiny'``: a random tiny Gemma (``llm.tiny`` overrides the preset) with a word
  tokenizer built from the catalogue and ``extra_texts`` (e.g. review texts).  Otherwise
  ``weights.load_gemma(llm.name)``.  Either is placed straight onto ``mesh`` when given (each
  parameter created or loaded into its shards by ``train/mesh.py``'s rules; no whole copy on
  one device).
  """
  name = config.llm.name
  if name == "tiny":
    from userllm_jax.models import gemma as gemma_lib  # pylint: disable=g-import-not-at-top
    tok = tasks_lib.WordTokenizer(_text_corpus(catalog, extra_texts))
    overrides = config.llm.get("tiny", ml_collections.ConfigDict()).to_dict()
    gcfg = gemma_lib.tiny(vocab_size=tok.vocab_size, **overrides)
    abstract = nnx.eval_shape(lambda: gemma_lib.Gemma3(gcfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = None if mesh is None else mesh_lib.state_shardings(abs_state, mesh)
    pure = jax.jit(lambda: nnx.to_pure_dict(nnx.split(
        gemma_lib.Gemma3(gcfg, rngs=nnx.Rngs(int(config.seed) + 7)))[1]),
                   out_shardings=shardings)()
    nnx.replace_by_pure_dict(abs_state, pure)
    model = nnx.merge(graphdef, abs_state)
    # Gemma's unit-variance embedding is tied to the output: a *random* model then has logits
    # of std ~sqrt(D) (initial loss ~30 nats).  Scale it to std 1/sqrt(D): unit-variance
    # logits, as a trained model has.
    emb = model.embedder.input_embedding
    emb[...] = emb[...] / jnp.sqrt(jnp.float32(gcfg.embed_dim))
    return _with_remat(config, model), tok
  from userllm_jax import weights  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  gemma, tok = weights.load_gemma(name, dtype=jnp.dtype(config.llm.get("dtype", "float32")),
                                  mesh=mesh)
  logging.info("loaded %s in %.1fs", name, time.time() - t0)
  return _with_remat(config, gemma), tok


def _with_remat(config, gemma):
  """``train.remat``: Gemma's blocks are rematerialised in stage 2's backward pass."""
  if bool(config.train.get("remat", False)):
    gemma.cfg = gemma.cfg.replace(remat=True)
  return gemma
