"""The User-LLM main job: stage 1, stage 2 (cross-attention, soft prompt) and the TP baseline.

    python -m userllm_jax.main --config=configs/userllm_movielens_100k.py --workdir=runs/main

Steps (all methods share the LLM, the tasks, the prompts and the test users):

1. + 2. **Data and stage 1** (``jobs/encoder_job.py:train_and_evaluate`` in
   ``WORKDIR/stage1``): the dataset is prepared (or reused from the cache), and
   the user encoder is pretrained by next-item prediction on every user's
   leave-one-out training part (all but the last two events) and evaluated by
   full ranking.  Stage-2 test targets (each test user's last event) are never
   in a stage-1 training window.
3. **LLM**: ``weights.load_gemma(config.llm.name)`` (Gemma 3 270M by default),
   or ``llm.name='tiny'``: a random tiny Gemma with a word-level tokenizer
   built from the catalogue (tests, smoke runs).
4. **Tasks** (``data/tasks.py``, ``config.tasks.names``): users split into
   stage-2 train / test users; next item (target: the next item's title),
   favourite genre, and review generation (target: the user's review text of
   the item the prompt names; Amazon, Google Local).  Titles and genres must fit
   ``config.max_target_tokens`` (else an error); review targets are cut to
   ``config.max_review_tokens`` (the cut text gets no EOS: the review goes on).
5. **Methods** (``config.methods``), each trained with ``train/loop.py`` for
   ``config.train.steps`` on the same examples:
   ``userllm_xattn`` / ``userllm_soft_prompt``: ``models/userllm.py`` with the
   pretrained encoder, strategy ``config.userllm.strategy`` ('enc': encoder +
   bridge train, the LLM is frozen; 'proj': only the bridge);
   ``tp_lora``: the same LLM reading the history as text
   (``tasks.serialize_history``, ``config.tp.budget_tokens``) with LoRA.
6. **Evaluation** on the test users: next item by trie-constrained beam search
   (``eval/trie.py``; ``config.eval.beams`` beams, every beam a catalogue title)
   -> Recall@K; favourite genre by trie-constrained greedy decoding over the
   genre names -> accuracy; review by unconstrained decoding (greedy, or
   ``config.eval.review_beams`` beams; at most ``config.max_review_tokens`` new
   tokens, stopping at EOS) -> ROUGE-L (``eval/text_metrics.rouge_l``: mean
   F-measure ``rougeL``, also ``rougeL_precision`` / ``rougeL_recall``) against
   the whole review; prompt tokens; GFLOPs per example (XLA's cost
   analysis of the compiled prefill of one example: encoder + perceiver +
   projector + LLM over the prompt for User-LLM, LLM over the text history +
   prompt for TP); wall-clock ms per example (decoding included).  Repeated
   for every history length in ``config.tasks.history_lengths`` (the most
   recent n events of the same window).

Outputs: a printed table (method x metrics), ``WORKDIR/results.json`` (written
atomically), every review generation in
``WORKDIR/generations/<method>_review.jsonl`` (one line per test user and
history length: ``history_len, user, target, generated``), and
``WORKDIR/quality_vs_history.png`` / ``WORKDIR/gflops_vs_history.png`` when
matplotlib is importable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from userllm_jax import paths
from userllm_jax.data import tasks as tasks_lib
from userllm_jax.eval import text_metrics
from userllm_jax.eval import trie as trie_lib

METHODS = ("userllm_xattn", "userllm_soft_prompt", "tp_lora")
DEFAULT_MAX_REVIEW_TOKENS = 64


def target_budgets(config) -> tuple[int, dict[str, int]]:
  """(padded target length, task -> target token limit incl. EOS) of stage 2.

  Titles and genres use ``config.max_target_tokens``; reviews
  ``config.max_review_tokens`` (default 64), also the generation limit at eval.
  """
  max_target = int(config.max_target_tokens)
  budgets = {str(t): max_target for t in config.tasks.names}
  if "review" in budgets:
    budgets["review"] = int(config.get("max_review_tokens", DEFAULT_MAX_REVIEW_TOKENS))
  return max(budgets.values(), default=max_target), budgets


def _progress(iterable, desc: str, total: Optional[int] = None):
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(iterable, desc=desc, total=total, leave=False)
  except ImportError:  # pragma: no cover
    return iterable


def _sub_config(config, section: str, **extra) -> ml_collections.ConfigDict:
  """A config for ``train/loop.py``: ``train`` = ``config[section]``, plus mesh and seed."""
  c = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict(config[section].to_dict())
  c.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
  c.seed = int(config.seed)
  for k, v in extra.items():
    c[k] = v
  return c


# ---------------------------------------------------------------------------------------------
# 1 + 2. Data and stage 1 (jobs/encoder_job.py).


def stage1_config(config) -> ml_collections.ConfigDict:
  """The ``jobs/encoder_job.py`` config of stage 1, from this job's config."""
  c = ml_collections.ConfigDict()
  c.job = "encoder"
  c.seed = int(config.seed)
  c.data = ml_collections.ConfigDict(config.data.to_dict())
  # Learned positions must cover both the pretraining crops and the stage-2 windows.
  c.data.max_len = max(int(config.tasks.window), int(config.encoder.max_len))
  c.model = ml_collections.ConfigDict(config.encoder.model.to_dict())
  c.loss = ml_collections.ConfigDict(config.encoder.loss.to_dict())
  c.train = ml_collections.ConfigDict(config.encoder_train.to_dict())
  c.eval = ml_collections.ConfigDict(dict(ks=(1, 5, 10), batch_size=256))
  c.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
  return c


