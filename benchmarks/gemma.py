"""Gemma 3 270M: perplexity on a fixed paragraph, prefill and decode throughput.

  /work/venv/bin/python benchmarks/gemma.py [--model gemma3-270m] [--dtype float32]
      [--prompt_len 128] [--new_tokens 32] [--batch_sizes 1,8] [--repeats 2]

Perplexity: exp(mean next-token NLL) over the paragraph below (with BOS; the BOS position is not
scored). Throughput uses models/sampler.py (one jit: prefill into a KV cache + a while_loop of
decode steps), timed after a compile run:

  prefill tokens/s = B * prompt_len / t(max_new_tokens=1)
  decode  tokens/s = B * (N - 1) / (t(max_new_tokens=N) - t(max_new_tokens=1))

No stop token is used (eos_id=-1), so every row decodes exactly N tokens. Prompts are the
paragraph's tokens, cut or repeated to ``prompt_len``.

``--random_init`` builds the preset with random weights and no tokenizer (the paragraph becomes
fixed pseudo-token ids; perplexity is skipped): throughput on a machine without the weights.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

PARAGRAPH = (
    "The history of the bicycle is a story of small improvements that added up to a machine "
    "almost everyone can ride. Early designs in the nineteenth century had no pedals at all: "
    "riders pushed themselves along with their feet. Pedals attached directly to the front "
    "wheel came next, and because one turn of the pedals meant one turn of the wheel, makers "
    "enlarged the front wheel to go faster, which produced the tall and dangerous penny-farthing. "
    "The safety bicycle of the 1880s solved the problem with a chain drive to the rear wheel and "
    "two wheels of equal size, and the pneumatic tyre soon made the ride far more comfortable. "
    "Within a few years cycling clubs had spread across Europe and North America, roads were "
    "improved to suit the new riders, and the bicycle became an affordable means of transport "
    "for millions of workers who could not afford a horse."
)


def perplexity(model, tok) -> tuple[float, int]:
  ids = tok.encode(PARAGRAPH, add_bos=True)
  tokens = jnp.asarray([ids], jnp.int32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def nll(state, tokens):
    m = nnx.merge(graphdef, state)
    logits = m(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

  loss = float(nll(state, tokens))
  return math.exp(loss), len(ids) - 1


def throughput(model, tok, batch: int, prompt_len: int, new_tokens: int, repeats: int):
  from userllm_jax.models import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  base = tok.encode(PARAGRAPH, add_bos=False)
  body = (base * (prompt_len // len(base) + 1))[:prompt_len - 1]
  prompts = [[tok.bos_id] + body for _ in range(batch)]
  s = sampler_lib.Sampler(model, eos_id=-1, pad_id=tok.pad_id)

  def timed(n):
    out = s.generate(prompts, max_new_tokens=n)  # compile
    assert int(out.lengths_B.min()) == n
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      out = s.generate(prompts, max_new_tokens=n)
      jax.block_until_ready(out.tokens_BxN)
      best = min(best, time.perf_counter() - t0)
    return best

  t1 = timed(1)
  tn = timed(new_tokens)
  prefill = batch * prompt_len / t1
  decode = batch * (new_tokens - 1) / max(tn - t1, 1e-9)
  return prefill, decode, t1, tn


class _IdsTokenizer:
  """Stand-in tokenizer for --random_init: one deterministic id per word, BOS 2, PAD 0."""
  bos_id, pad_id = 2, 0

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = [1000 + (sum(map(ord, w)) * 7919) % (self.vocab_size - 1000) for w in text.split()]
    return ([self.bos_id] if add_bos else []) + ids


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--batch_sizes", default="1,8")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--random_init", action="store_true",
                 help="random weights of the --model preset, no tokenizer, no perplexity")
  args = p.parse_args(argv)

  t0 = time.perf_counter()
  if args.random_init:
    from userllm_jax.models import gemma  # pylint: disable=import-outside-toplevel
    cfg = gemma.get_config(args.model, dtype=args.dtype, param_dtype=args.dtype)
    model = gemma.Gemma3(cfg, rngs=nnx.Rngs(0))
    tok = _IdsTokenizer(cfg.vocab_size)
  else:
    from userllm_jax import weights  # pylint: disable=import-outside-toplevel
    model, tok = weights.load_gemma(args.model, dtype=jnp.dtype(args.dtype))
  load_s = time.perf_counter() - t0
  dev = jax.devices()[0]
  print(f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}  jax {jax.__version__}"
        f"  model {args.model} dtype {args.dtype}  load {load_s:.1f} s")
  if not args.random_init:
    ppl, n = perplexity(model, tok)
    print(f"perplexity on the fixed paragraph ({n} scored tokens): {ppl:.3f}")
  print(f"{'batch':>5} {'prompt':>6} {'new':>4} {'prefill tok/s':>14} {'decode tok/s':>13} "
        f"{'t(1) s':>8} {'t(N) s':>8}")
  for b in (int(x) for x in args.batch_sizes.split(",")):
    pre, dec, t1, tn = throughput(model, tok, b, args.prompt_len, args.new_tokens, args.repeats)
    print(f"{b:>5} {args.prompt_len:>6} {args.new_tokens:>4} {pre:>14.1f} {dec:>13.1f} "
          f"{t1:>8.3f} {tn:>8.3f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
