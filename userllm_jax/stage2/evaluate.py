"""Stage-2 evaluation: decode on the test users, score, time.

Per task (``config.tasks.names``; those in ``tasks.window_only`` at the window only):

* ``next_item``: trie-constrained beam search over the catalogue titles
  (``eval.beams`` beams; logits only over the trie's tokens, renormalised over what the
  trie allows; a beam finishes as soon as its title is decided:
  :mod:`userllm_jax.models.sampler`) -> Recall@K;
* ``fav_genre``: the closed answer set (every genre name) scored exactly, the
  best-scoring genre is the answer -> accuracy.  Scores are normalised over what the genre
  trie allows at each step (as the beams are).  When the names' first tokens are all
  distinct (the 19 ml-100k genres), every later step has one allowed token (probability 1),
  so the exact set argmax is trie-constrained greedy decoding: one prefill and a few
  one-row steps; otherwise :meth:`Sampler.score_candidates` scores all C candidates in one
  batched pass (C times the rows);
* ``review``: free decoding (greedy, or ``eval.review_beams`` beams) -> ROUGE-L.

Each metric comes with its 95% interval (``eval.confidence``; Wilson for proportions, a
normal interval for ROUGE-L means).  Latency per example, batch-amortised (the batch's
wall time over its rows, after a warm-up call that compiles): ``*_ttft_ms`` is the time to
the first token (user tokens for User-LLM + the prefill), ``*_ms`` the whole decode.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from userllm_jax.data import tasks as tasks_lib
from userllm_jax.eval import stats
from userllm_jax.eval import text_metrics
from userllm_jax.eval import trie as trie_lib
from userllm_jax.models import sampler as sampler_lib
from userllm_jax.stage2 import examples as examples_lib
from userllm_jax.stage2 import methods as methods_lib
from userllm_jax.train import mesh as mesh_lib
from userllm_jax.train import preemption


def progress(iterable, desc: str, total: Optional[int] = None):
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(iterable, desc=desc, total=total, leave=False)
  except ImportError:  # pragma: no cover
    return iterable


@dataclasses.dataclass
class AnswerSets:
  """What the answers may be: catalogue titles (a trie) and genre names (a closed set)."""
  items: trie_lib.TitleTrie                 # titles, with item ids
  item_constraint: Any                      # its TrieConstraint for the sampler
  genre_ids: list[int]
  genre_names: list[str]
  genre_tokens: list[list[int]]             # encode(name) + [EOS], one per genre
  genre_constraint: Any                     # the genre names' TrieConstraint
  genres: trie_lib.TitleTrie                # the genre names, with genre ids

  @classmethod
  def build(cls, catalog: tasks_lib.Catalog, tokenizer, vocab_size: int) -> "AnswerSets":
    item_ids = [i for i, t in enumerate(catalog.item_titles) if t]
    items = trie_lib.TitleTrie.from_titles([catalog.item_titles[i] for i in item_ids], tokenizer,
                                           item_ids=item_ids)
    genre_ids = list(catalog.favourite_genre_candidates)
    names = [str(catalog.genre_names[g]) for g in genre_ids]
    toks = [list(tokenizer.encode(n)) + [tokenizer.eos_id] for n in names]
    genres = trie_lib.TitleTrie.from_titles(names, tokenizer, item_ids=genre_ids)
    return cls(items, trie_lib.make_constraint(items, vocab_size), genre_ids, names,
               toks, trie_lib.make_constraint(genres, vocab_size), genres)

  def tries(self) -> dict[str, trie_lib.TitleTrie]:
    """Task -> its answer trie (the trie-normalised stage-2 loss; ``stage2/loss.py``)."""
    return {"next_item": self.items, "fav_genre": self.genres}

  @property
  def genre_first_tokens_distinct(self) -> bool:
    return len({t[0] for t in self.genre_tokens}) == len(self.genre_tokens)

  def token_lists(self) -> list[list[int]]:
    """Every answer token (the title trie's tokens, genres + EOS): the answer vocabulary."""
    return [np.asarray(self.item_constraint.vocab_ids).tolist()] + self.genre_tokens


class Decoder:
  """Decoding one method: user tokens (jitted, for User-LLM) + the sampler on its Gemma.

  ``prompt_bucket``: the evaluation passes the longest prompt of the whole evaluated set
  (rounded up to 16), so every batch has one shape and compiles once; the first batch is
  run twice and only the second run is timed.

  On the method's mesh (``tm.mesh``) every process passes the same whole batch and its rows
  are split over the data-parallel devices (``mesh.host_to_global``), so a mesh that spans
  processes evaluates each row once; the sampler returns the results on every process.
  """

  def __init__(self, tm: methods_lib.TrainedMethod, tokenizer, *, prompt_bucket: int = 16):
    self.tm = tm
    self.tokenizer = tokenizer
    llm = tm.spec.llm(tm.model)
    self.place = ((lambda x: mesh_lib.host_to_global(x, tm.mesh)) if tm.mesh is not None
                  else jnp.asarray)
    self.sampler = sampler_lib.Sampler(llm, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                       prompt_bucket=prompt_bucket, place_inputs=self.place)
    self._user_fn = None
    if tm.kind == "userllm":
      cache = tm.__dict__.setdefault("_eval_cache", {})
      key = ("user_fn", tm.spec.ablate_users)
      if key not in cache:          # one jitted function per method: compiled once
        graphdef, state = nnx.split(tm.model)
        spec = tm.spec

        @jax.jit
        def user_inputs(state, hist):
          return spec.user_inputs(nnx.merge(graphdef, state), hist)

        cache[key] = lambda batch: user_inputs(state, batch)
      self._user_fn = cache[key]

  def user_kwargs(self, batch) -> tuple[dict, float]:
    """(sampler kwargs carrying the users, seconds spent computing them)."""
    if self._user_fn is None:
      return {}, 0.0
    batch = methods_lib.history_batch(batch)
    t0 = time.perf_counter()
    kw = jax.block_until_ready(self._user_fn(jax.tree.map(self.place, batch)))
    return kw, time.perf_counter() - t0

  @staticmethod
  def prompts(batch):
    P = batch["prompt_tokens_BxP"].shape[1]
    mask = np.arange(P)[None, :] < np.asarray(batch["prompt_len_B"])[:, None]
    return np.asarray(batch["prompt_tokens_BxP"]), mask


def _decode_title_beams(tokens_KxN, scores_K, done_K, tokenizer) -> list[str]:
  """Beam texts, best first; "" for a beam that did not finish or has no finite score."""
  out = []
  for row, score, done in zip(np.asarray(tokens_KxN).tolist(), np.asarray(scores_K).tolist(),
                              np.asarray(done_K).tolist()):
    if not done or not np.isfinite(score) or score < -1e29:
      out.append("")
      continue
    row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
    out.append(tokenizer.decode([t for t in row if t != tokenizer.pad_id]))
  return out


def _decode_text(tokens_N, tokenizer) -> str:
  """Free text of one generated row: up to (excluding) EOS, without pad / BOS / controls."""
  row = [int(t) for t in np.asarray(tokens_N).reshape(-1)]
  if tokenizer.eos_id in row:
    row = row[:row.index(tokenizer.eos_id)]
  row = [t for t in row if t not in (tokenizer.pad_id, tokenizer.bos_id)]
  return tokenizer.decode(row, skip_special=True)


def prefill_gflops(tm: methods_lib.TrainedMethod, batch1: dict) -> float:
  """GFLOPs of the prefill (user tokens + prompt) of one example: XLA's cost analysis of the
  lowered computation (no compile), cached per method and input shapes."""
  cache = tm.__dict__.setdefault("_eval_cache", {})
  key = ("gflops",) + tuple(sorted((k, np.shape(v)) for k, v in batch1.items()))
  if key not in cache:
    cache[key] = _prefill_gflops(tm, batch1)
  return cache[key]


def _prefill_gflops(tm: methods_lib.TrainedMethod, batch1: dict) -> float:
  graphdef, state = nnx.split(tm.model)
  spec = tm.spec

  def prefill(state, batch):
    model = nnx.merge(graphdef, state)
    P = batch["prompt_tokens_BxP"].shape[1]
    mask = jnp.arange(P)[None, :] < batch["prompt_len_B"][:, None]
    lp = (batch["prompt_len_B"] - 1)[:, None]
    kw = spec.user_inputs(model, methods_lib.history_batch(batch))
    return spec.llm(model)(batch["prompt_tokens_BxP"], input_mask_BxL=mask,
                           logits_positions=lp, **kw)

  return methods_lib.lowered_flops(jax.jit(prefill).lower(state, batch1)) / 1e9


def _with_ci(out: dict, name: str, hits: Sequence[float], confidence: float,
             binary: bool = True) -> None:
  n = len(hits)
  out[name] = float(np.mean(hits))
  lo, hi = (stats.proportion_ci(int(round(sum(hits))), n, confidence) if binary
            else stats.mean_ci(hits, confidence))
  out[name + "_ci"] = [lo, hi]


def evaluate_method(config, tm: methods_lib.TrainedMethod, data: examples_lib.TaskData,
                    tokenizer, answers: AnswerSets, history_len: int) -> dict:
  """Metrics of one method on the test users with histories cut to ``history_len`` events.

  ``out["examples"][task]``: the first 3 examples; ``out["generations"]["review"]``: every
  review generation (the job writes them to ``generations/``, not to results.json).
  """
  ec = config.eval
  bs = int(ec.batch_size)
  conf = float(ec.get("confidence", 0.95))
  _, budgets = examples_lib.target_budgets(config)
  out: dict[str, Any] = {"history_len": history_len}
  prompt_tokens, gflops = [], []
  for task in examples_lib.tasks_at(config, history_len):
    if task not in tasks_lib.TASKS:
      raise ValueError(f"config.tasks.names: unknown task {task!r}; known: {tasks_lib.TASKS}")
    examples = [examples_lib.truncate_history(e, history_len) for e in data.test[task]]
    prompts = [tm.spec.prompt_fn(e) for e in examples]
    lengths = [tasks_lib.num_prompt_tokens(p, tokenizer) for p in prompts]
    prompt_tokens += lengths
    dec = Decoder(tm, tokenizer, prompt_bucket=sampler_lib.bucket_length(max(lengths), 16))
    cands: list[list[str]] = []
    t_first = t_total = 0.0
    warm = False
    for i in progress(range(0, len(examples), bs), f"{tm.name}/{task}/h{history_len}"):
      preemption.exit_if_requested(f"evaluating {tm.name} ({task}, history {history_len})")
      chunk, cp = examples[i:i + bs], prompts[i:i + bs]
      n_real = len(chunk)
      if n_real < bs:  # pad the last batch with copies: one compiled shape
        chunk = chunk + [chunk[-1]] * (bs - n_real)
        cp = cp + [cp[-1]] * (bs - n_real)
      batch = tasks_lib.prompt_batch(chunk, cp, tokenizer,
                                     max_prompt_tokens=tm.spec.max_prompt_tokens)
      for _ in range(1 if warm else 2):   # the first batch: compile, then time
        kw, t_user = dec.user_kwargs(batch)
        res = _run_task(task, dec, batch, kw, ec, budgets, answers)
      warm = True
      t_first += t_user + res.timing.prefill_s
      t_total += t_user + res.timing.total_s
      cands += _candidates(task, res, n_real, tokenizer, answers)
    n = len(examples)
    targets = [e.target for e in examples]
    out[f"{task}_ttft_ms"] = 1000.0 * t_first / n
    out[f"{task}_ms"] = 1000.0 * t_total / n
    if task == "next_item":
      for k in ec.ks:
        _with_ci(out, f"recall@{k}", text_metrics.hits_at_k(cands, targets, int(k)), conf)
    elif task == "fav_genre":
      _with_ci(out, "genre_accuracy", text_metrics.hits_at_k(cands, targets, 1), conf)
    else:
      generated = [c[0] for c in cands]
      per = [text_metrics.rouge_l([g], [t])["fmeasure"] for g, t in zip(generated, targets)]
      _with_ci(out, "rougeL", per, conf, binary=False)
      rouge = text_metrics.rouge_l(generated, targets)
      out["rougeL_precision"], out["rougeL_recall"] = rouge["precision"], rouge["recall"]
      out.setdefault("generations", {})["review"] = [
          {"history_len": history_len, "user": int(e.user_index), "target": t, "generated": g}
          for e, t, g in zip(examples, targets, generated)]
    n_tok = tasks_lib.num_prompt_tokens(prompts[0], tokenizer)
    one = tasks_lib.prompt_batch(examples[:1], prompts[:1], tokenizer, max_prompt_tokens=n_tok)
    gflops.append(prefill_gflops(tm, one))
    out.setdefault("examples", {})[task] = [
        {"user": int(e.user_index), "target": e.target, "candidates": c[:5]}
        for e, c in zip(examples[:3], cands[:3])]
    out[f"{task}_n"] = n
  out["prompt_tokens"] = float(np.mean(prompt_tokens))
  out["gflops_per_example"] = float(np.mean(gflops))
  return out


def _run_task(task, dec: Decoder, batch, kw, ec, budgets, answers: AnswerSets):
  prompts = dec.prompts(batch)
  if task == "next_item":
    return dec.sampler.beam_search(prompts, num_beams=int(ec.beams),
                                   max_new_tokens=budgets[task],
                                   trie=answers.item_constraint, **kw)
  if task == "fav_genre":
    if answers.genre_first_tokens_distinct:   # exact: see the module docstring
      return dec.sampler.generate(prompts, max_new_tokens=budgets[task],
                                  trie=answers.genre_constraint, **kw)
    return dec.sampler.score_candidates(prompts, answers.genre_tokens, normalize="trie", **kw)
  beams = int(ec.get("review_beams", 1))
  if beams > 1:
    return dec.sampler.beam_search(prompts, num_beams=beams, max_new_tokens=budgets[task], **kw)
  return dec.sampler.generate(prompts, max_new_tokens=budgets[task], **kw)


def _candidates(task, res, n_real, tokenizer, answers: AnswerSets) -> list[list[str]]:
  if task == "next_item":
    return [_decode_title_beams(res.tokens_BxKxN[b], res.scores_BxK[b], res.finished_BxK[b],
                                tokenizer) for b in range(n_real)]
  if task == "fav_genre":
    if hasattr(res, "tokens_BxN"):           # trie-constrained greedy
      return [[_decode_text(res.tokens_BxN[b], tokenizer)] for b in range(n_real)]
    scores = np.asarray(res.logprobs_BxC)[:n_real]
    order = np.argsort(-scores, axis=1, kind="stable")
    return [[answers.genre_names[j] for j in row] for row in order]
  if hasattr(res, "tokens_BxKxN"):
    return [[_decode_text(np.asarray(res.tokens_BxKxN[b])[0], tokenizer)] for b in range(n_real)]
  return [[_decode_text(res.tokens_BxN[b], tokenizer)] for b in range(n_real)]