def run_stage1(config, workdir: str):
  """Prepares the data and pretrains (or resumes) the encoder in ``workdir``.

  Returns ``(prepared dataset, encoder, EncoderConfig, summary)``.
  """
  from userllm_jax.jobs import encoder_job  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  res, model, prepared = encoder_job.train_and_evaluate(stage1_config(config), workdir)
  test = res.get("test", {})
  info = {"steps": res["train"]["steps"], "seconds": time.time() - t0,
          "first_loss": res["train"]["first_loss"], "final_loss": res["train"]["final_loss"],
          "test": test.get("model"), "test_popularity": test.get("popularity"),
          "dataset": res.get("dataset")}
  logging.info("stage 1 done: %s", info)
  return prepared, model, model.cfg, info


# ---------------------------------------------------------------------------------------------
# 3. LLM.


def _text_corpus(catalog: tasks_lib.Catalog, extra_texts: Sequence[str] = ()) -> list[str]:
  corpus = [t for t in catalog.item_titles if t]
  corpus += [str(g) for g in catalog.genre_names]
  corpus += [catalog.rating_text(i) or "" for i in range(len(catalog.rating_names))]
  corpus += [tasks_lib.TP_HEADER, ", rated 0123456789 (, ) \n item"]
  corpus += [tasks_lib.prompt_for(t, catalog, title="x") for t in ("next_item", "fav_genre")]
  return corpus + list(extra_texts)


