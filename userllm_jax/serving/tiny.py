"""A deterministic tiny random User-LLM, catalogue and tokenizer (tests, demos, no checkpoint).

The same ``seed`` gives the same parameters in every process (on one machine), so a test can run the server in
a subprocess and compare its answers with offline generation on its own copy.

A freshly initialised User-LLM ignores its user: the cross-attention gates start at 0, and
even with them open the random attention branch writes about as much into the residual
stream as the user-independent MLP branch next to it, so every user gets the same ranking
(measured: 2 distinct top-2 rankings of the 38 items over 8 random users).  The weights
are therefore set so that the user tokens decide the answer, deterministically:

* cross-attention gate at 1, MLP gate at 0 (that branch does not read the user);
* the attention branch's output projection x4: it writes ~3x the residual stream's RMS,
  so the user-dependent part dominates the logits (7 distinct top-2 rankings of 8 users);
* the projector output x8, which only matters for the soft prompt (the cross-attention
  RMS-normalises its media): prefix embeddings larger than the O(1) token embeddings.

The token embedding keeps the Gemma init (std 1/sqrt(D), unit-variance tied logits).
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
  # Built by one jitted program at XLA optimisation level 0: eager init of ~90 small arrays
  # takes ~30 s on a busy 2-core CPU, the optimised compile of the init program ~20 s, this
  # ~10 s.  The numbers are deterministic in `seed` (they differ from an eager or optimised
  # build by float rounding: every user of the tiny model must build it here).
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  init = jax.jit(lambda: nnx.split(build())[1]).lower().compile(
      compiler_options={"xla_backend_optimization_level": 0})
  model = nnx.merge(graphdef, init())
  # make the user tokens decide the answer (see the module doc)
  for blk in model.gemma.xattn.values():
    blk.attn_gate[...] = jnp.ones_like(blk.attn_gate[...])
    blk.ffw_gate[...] = jnp.zeros_like(blk.ffw_gate[...])
    blk.o_proj[...] = blk.o_proj[...] * 4.0
  model.projector.w2[...] = model.projector.w2[...] * 8.0
  return model, tok, catalog
