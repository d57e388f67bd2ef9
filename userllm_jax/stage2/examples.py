"""Stage-2 examples: users split into train / test, task examples, histories cut to a length.

The examples come from :mod:`userllm_jax.data.tasks`; this module decides *which* users and
cuts a job uses (``config.tasks``), and turns examples into this process's training stream.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from absl import logging

from userllm_jax.data import tasks as tasks_lib
from userllm_jax.train import checkpoint as ckpt_lib
from userllm_jax.train import mesh as mesh_lib

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


def tasks_at(config, history_len: int) -> tuple[str, ...]:
  """The tasks evaluated at ``history_len``: all of ``config.tasks.names`` at the window,
  without those in ``tasks.window_only`` (default none) at shorter histories."""
  names = tuple(str(t) for t in config.tasks.names)
  only = tuple(str(t) for t in config.tasks.get("window_only", ()))
  unknown = [t for t in only if t not in names]
  if unknown:
    raise ValueError(f"config.tasks.window_only: {unknown} not in config.tasks.names {names}")
  if int(history_len) == int(config.tasks.window):
    return names
  return tuple(t for t in names if t not in only)


@dataclasses.dataclass
class TaskData:
  """The stage-2 examples of a job: every method trains and is tested on these."""
  train: list                  # training examples (all tasks, interleaved, shuffled)
  test: dict                   # task -> test examples (one per test user with a target)
  train_users: np.ndarray
  test_users: np.ndarray
  # task -> validation examples (one per validation user, as the test's), held out of training
  valid: dict = dataclasses.field(default_factory=dict)


def build_task_data(config, prepared, catalog: tasks_lib.Catalog) -> TaskData:
  """Users split by ``config.seed`` into ``tasks.num_test_users`` test users and the rest;
  ``tasks.num_valid_users`` (default 0) of the rest are validation users, not trained on."""
  tc = config.tasks
  tr_users, te_users = tasks_lib.split_users(prepared.num_users, int(tc.num_test_users),
                                             int(config.seed))
  n_valid = int(tc.get("num_valid_users", 0))
  va_users = np.zeros((0,), np.int64)
  if n_valid > 0:
    if n_valid >= len(tr_users):
      raise ValueError(f"config.tasks.num_valid_users={n_valid} leaves no training user "
                       f"(of {len(tr_users)} non-test users)")
    perm = np.random.default_rng(int(config.seed) + 3).permutation(tr_users)
    va_users, tr_users = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
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
      raise ValueError(f"config.tasks: task {task!r} has no test example among "
                       f"{len(te_users)} test users (min_history={tc.min_history})")
  valid = {task: tasks_lib.build_examples(prepared, va_users, task, catalog, split="test",
                                          window=int(tc.window),
                                          min_history=int(tc.min_history))
           for task in tc.names} if len(va_users) else {}
  np.random.default_rng(int(config.seed) + 2).shuffle(train)
  logging.info("tasks: %d training examples from %d users; test: %s; validation: %s",
               len(train), len(tr_users), {k: len(v) for k, v in test.items()},
               {k: len(v) for k, v in valid.items()})
  return TaskData(train, test, tr_users, te_users, valid)


def truncate_history(ex: tasks_lib.Example, n: int) -> tasks_lib.Example:
  """The same example with only its most recent ``n`` history events (left-aligned)."""
  h = ex.history
  length = int(h["length_B"])
  k = min(n, length)
  new = {}
  for key in tasks_lib.HISTORY_KEYS:
    if key == "length_B":
      continue
    arr = np.zeros_like(h[key])
    arr[:k] = h[key][length - k:length]
    new[key] = arr
  new["position_BxT"][:k] = np.arange(k)
  new["length_B"] = np.int32(k)
  return dataclasses.replace(ex, history=new)


def training_stream(config, examples: Sequence[tasks_lib.Example], prompts: Sequence[str],
                    tokenizer, *, max_prompt_tokens: int, batch_size: int, mesh=None,
                    answer_tries=None, trunk=None):
  """This process's stream of stage-2 training batches (a Grain dataset iterator).

  Every process tokenizes the same examples and shuffles them with the same seed, then
  keeps its block of rows of each global batch -- the block its devices hold in ``mesh``'s
  batch sharding (``train/mesh.process_batch_block``; without a mesh, block
  ``process_index``): the global batch of ``batch_size`` rows is the single-process batch,
  row for row.  ``train.batch_by_task``
  (default True): one task per batch, padded to that task's longest target
  (``tasks.stage2_dataset``).  ``answer_tries`` (a ``stage2/loss.AnswerTries``):
  trie-normalised targets, cut to their deciding tokens, with their allowed-token masks.
  ``trunk`` (a ``stage2/trunk.TrunkCache``): each batch also carries the frozen trunk's
  hidden state (``trunk_BxLxD``).
  """
  target_len, budgets = target_budgets(config)
  nproc = jax.process_count()
  if batch_size % nproc:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by the "
                     f"{nproc} processes")
  fns = [f for f in (None if answer_tries is None else answer_tries.add_allowed, trunk) if f]

  def batch_fn(b):
    for f in fns:
      b = f(b)
    return b
  ds = tasks_lib.stage2_dataset(examples, prompts, tokenizer, max_prompt_tokens=max_prompt_tokens,
                                max_target_tokens=target_len, task_target_tokens=budgets,
                                truncate_tasks=("review",), batch_size=batch_size,
                                seed=int(config.seed),
                                batch_by_task=bool(config.train.get("batch_by_task", True)),
                                answer_cut=None if answer_tries is None else answer_tries.cut,
                                batch_fn=batch_fn if fns else None)
  if nproc > 1:
    index, count = (mesh_lib.process_batch_block(mesh, batch_size) if mesh is not None
                    else (jax.process_index(), nproc))
    rows = batch_size // count
    ds = ds.map(lambda b: {k: v[index * rows:(index + 1) * rows] for k, v in b.items()})
  # The position (global batches taken) is the same on every process and on any process
  # count: a checkpoint resumes on another number of processes (train/checkpoint.py).
  return ckpt_lib.set_shard_layout(iter(ds), ckpt_lib.REPLICATED)