def load_llm(config, catalog: tasks_lib.Catalog, extra_texts: Sequence[str] = ()):
  """(gemma, tokenizer): the pretrained Gemma, or a random tiny one with a word tokenizer.

  ``extra_texts`` (e.g. review prompts and texts) join the tiny tokenizer's corpus.
  """
  name = config.llm.name
  if name == "tiny":
    from userllm_jax.models import gemma as gemma_lib  # pylint: disable=g-import-not-at-top
    tok = tasks_lib.WordTokenizer(_text_corpus(catalog, extra_texts))
    overrides = config.llm.get("tiny", ml_collections.ConfigDict()).to_dict()
    gcfg = gemma_lib.tiny(vocab_size=tok.vocab_size, **overrides)
    abstract = nnx.eval_shape(lambda: gemma_lib.Gemma3(gcfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    state = jax.jit(lambda: nnx.split(
        gemma_lib.Gemma3(gcfg, rngs=nnx.Rngs(int(config.seed) + 7)))[1])()
    model = nnx.merge(graphdef, state)
    # Gemma's unit-variance embedding is tied to the output: a *random* model then has logits
    # of std ~sqrt(D) (initial loss ~30 nats).  Scale it to std 1/sqrt(D): unit-variance
    # logits, as a trained model has.
    emb = model.embedder.input_embedding
    emb[...] = emb[...] / jnp.sqrt(jnp.float32(gcfg.embed_dim))
    return model, tok
  from userllm_jax import weights  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  gemma, tok = weights.load_gemma(name, dtype=jnp.dtype(config.llm.get("dtype", "float32")))
  logging.info("loaded %s in %.1fs", name, time.time() - t0)
  return gemma, tok


# ---------------------------------------------------------------------------------------------
# 4. Tasks.


@dataclasses.dataclass
class TaskData:
  train: list          # training examples (all tasks, interleaved)
  test: dict           # task -> test examples
  train_users: np.ndarray
  test_users: np.ndarray


def build_task_data(config, prepared, catalog) -> TaskData:
  tc = config.tasks
  tr_users, te_users = tasks_lib.split_users(prepared.num_users, int(tc.num_test_users),
                                             int(config.seed))
  if int(tc.get("max_train_users", 0)) > 0:
    tr_users = np.random.default_rng(int(config.seed) + 1).permutation(tr_users)[
        :int(tc.max_train_users)]
  train, test = [], {}
  for task in tc.names:
    train += tasks_lib.build_examples(
        prepared, tr_users, task, catalog, split="train", window=int(tc.window),
        min_history=int(tc.min_history), stride=int(tc.stride),
        max_examples_per_user=int(tc.max_examples_per_user))
    test[task] = tasks_lib.build_examples(prepared, te_users, task, catalog, split="test",
                                          window=int(tc.window),
                                          min_history=int(tc.min_history))
    if not test[task]:
      raise ValueError(f"task {task!r}: no test examples from {len(te_users)} test users "
                       f"(min_history={tc.min_history})")
  np.random.default_rng(int(config.seed) + 2).shuffle(train)
  logging.info("tasks: %d training examples from %d users; test: %s", len(train), len(tr_users),
               {k: len(v) for k, v in test.items()})
  return TaskData(train, test, tr_users, te_users)


def truncate_history(ex: tasks_lib.Example, n: int) -> tasks_lib.Example:
  """The same example with only its most recent ``n`` history events (left-aligned)."""
  h = ex.history
  length = int(h["length"])
  k = min(n, length)
  new = {}
  for key in tasks_lib.HISTORY_FIELDS:
    arr = np.zeros_like(h[key])
    arr[:k] = h[key][length - k:length]
    new[key] = arr
  new["position"][:k] = np.arange(k)
  new["length"] = np.int32(k)
  return dataclasses.replace(ex, history=new)


# ---------------------------------------------------------------------------------------------
# 5. Models and stage-2 training.


def _lm_loss(logits_fn: Callable, batch, max_target_tokens: int):
  """Mean next-token NLL over the target tokens (+EOS); logits only where the loss is."""
  tokens = jnp.asarray(batch["tokens_BxL"])
  targets = jnp.asarray(batch["targets_BxL"])
  loss_mask = jnp.asarray(batch["loss_mask_BxL"]).astype(jnp.float32)
  input_mask = jnp.asarray(batch["input_mask_BxL"]).astype(bool)
  L = tokens.shape[1]
  start_B = jnp.asarray(batch["prompt_len_B"]).astype(jnp.int32) - 1
  raw = start_B[:, None] + jnp.arange(max_target_tokens, dtype=jnp.int32)[None, :]
  lp = jnp.clip(raw, 0, L - 1)
  targets = jnp.take_along_axis(targets, lp, axis=1)
  loss_mask = jnp.take_along_axis(loss_mask, lp, axis=1) * (raw < L)
  logits = logits_fn(tokens, input_mask, lp).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  denom = jnp.maximum(loss_mask.sum(), 1.0)
  loss = (nll * loss_mask).sum() / denom
  acc = ((jnp.argmax(logits, -1) == targets) * loss_mask).sum() / denom
  return loss, {"token_accuracy": acc}


def _history_batch(batch):
  """The encoder inputs (``item_BxT`` ...) of a stage-2 batch."""
  return {v: batch[v] for v in tasks_lib.BATCH_NAMES.values() if v in batch}


@dataclasses.dataclass
class Method:
  """A trained method: how to run its LLM with a history batch."""
  name: str
  kind: str                      # 'userllm' | 'tp'
  model: Any
  max_prompt_tokens: int
  prompt_fn: Callable            # example -> (prompt text, SerializedHistory | None)
  train_info: dict


def _pretrained_state(module):
  return nnx.state(module, nnx.Param)


def build_method(config, method: str, encoder, ecfg, gemma, tokenizer, catalog):
  """(build_model(rngs), trainable filter, loss_fn, prompt_fn, max_prompt_tokens, kind)."""
  from userllm_jax.models import gemma as gemma_lib  # pylint: disable=g-import-not-at-top
  from userllm_jax.models import encoder as enc_lib  # pylint: disable=g-import-not-at-top
  max_target = target_budgets(config)[0]
  gcfg = gemma.cfg
  gemma_params = _pretrained_state(gemma)
  if method.startswith("userllm_"):
    from userllm_jax.models import userllm as ul  # pylint: disable=g-import-not-at-top
    mode = method[len("userllm_"):]
    ucfg = ul.UserLLMConfig.from_config(config.userllm, mode=mode)
    enc_params = _pretrained_state(encoder)

    def build_model(rngs):
      enc = enc_lib.UserEncoder(ecfg, rngs=rngs)
      nnx.update(enc, enc_params)
      g = gemma_lib.Gemma3(gcfg, rngs=rngs)
      nnx.update(g, gemma_params)
      return ul.build_userllm(ucfg, encoder=enc, gemma=g, rngs=rngs)

    def loss_fn(model, batch, rng):
      hist = _history_batch(batch)
      return _lm_loss(lambda t, m, lp: model(hist, t, m, logits_positions=lp,
                                             deterministic=False, rng=rng), batch, max_target)

    def prompt_fn(ex):
      return ex.prompt, None

    return (build_model, ul.trainable_filter(ucfg.strategy), loss_fn, prompt_fn,
            int(config.max_prompt_tokens), "userllm")
  if method == "tp_lora":
    from userllm_jax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
    lcfg = lora_lib.LoRAConfig(rank=int(config.tp.lora_rank), alpha=float(config.tp.lora_alpha),
                               targets=tuple(config.tp.lora_targets))
    tp_cfg = gcfg.replace(lora=lcfg, cross_attention_layers=())

    def build_model(rngs):
      g = gemma_lib.Gemma3(tp_cfg, rngs=rngs)
      nnx.update(g, gemma_params)
      return g

    def loss_fn(model, batch, rng):
      del rng
      return _lm_loss(lambda t, m, lp: model(t, input_mask_BxL=m, logits_positions=lp),
                      batch, max_target)

    budget = int(config.tp.budget_tokens)

    def prompt_fn(ex):
      return tasks_lib.tp_prompt(ex, catalog, tokenizer, budget)

    return (build_model, lora_lib.LoRAParam, loss_fn, prompt_fn,
            int(config.max_prompt_tokens) + budget + 8, "tp")
  raise ValueError(f"config.methods: unknown method {method!r}; known: {METHODS}")


def train_method(config, method: str, workdir: str, encoder, ecfg, gemma, tokenizer, catalog,
                 data: TaskData) -> Method:
  from userllm_jax.train import loop  # pylint: disable=g-import-not-at-top
  build_model, trainable, loss_fn, prompt_fn, max_prompt, kind = build_method(
      config, method, encoder, ecfg, gemma, tokenizer, catalog)
  prompts = [prompt_fn(ex)[0] for ex in data.train]
  target_len, budgets = target_budgets(config)
  ds = tasks_lib.stage2_dataset(data.train, prompts, tokenizer, max_prompt_tokens=max_prompt,
                                max_target_tokens=target_len, task_target_tokens=budgets,
                                truncate_tasks=("review",),
                                batch_size=int(config.train.batch_size), seed=int(config.seed))
  sub = _sub_config(config, "train")
  t0 = time.time()
  res = loop.run_training(sub, os.path.join(workdir, method), build_model=build_model,
                          loss_fn=loss_fn, train_iter=iter(ds), trainable=trainable)
  hist = [(s, m.get("loss")) for s, m in res.history]
  info = {"steps": res.step, "seconds": time.time() - t0,
          "first_loss": hist[0][1] if hist else None, "final_loss": hist[-1][1] if hist else None,
          "loss_curve": hist}
  logging.info("%s trained: %s", method, {k: v for k, v in info.items() if k != "loss_curve"})
  return Method(method, kind, res.model, max_prompt, prompt_fn, info)


# ---------------------------------------------------------------------------------------------
# 6. Decoding and evaluation.


def _llm(method: Method):
  return method.model.gemma if method.kind == "userllm" else method.model


_PROCESSORS: dict = {}


def _processor(trie_arrays: trie_lib.TrieArrays):
  """One processor function per trie (the sampler's jit cache is keyed on it)."""
  key = id(trie_arrays)
  if key not in _PROCESSORS:
    _PROCESSORS[key] = (trie_arrays, trie_lib.make_sampler_processor(trie_arrays))
  return _PROCESSORS[key][1]


def make_decoder(method: Method, trie_arrays: Optional[trie_lib.TrieArrays], *, beams: int,
                 max_new_tokens: int, pad_id: int, eos_id: int):
  """Decoding with ``models/sampler.py``: ``fn(batch) -> (tokens, scores, done)``.

  Constrained to the titles of ``trie_arrays``, or free (no logits processor;
  e.g. reviews) when it is None.

  ``beams > 1``: beam search (summed log-probabilities, no length penalty),
  ``[B, K, N]`` tokens best first; ``beams == 1``: greedy.  For User-LLM the
  user tokens (encoder -> perceiver -> projector) are computed first, in the
  timed call, and passed as media (cross-attention) or soft prompt.
  """
  from userllm_jax.models import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  proc = _processor(trie_arrays) if trie_arrays is not None else None
  llm = _llm(method)
  sampler = sampler_lib.Sampler(llm, eos_id=eos_id, pad_id=pad_id)
  user_fn = None
  if method.kind == "userllm":
    graphdef, state = nnx.split(method.model)

    @jax.jit
    def user_inputs(state, hist):
      return nnx.merge(graphdef, state).llm_inputs(hist, deterministic=True)

    user_fn = lambda batch: user_inputs(state, _history_batch(batch))

  def decode(batch):
    prompts = (np.asarray(batch["prompt_tokens_BxP"]),
               np.arange(batch["prompt_tokens_BxP"].shape[1])[None, :]
               < np.asarray(batch["prompt_len_B"])[:, None])
    kw = user_fn(batch) if user_fn is not None else {}
    if beams > 1:
      out = sampler.beam_search(prompts, num_beams=beams, max_new_tokens=max_new_tokens,
                                logits_processor=proc, **kw)
      return out.tokens_BxKxN, out.scores_BxK, out.finished_BxK
    out = sampler.generate(prompts, max_new_tokens=max_new_tokens, logits_processor=proc, **kw)
    return (out.tokens_BxN[:, None], np.where(out.finished_B, 0.0, -np.inf)[:, None],
            out.finished_B[:, None])

  return decode


def _decode_rows(tokens_KxS: np.ndarray, scores_K: np.ndarray, done_K: np.ndarray,
                 tokenizer) -> list[str]:
  """Beam texts, best first; "" for a beam that did not finish or has no finite score."""
  out = []
  for row, score, done in zip(tokens_KxS.tolist(), scores_K.tolist(), done_K.tolist()):
    if not done or not np.isfinite(score) or score < -1e29:
      out.append("")  # ran out of max_new_tokens before EOS, or fewer live beams than K
      continue
    row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
    out.append(tokenizer.decode([t for t in row if t != tokenizer.pad_id]))
  return out


def _decode_text(tokens_S: np.ndarray, tokenizer) -> str:
  """Free text of one generated row: up to (excluding) EOS, without pad / BOS / control tokens.

  A row that ran out of new tokens before EOS keeps its text (a cut review is
  still a review).
  """
  row = [int(t) for t in np.asarray(tokens_S).reshape(-1)]
  if tokenizer.eos_id in row:
    row = row[:row.index(tokenizer.eos_id)]
  row = [t for t in row if t not in (tokenizer.pad_id, tokenizer.bos_id)]
  return tokenizer.decode(row, skip_special=True)


def prefill_gflops(method: Method, batch1: dict) -> float:
  """GFLOPs of the compiled prefill (history encoding + prompt) of one example (XLA cost analysis)."""
  graphdef, state = nnx.split(method.model)
  kind = method.kind

  def prefill(state, batch):
    model = nnx.merge(graphdef, state)
    P = batch["prompt_tokens_BxP"].shape[1]
    mask = jnp.arange(P)[None, :] < batch["prompt_len_B"][:, None]
    lp = (batch["prompt_len_B"] - 1)[:, None]
    if kind == "userllm":
      return model(_history_batch(batch), batch["prompt_tokens_BxP"], mask, logits_positions=lp)
    return model(batch["prompt_tokens_BxP"], input_mask_BxL=mask, logits_positions=lp)

  compiled = jax.jit(prefill).lower(state, batch1).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan"))) / 1e9


def _exact_prompt_batch(examples, prompts, tokenizer):
  """A batch of one example whose prompt is padded to exactly its own length (for FLOPs)."""
  n = tasks_lib.num_prompt_tokens(prompts[0], tokenizer)
  return tasks_lib.prompt_batch(examples[:1], prompts[:1], tokenizer, max_prompt_tokens=n)


def evaluate_method(config, method: Method, data: TaskData, tokenizer, catalog, tries,
                    history_len: int) -> dict:
  """Metrics of one method on the test users with histories cut to ``history_len`` events.

  ``out["examples"][task]``: the first 3 examples; ``out["generations"]["review"]``:
  every review generation (``run`` writes them to ``generations/`` and keeps
  them out of results.json).
  """
  ec = config.eval
  bs = int(ec.batch_size)
  _, budgets = target_budgets(config)
  out = {"history_len": history_len}
  prompt_tokens, gflops = [], []
  for task in config.tasks.names:
    examples = [truncate_history(e, history_len) for e in data.test[task]]
    pairs = [method.prompt_fn(e) for e in examples]
    prompts = [p for p, _ in pairs]
    prompt_tokens += [tasks_lib.num_prompt_tokens(p, tokenizer) for p in prompts]
    if task == "next_item":
      beams, tr, max_new = int(ec.beams), tries["next_item"], budgets[task]
    elif task == "fav_genre":
      beams, tr, max_new = 1, tries["fav_genre"], budgets[task]
    elif task == "review":  # free text: no trie
      beams, tr, max_new = int(ec.get("review_beams", 1)), None, budgets[task]
    else:
      raise ValueError(f"config.tasks.names: evaluation of task {task!r} is not implemented; "
                       f"known: {tasks_lib.TASKS}")
    decode = make_decoder(method, tr, beams=beams, max_new_tokens=max_new,
                          pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id)
    cands: list[list[str]] = []
    valid, total = 0, 0
    t_total = 0.0
    first = True
    for i in _progress(range(0, len(examples), bs), f"{method.name}/{task}/h{history_len}"):
      chunk = examples[i:i + bs]
      cp = prompts[i:i + bs]
      n_real = len(chunk)
      if n_real < bs:  # pad the last batch with copies (one compiled shape)
        chunk = chunk + [chunk[-1]] * (bs - n_real)
        cp = cp + [cp[-1]] * (bs - n_real)
      batch = tasks_lib.prompt_batch(chunk, cp, tokenizer,
                                     max_prompt_tokens=method.max_prompt_tokens)
      t0 = time.time()
      toks, scores, done = decode(batch)
      dt = time.time() - t0
      if first:  # the first call compiles; time it again so compile time is not reported
        t0 = time.time()
        toks, scores, done = decode(batch)
        dt = time.time() - t0
        first = False
      t_total += dt
      if task == "review":  # the best beam (or the greedy row), finished or not
        cands += [[_decode_text(np.asarray(toks[b])[0], tokenizer)] for b in range(n_real)]
        continue
      py_trie = tries[task + "_py"]
      for b in range(n_real):
        cands.append(_decode_rows(np.asarray(toks[b]), np.asarray(scores[b]),
                                  np.asarray(done[b]), tokenizer))
        for row, sc in zip(np.asarray(toks[b]).tolist(), np.asarray(scores[b]).tolist()):
          if np.isfinite(sc) and sc > -1e29:
            total += 1
            valid += bool(py_trie.is_complete(row))
    targets = [e.target for e in examples]
    ms = 1000.0 * t_total / len(examples)
    if task == "next_item":
      for k in ec.ks:
        out[f"recall@{k}"] = text_metrics.recall_at_k(cands, targets, int(k))
      out["next_item_ms_per_example"] = ms
      # Fraction of live beams that are complete catalogue titles (1.0 by construction).
      out["next_item_catalogue_beams"] = valid / max(total, 1)
    elif task == "fav_genre":
      out["genre_accuracy"] = text_metrics.accuracy([c[0] for c in cands], targets)
      out["genre_ms_per_example"] = ms
    else:
      generated = [c[0] for c in cands]
      rouge = text_metrics.rouge_l(generated, targets)
      out["rougeL"] = rouge["fmeasure"]
      out["rougeL_precision"] = rouge["precision"]
      out["rougeL_recall"] = rouge["recall"]
      out["review_ms_per_example"] = ms
      out.setdefault("generations", {})["review"] = [
          {"history_len": history_len, "user": int(e.user_index), "target": t, "generated": g}
          for e, t, g in zip(examples, targets, generated)]
    gflops.append(prefill_gflops(method, _exact_prompt_batch(examples, prompts, tokenizer)))
    out.setdefault("examples", {})[task] = [
        {"user": int(e.user_index), "target": e.target, "candidates": c[:5]}
        for e, c in zip(examples[:3], cands[:3])]
  out["prompt_tokens"] = float(np.mean(prompt_tokens))
  out["gflops_per_example"] = float(np.mean(gflops))
  return out


# ---------------------------------------------------------------------------------------------
# 7. Report.


TABLE_COLUMNS = ("recall@1", "recall@5", "recall@10", "genre_accuracy", "rougeL",
                 "gflops_per_example", "prompt_tokens", "next_item_ms_per_example",
                 "genre_ms_per_example", "review_ms_per_example")


def format_table(rows: dict[str, dict]) -> str:
  cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows.values())]
  head = ["method"] + cols
  lines = [head]
  for name, r in rows.items():
    lines.append([name] + [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                           for c in cols])
  widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
  fmt = lambda l: "  ".join(s.ljust(w) for s, w in zip(l, widths))
  return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines[1:]])


