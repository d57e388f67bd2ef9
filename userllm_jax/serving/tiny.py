"""A deterministic tiny random User-LLM, catalogue and tokenizer (tests, demos, no checkpoint).

The same ``seed`` gives the same parameters in every process (on one machine), so a test can run the server in
a subprocess and compare its answers with offline generation on its own copy.  The
cross-attention gates are set to 1 (a fresh model has them at 0, which would make the user
tokens invisible).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from userllm_jax.data import tasks as tasks_lib
from userllm_jax.models import encoder as enc
from userllm_jax.models import gemma as gemma_lib
from userllm_jax.models import userllm as ul

_ADJ = ("Silent", "Crimson", "Hidden", "Golden", "Broken", "Distant", "Electric", "Frozen")
_NOUN = ("Harbor", "Garden", "Empire", "River", "Promise", "Signal", "Mirror")
GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Thriller")
FREE_TEXT = "Describe the user in one sentence.\nTell me a story about the user ."


def tiny_catalog(num_items: int = 40, seed: int = 0) -> tasks_lib.Catalog:
  rng = np.random.default_rng(seed)
  titles = ["", ""]
  genres = np.zeros((num_items, 2), np.int32)
  for i in range(2, num_items):
    titles.append(f"{_ADJ[i % len(_ADJ)]} {_NOUN[(i // len(_ADJ)) % len(_NOUN)]} {i}")
    g = rng.choice(len(GENRES), size=rng.integers(1, 3), replace=False) + 2
    genres[i, :len(g)] = g
  return tasks_lib.Catalog(item_titles=titles, item_genres=genres,
                           genre_names=["<pad>", "<oov>", *GENRES],
                           rating_names=["<pad>", "<oov>", "1", "2", "3", "4", "5"],
                           domain="synthetic")


def tiny_tokenizer(catalog: tasks_lib.Catalog,
                   extra: Sequence[str] = ()) -> tasks_lib.WordTokenizer:
  corpus = [t for t in catalog.item_titles if t] + [str(g) for g in catalog.genre_names]
  corpus += [str(r) for r in catalog.rating_names]
  corpus += [tasks_lib.TP_HEADER, ", rated 0123456789 (, ) \n item", FREE_TEXT]
  corpus += [tasks_lib.prompt_for(t, catalog) for t in ("next_item", "fav_genre")]
  return tasks_lib.WordTokenizer(corpus + list(extra))


def tiny_parts(seed: int = 0, *, mode: str = "xattn", max_len: int = 8,
               features=("item", "genre", "rating", "timegap"), position: str = "learned",
               fusion: str = "early", use_perceiver: bool = True, num_items: int = 40):
  """``(UserLLM, tokenizer, catalog)``: a tiny random model, deterministic in ``seed``."""
  catalog = tiny_catalog(num_items, seed)
  tok = tiny_tokenizer(catalog)
  ecfg = enc.EncoderConfig(num_items=num_items, num_genres=len(catalog.genre_names),
                           num_ratings=len(catalog.rating_names), num_timegap_buckets=37,
                           features=tuple(features), embed_dim=16, num_layers=2, num_heads=2,
                           dropout=0.0, max_len=max_len, position=position, fusion=fusion)
  ucfg = ul.UserLLMConfig(mode=mode, use_perceiver=use_perceiver, num_latents=4,
                          perceiver_layers=1, perceiver_heads=2, perceiver_head_dim=8,
                          xattn_every=2, xattn_num_heads=2, xattn_head_dim=8, xattn_mlp_dim=32)
  gcfg = gemma_lib.tiny(vocab_size=tok.vocab_size, num_layers=2)
  build = lambda: ul.init_userllm(ucfg, ecfg, gcfg, rngs=nnx.Rngs(seed))
  # Built under jit (eager init of many small arrays is slow on a busy CPU).
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  model = nnx.merge(graphdef, jax.jit(lambda: nnx.split(build())[1])())
  emb = model.gemma.embedder.input_embedding
  emb[...] = emb[...] / jnp.sqrt(jnp.float32(gcfg.embed_dim))  # as stage2/llm.load_llm
  for blk in model.gemma.xattn.values():
    blk.attn_gate[...] = jnp.ones_like(blk.attn_gate[...])
    blk.ffw_gate[...] = jnp.ones_like(blk.ffw_gate[...])
  # make the user tokens matter at tiny scale (random init: they barely would)
  model.projector.w2[...] = model.projector.w2[...] * 8.0
  return model, tok, catalog
