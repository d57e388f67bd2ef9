"""Constrained decoding cost: full-vocabulary vs restricted-vocabulary trie beam search, and
closed-set scoring, at two prompt lengths.

  nice -n 10 python benchmarks/decoding.py [--random_init] [--prompt_lens 11,200]
      [--beams 10] [--titles 1600] [--max_new 16] [--batch 1] [--repeats 2]

* Catalogue: ``--titles`` random token sequences of 3-15 tokens (+ EOS) drawn from a pool of
  ``--token_pool`` random token ids (a stand-in for tokenized movie titles, whose tokens
  repeat: K, the restricted vocabulary, is printed).
* Beam search: ``Sampler.beam_search(trie=..., restrict_vocab=False, finish_forced=False)``
  (all V logits, then the mask, every title decoded to its EOS; the reference) vs
  ``restrict_vocab=True`` (logits only over the trie's K tokens), then also
  ``finish_forced=True`` (the default: a beam finishes once its title is decided); the
  decode-loop steps of each are printed.
* Closed set: ``Sampler.score_candidates`` of ``--genres`` random 1-3-token candidates + EOS
  (union normalisation), vs a trie-constrained full-vocabulary beam search over the same
  candidates with as many beams as candidates (what a decoder would do otherwise).

Each configuration is compiled by a warm-up call, then timed ``--repeats`` times (median).
Reported per example (batch ``--batch``): prefill (time to first token) and total ms.
``--random_init``: random weights of the preset (no weights needed); otherwise Gemma 3 270M
from the cache (``weights.load_gemma``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from userllm_jax.eval import trie as trie_lib
from userllm_jax.models import gemma
from userllm_jax.models import sampler as sampler_lib

EOS, PAD, BOS = 1, 0, 2


def random_titles(n: int, vocab: int, pool: int, rng) -> list[list[int]]:
  pool_ids = rng.choice(np.arange(1000, vocab), size=pool, replace=False)
  seqs, seen = [], set()
  while len(seqs) < n:
    s = tuple(int(t) for t in rng.choice(pool_ids, size=rng.integers(3, 16)))
    if s not in seen:
      seen.add(s)
      seqs.append(list(s) + [EOS])
  return seqs


def timed(fn, repeats: int):
  fn()  # compile
  outs = [fn() for _ in range(repeats)]
  return (statistics.median(o.timing.prefill_s for o in outs),
          statistics.median(o.timing.total_s for o in outs))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--random_init", action="store_true")
  p.add_argument("--prompt_lens", default="11,200")
  p.add_argument("--beams", type=int, default=10)
  p.add_argument("--titles", type=int, default=1600)
  p.add_argument("--token_pool", type=int, default=3000)
  p.add_argument("--genres", type=int, default=18)
  p.add_argument("--max_new", type=int, default=16)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  t0 = time.perf_counter()
  if args.random_init:
    model = gemma.Gemma3(gemma.get_config(args.model), rngs=nnx.Rngs(args.seed))
    source = f"{args.model} random init"
  else:
    from userllm_jax import weights  # pylint: disable=import-outside-toplevel
    model, _ = weights.load_gemma(args.model)
    source = f"{args.model} pretrained"
  V = model.cfg.vocab_size
  rng = np.random.default_rng(args.seed)
  titles = random_titles(args.titles, V, args.token_pool, rng)
  trie = trie_lib.TitleTrie(titles, eos_id=EOS, pad_id=PAD).to_constraint(V)
  genres = random_titles(args.genres, V, 200, rng)
  genres = [g[:int(rng.integers(1, 4))] + [EOS] for g in genres]
  genre_trie = trie_lib.TitleTrie(genres, eos_id=EOS, pad_id=PAD).to_constraint(V)
  s = sampler_lib.Sampler(model, eos_id=EOS, pad_id=PAD)
  dev = jax.devices()[0]
  print(f"device {dev.platform} {dev.device_kind}  jax {jax.__version__}  {source}  "
        f"load {time.perf_counter() - t0:.1f} s  V={V}")
  print(f"catalogue: {args.titles} titles of 3-15 tokens, restricted vocabulary "
        f"K={trie.num_tokens}; closed set: {len(genres)} candidates, union "
        f"{len({t for g in genres for t in g})} tokens; beams {args.beams}, max_new "
        f"{args.max_new}, batch {args.batch}, median of {args.repeats}")
  print(f"{'prompt':>6} {'method':<34} {'prefill ms/ex':>13} {'total ms/ex':>11} "
        f"{'speed-up':>8}")
  for L in (int(x) for x in args.prompt_lens.split(",")):
    prompts = [[BOS] + [int(t) for t in rng.integers(1000, V, L - 1)]
               for _ in range(args.batch)]
    rows = []   # (name, (prefill s, total s), index of its reference row or None)

    def beam(restrict, forced):
      def run():
        out = s.beam_search(prompts, num_beams=args.beams, max_new_tokens=args.max_new,
                            trie=trie, restrict_vocab=restrict, finish_forced=forced)
        steps[(restrict, forced)] = out.steps
        return out
      return run
    steps = {}
    rows.append(("catalogue beam, full vocab (ref)", timed(beam(False, False), args.repeats),
                 None))
    rows.append(("catalogue beam, restricted vocab", timed(beam(True, False), args.repeats), 0))
    rows.append(("  + decided beams finish at once", timed(beam(True, True), args.repeats), 0))
    gbeam = lambda: s.beam_search(prompts, num_beams=len(genres), max_new_tokens=4,
                                  trie=genre_trie, restrict_vocab=False, finish_forced=False)
    rows.append(("closed set: beam, full vocab (ref)", timed(gbeam, args.repeats), None))
    rows.append(("closed set: score_candidates", timed(
        lambda: s.score_candidates(prompts, genres), args.repeats), 3))
    for name, (pre, tot), ref in rows:
      speed = f"{rows[ref][1][1] / tot:>7.1f}x" if ref is not None else ""
      print(f"{L:>6} {name:<34} {1e3 * pre / args.batch:>13.1f} "
            f"{1e3 * tot / args.batch:>11.1f} {speed:>8}", flush=True)
    print(f"{L:>6} decode-loop steps: plain {steps[(True, False)]}, decided beams finish at "
          f"once {steps[(True, True)]}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