def write_plots(workdir: str, sweep: dict[str, list[dict]]) -> list[str]:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("matplotlib not importable: no plots")
    return []
  written = []
  metrics = [m for m in ("recall@1", "recall@10", "genre_accuracy", "rougeL")
             if any(m in r for rs in sweep.values() for r in rs)]
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
  for ax, m in zip(axes[0], metrics):
    for name, rs in sweep.items():
      ax.plot([r["history_len"] for r in rs], [r.get(m, np.nan) for r in rs], "o-", label=name)
    ax.set_xlabel("history length (events)")
    ax.set_ylabel(m)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, "quality_vs_history.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  written.append(path)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, rs in sweep.items():
    ax.plot([r["history_len"] for r in rs], [r["gflops_per_example"] for r in rs], "o-",
            label=name)
  ax.set_xlabel("history length (events)")
  ax.set_ylabel("GFLOPs per example (prefill)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, "gflops_vs_history.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  written.append(path)
  return written


# ---------------------------------------------------------------------------------------------
# The job.


def run(config, workdir: str) -> dict:
  """Runs the whole job; returns (and writes to ``workdir/results.json``) the results."""
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  for m in config.methods:
    if m not in METHODS:
      raise ValueError(f"config.methods: unknown method {m!r}; known: {METHODS}")
  hl = sorted({int(h) for h in config.tasks.history_lengths} | {int(config.tasks.window)})
  if hl[-1] > int(config.tasks.window):
    raise ValueError(f"config.tasks.history_lengths {hl} exceed tasks.window="
                     f"{config.tasks.window}")
  timings = {}

  prepared, encoder, ecfg, stage1 = run_stage1(config, os.path.join(workdir, "stage1"))
  catalog = tasks_lib.Catalog.from_dataset(prepared, domain=config.data.domain)
  timings["stage1_s"] = time.time() - t_start

  data = build_task_data(config, prepared, catalog)
  # Review prompts and texts for the tiny word tokenizer (the real tokenizer ignores them).
  review_texts = [x for e in data.train + [e for v in data.test.values() for e in v]
                  if e.task == "review" for x in (e.prompt, e.target)]

  t0 = time.time()
  gemma, tokenizer = load_llm(config, catalog, extra_texts=review_texts)
  timings["load_llm_s"] = time.time() - t0

  item_ids = [i for i, t in enumerate(catalog.item_titles) if t]
  py_items = trie_lib.TitleTrie.from_titles([catalog.item_titles[i] for i in item_ids], tokenizer,
                                            item_ids=item_ids)
  genre_ids = catalog.favourite_genre_candidates
  py_genres = trie_lib.TitleTrie.from_titles([str(catalog.genre_names[g]) for g in genre_ids],
                                             tokenizer, item_ids=genre_ids)
  vocab = gemma.cfg.vocab_size
  tries = {"next_item": py_items.to_arrays(vocab), "fav_genre": py_genres.to_arrays(vocab),
           "next_item_py": py_items, "fav_genre_py": py_genres}

  results: dict[str, Any] = {"config": config.to_dict(), "stage1": stage1,
                             "num_train_examples": len(data.train),
                             "num_test_users": int(len(data.test_users)),
                             "num_test_examples": {k: len(v) for k, v in data.test.items()},
                             "methods": {}, "sweep": {}}
  table_rows = {}
  for method_name in config.methods:
    t0 = time.time()
    method = train_method(config, method_name, workdir, encoder, ecfg, gemma, tokenizer,
                          catalog, data)
    timings[f"{method_name}_train_s"] = time.time() - t0
    t0 = time.time()
    sweep = []
    generations: dict[str, list] = {}
    for h in hl:
      r = evaluate_method(config, method, data, tokenizer, catalog, tries, h)
      for task, rows in r.pop("generations", {}).items():
        generations.setdefault(task, []).extend(rows)
      logging.info("%s history=%d: %s", method_name, h,
                   {k: v for k, v in r.items() if k != "examples"})
      sweep.append(r)
    timings[f"{method_name}_eval_s"] = time.time() - t0
    if jax.process_index() == 0:
      for task, rows in generations.items():
        path = os.path.join(workdir, "generations", f"{method_name}_{task}.jsonl")
        paths.write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    main = next(r for r in sweep if r["history_len"] == int(config.tasks.window))
    table_rows[method_name] = main
    results["methods"][method_name] = {"train": method.train_info, **main}
    results["sweep"][method_name] = [{k: v for k, v in r.items() if k != "examples"}
                                     for r in sweep]
    del method

  table = format_table(table_rows)
  print(f"\nUser-LLM results ({config.data.name}, {config.llm.name}, "
        f"{len(data.test_users)} test users, history window {config.tasks.window}):\n{table}\n",
        flush=True)
  results["table"] = table
  results["plots"] = write_plots(workdir, results["sweep"])
  timings["total_s"] = time.time() - t_start
  results["timings"] = timings
  if jax.process_index() == 0:
    paths.write_atomic(os.path.join(workdir, "results.json"),
                 json.dumps(results, indent=2, default=_json_default))
  logging.info("timings: %s", timings)
  return results


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)
