"""Stage-2 methods: User-LLM (cross-attention or soft prompt, four strategies) and TP.

A method name says what is trained:

==============================  ============================================================
``userllm_xattn``               UserLLM, gated cross-attention, strategy ``userllm.strategy``
``userllm_soft_prompt``         UserLLM, soft prompt, strategy ``userllm.strategy``
``userllm_<mode>_<strategy>``   the same with an explicit strategy (full | enc | lora | proj)
``tp_lora``                     the text-prompt baseline: the history serialized into the
                                prompt (``tp.budget_tokens``), Gemma + LoRA (``tp.lora_*``)
==============================  ============================================================

:func:`build_method` gives a :class:`MethodSpec` (how to build, what trains, how to prompt,
how to run the LLM); :func:`train_method` trains it with ``train/loop.py`` on the stage-2
loss (:mod:`userllm_jax.stage2.loss`) and returns a :class:`TrainedMethod`.
"""

from __future__ import annotations

import dataclasses
import json
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
from userllm_jax.models import encoder as enc_lib
from userllm_jax.models import gemma as gemma_lib
from userllm_jax.models import lora as lora_lib
from userllm_jax.models import userllm as ul
from userllm_jax.stage2 import examples as examples_lib
from userllm_jax.stage2 import loss as loss_lib
from userllm_jax.train import mesh as mesh_lib

KINDS = ("userllm", "tp")


@dataclasses.dataclass(frozen=True)
class MethodName:
  """A parsed method name."""
  name: str
  kind: str                 # 'userllm' | 'tp'
  mode: Optional[str]       # 'xattn' | 'soft_prompt' (userllm), None (tp)
  strategy: str             # userllm: full | enc | lora | proj; tp: 'lora'


def parse_method(name: str, config) -> MethodName:
  """``config.methods`` entry -> :class:`MethodName`; unknown names raise naming the field."""
  if name == "tp_lora":
    return MethodName(name, "tp", None, "lora")
  if name.startswith("userllm_"):
    rest = name[len("userllm_"):]
    for mode in ul.MODES:
      if rest == mode:
        return MethodName(name, "userllm", mode, str(config.userllm.strategy))
      if rest.startswith(mode + "_") and rest[len(mode) + 1:] in ul.STRATEGIES:
        return MethodName(name, "userllm", mode, rest[len(mode) + 1:])
  known = [f"userllm_{m}" for m in ul.MODES] + [
      f"userllm_{m}_{s}" for m in ul.MODES for s in ul.STRATEGIES] + ["tp_lora"]
  raise ValueError(f"config.methods: unknown method {name!r}; known: {known}")


@dataclasses.dataclass
class MethodSpec:
  """How to build, train, prompt and run one method."""
  method: MethodName
  build_model: Callable[[nnx.Rngs], nnx.Module]
  trainable: Any                              # nnx filter of the trained parameters
  prompt_fn: Callable[[tasks_lib.Example], str]
  max_prompt_tokens: int
  train: ml_collections.ConfigDict            # the train/loop.py section it trains with
  # Ablation: the user tokens are replaced by zeros (masks kept), i.e. the LLM gets no
  # information about the user; shows whether a trained model uses its input.
  ablate_users: bool = False
  # The last LLM layer below any user input whose output is frozen: cross-attention with a
  # frozen LLM (strategies 'enc', 'proj'); None otherwise.  A batch may then carry the hidden
  # state after it (``trunk_BxLxD``, stage2/trunk.py) instead of running those layers.
  trunk_layer: Optional[int] = None

  @property
  def name(self) -> str:
    return self.method.name

  @property
  def kind(self) -> str:
    return self.method.kind

  def llm(self, model) -> gemma_lib.Gemma3:
    """The Gemma inside ``model`` (the sampler runs it)."""
    return model.gemma if self.kind == "userllm" else model

  def user_inputs(self, model, batch, *, deterministic: bool = True, rng=None) -> dict:
    """The Gemma keyword arguments carrying the users (none for TP)."""
    if self.kind != "userllm":
      return {}
    kw = model.llm_inputs(history_batch(batch), deterministic=deterministic, rng=rng)
    if self.ablate_users:
      kw = {k: (jnp.zeros_like(v) if k in ("media_BxMxD", "prefix_embeds_BxPxD") else v)
            for k, v in kw.items()}
    return kw

  def forward(self, model, batch, *, deterministic: bool = True, rng=None) -> loss_lib.Forward:
    """``(tokens, input_mask, logits_positions, vocab_ids) -> logits`` for the loss."""
    kw = self.user_inputs(model, batch, deterministic=deterministic, rng=rng)
    llm = self.llm(model)
    if "trunk_BxLxD" in batch:
      if self.trunk_layer is None:
        raise ValueError(f"method {self.name!r}: a batch with trunk_BxLxD needs a frozen "
                         "trunk (cross-attention, strategy 'enc' or 'proj')")
      kw = dict(kw, trunk_BxLxD=batch["trunk_BxLxD"], trunk_layer=self.trunk_layer)

    def fwd(tokens, input_mask, logits_positions, vocab_ids):
      extra = {} if vocab_ids is None else {"logits_vocab_ids": vocab_ids}
      return llm(tokens, input_mask_BxL=input_mask, logits_positions=logits_positions,
                 **kw, **extra)
    return fwd


def history_batch(batch) -> dict:
  """The encoder inputs (``item_BxT`` ...) of a stage-2 batch."""
  return {k: batch[k] for k in tasks_lib.HISTORY_KEYS if k in batch and k != "length_B"}


def _params(module) -> nnx.State:
  return nnx.state(module, nnx.Param)


def build_method(config, name: str, *, encoder: Optional[enc_lib.UserEncoder],
                 gemma: gemma_lib.Gemma3, tokenizer, catalog: tasks_lib.Catalog) -> MethodSpec:
  """The :class:`MethodSpec` of ``name`` around the pretrained encoder and Gemma.

  ``build_model(rngs)`` copies the pretrained parameters into a freshly built model, so it
  can run under ``jax.jit``/``nnx.eval_shape`` (train/loop.py builds it there, sharded).
  """
  m = parse_method(name, config)
  gcfg = gemma.cfg
  gemma_params = _params(gemma)
  if m.kind == "userllm":
    if encoder is None:
      raise ValueError(f"method {name!r} needs the stage-1 encoder")
    ucfg = ul.UserLLMConfig.from_config(config.userllm, mode=m.mode, strategy=m.strategy)
    ecfg = encoder.cfg
    enc_params = _params(encoder)

    def build_model(rngs):
      e = enc_lib.UserEncoder(ecfg, rngs=rngs)
      nnx.update(e, enc_params)
      g = gemma_lib.Gemma3(gcfg, rngs=rngs)
      nnx.update(g, gemma_params)
      return ul.build_userllm(ucfg, encoder=e, gemma=g, rngs=rngs)

    train = ml_collections.ConfigDict(config.train.to_dict())
    if m.strategy == "full":
      # Every LLM weight trains: a bridge-sized learning rate would wreck the pretrained LLM.
      train.lr = float(config.train.get("full_lr", 0.1 * float(config.train.lr)))
    xlayers = ucfg.cross_attention_layers(gcfg.num_layers)
    frozen_llm = m.mode == "xattn" and m.strategy in ("enc", "proj")
    return MethodSpec(m, build_model, ul.trainable_filter(ucfg.strategy),
                      lambda ex: ex.prompt, int(config.max_prompt_tokens), train,
                      trunk_layer=xlayers[0] if frozen_llm and xlayers else None)

  lcfg = lora_lib.LoRAConfig(rank=int(config.tp.lora_rank), alpha=float(config.tp.lora_alpha),
                             targets=tuple(config.tp.lora_targets))
  tp_cfg = gcfg.replace(lora=lcfg, cross_attention_layers=())

  def build_tp(rngs):
    g = gemma_lib.Gemma3(tp_cfg, rngs=rngs)
    nnx.update(g, gemma_params)
    return g

  budget = int(config.tp.budget_tokens)
  train = ml_collections.ConfigDict(config.train.to_dict())
  if int(config.tp.get("steps", 0)) > 0:
    train.steps = int(config.tp.steps)
  if int(config.tp.get("batch_size", 0)) > 0:
    train.batch_size = int(config.tp.batch_size)
  if int(config.tp.get("grad_accum", 0)) > 0:
    # The same global batch in microbatches: TP's long prompts need more activation memory.
    train.grad_accum = int(config.tp.grad_accum)
  return MethodSpec(m, build_tp, lora_lib.LoRAParam,
                    lambda ex: tasks_lib.tp_prompt(ex, catalog, tokenizer, budget)[0],
                    int(config.max_prompt_tokens) + budget + 8, train)


@dataclasses.dataclass
class TrainedMethod:
  spec: MethodSpec
  model: nnx.Module
  train_info: dict
  mesh: Optional[jax.sharding.Mesh] = None    # the mesh the model is sharded on

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def kind(self) -> str:
    return self.spec.kind


def make_loss_fn(spec: MethodSpec, *, max_target_tokens: int,
                 vocab_ids: Optional[np.ndarray], distill_weight: float = 0.0,
                 deterministic: bool = False) -> Callable:
  """``loss_fn(model, batch, rng)`` for train/loop.py: the one stage-2 loss
  (``distill_weight``: of the soft targets a batch may carry, ``stage2/distill.py``;
  ``deterministic``: no dropout, for held-out evaluation)."""
  v = None if vocab_ids is None else jnp.asarray(vocab_ids, jnp.int32)

  def loss_fn(model, batch, rng):
    return loss_lib.next_token_loss(
        spec.forward(model, batch, deterministic=deterministic, rng=rng), batch,
        max_target_tokens=max_target_tokens, vocab_ids=v, distill_weight=distill_weight)
  return loss_fn


def heldout_eval_fn(config, spec: MethodSpec, examples: Sequence, tokenizer, *,
                    vocab_ids: Optional[np.ndarray],
                    answer_tries: Optional[loss_lib.AnswerTries], mesh) -> Callable:
  """``eval_fn(model, step) -> dict`` for train/loop.py: the stage-2 loss on held-out
  ``examples`` (validation users) per task, and for User-LLM the same with the user tokens
  zeroed: ``<task>_nll`` (and ``<task>_distill_ce`` where the examples carry soft targets)
  beside ``<task>_nll_users_zeroed`` (``<task>_distill_ce_users_zeroed``).  A model that
  uses the user scores lower with its users than without.  Batches of
  ``config.eval.batch_size`` (a last partial batch is dropped); token-weighted means.
  """
  target_len, budgets = examples_lib.target_budgets(config)
  place = ((lambda x: mesh_lib.host_to_global(x, mesh)) if mesh is not None else jnp.asarray)
  by_task: dict[str, list] = {}
  for e in examples:
    by_task.setdefault(e.task, []).append(e)
  batches = {}
  for task, exs in sorted(by_task.items()):
    ds = tasks_lib.stage2_dataset(
        exs, [spec.prompt_fn(e) for e in exs], tokenizer,
        max_prompt_tokens=spec.max_prompt_tokens, max_target_tokens=target_len,
        task_target_tokens=budgets, truncate_tasks=("review",),
        batch_size=min(int(config.eval.batch_size), len(exs)), seed=int(config.seed),
        num_epochs=1, batch_by_task=True,
        answer_cut=None if answer_tries is None else answer_tries.cut,
        batch_fn=None if answer_tries is None else answer_tries.add_allowed)
    batches[task] = [{k: place(v) for k, v in b.items()} for b in ds]
  variants = {"": spec}
  if spec.kind == "userllm":
    variants["_users_zeroed"] = dataclasses.replace(spec, ablate_users=True)
  fns = {suffix: nnx.jit(lambda model, batch, fn=make_loss_fn(
      s, max_target_tokens=target_len, vocab_ids=vocab_ids, distill_weight=1.0,
      deterministic=True):
      fn(model, batch, None)[1]) for suffix, s in variants.items()}

  def eval_fn(model, step):
    del step
    out = {}
    for task, task_batches in batches.items():
      for suffix, fn in fns.items():
        tokens, sums = 0.0, {}
        for batch in task_batches:
          m = fn(model, batch)
          n = float(m["num_tokens"])
          tokens += n
          for key in ("nll", "distill_ce"):
            if key in m:
              sums[key] = sums.get(key, 0.0) + float(m[key]) * n
        out.update({f"{task}_{k}{suffix}": v / max(tokens, 1.0) for k, v in sums.items()})
    return out
  return eval_fn


def train_method(config, spec: MethodSpec, workdir: str, train_examples: Sequence,
                 tokenizer, *, vocab_ids: Optional[np.ndarray],
                 answer_tries: Optional[loss_lib.AnswerTries] = None,
                 steps: Optional[int] = None,
                 mesh: Optional[jax.sharding.Mesh] = None,
                 heldout: Optional[Sequence] = None, trunk=None) -> TrainedMethod:
  """Trains (or resumes) ``spec`` in ``workdir/<name>`` for ``spec.train.steps`` (or ``steps``)
  on ``mesh`` (default: one built from ``config.mesh``); ``answer_tries``: trie-normalised
  targets (:mod:`userllm_jax.stage2.loss`); ``heldout`` examples with ``train.eval_every > 0``:
  :func:`heldout_eval_fn` every that many steps (``eval/heldout_*`` in the metrics, the
  curve in ``train_info['heldout']``); ``trunk`` (``stage2/trunk.TrunkCache``): the training
  batches carry the frozen trunk's output (``train_info['trunk']``)."""
  from userllm_jax.train import loop  # pylint: disable=g-import-not-at-top
  prompts = [spec.prompt_fn(ex) for ex in train_examples]
  train_cfg = ml_collections.ConfigDict(spec.train.to_dict())
  if steps is not None:
    train_cfg.steps = int(steps)
  if mesh is None:
    mesh = mesh_lib.make_mesh(config.get("mesh", None))
  stream = examples_lib.training_stream(config, train_examples, prompts, tokenizer,
                                        max_prompt_tokens=spec.max_prompt_tokens,
                                        batch_size=int(train_cfg.batch_size), mesh=mesh,
                                        answer_tries=answer_tries, trunk=trunk)
  target_len, _ = examples_lib.target_budgets(config)
  eval_fn = None
  if heldout and int(train_cfg.get("eval_every", 0)) > 0:
    eval_fn = heldout_eval_fn(config, spec, heldout, tokenizer, vocab_ids=vocab_ids,
                              answer_tries=answer_tries, mesh=mesh)
  t0 = time.time()
  method_dir = paths.join(workdir, spec.name)
  res = loop.run_training(config, method_dir, build_model=spec.build_model, eval_fn=eval_fn,
                          loss_fn=make_loss_fn(spec, max_target_tokens=target_len,
                                               vocab_ids=vocab_ids,
                                               distill_weight=loss_lib.distill_weight(config)),
                          train_iter=stream, trainable=spec.trainable, train_config=train_cfg,
                          mesh=mesh)
  info_path = paths.join(method_dir, "train_info.json")
  if res.step == res.start_step and paths.path(info_path).exists():
    # Finished before (a re-run after a stop during evaluation): its record, as written then.
    info = json.loads(paths.read_text(info_path))
    logging.info("%s: trained before (step %d); train info from %s", spec.name, res.step,
                 info_path)
  else:
    hist = _loss_curve(method_dir, res)
    info = {"steps": res.step, "seconds": time.time() - t0,
            "batch_size": int(train_cfg.batch_size),
            "first_loss": hist[0][1] if hist else None,
            "final_loss": hist[-1][1] if hist else None,
            "compiled_step_flops": res.compile_stats.get("cost_flops"), "loss_curve": hist,
            "heldout": _heldout_curve(res, eval_fn),
            "trunk": None if trunk is None else trunk.info()}
    if jax.process_index() == 0:
      paths.write_atomic(info_path, json.dumps(info))
  logging.info("%s trained: %s", spec.name, {k: v for k, v in info.items() if k != "loss_curve"})
  return TrainedMethod(spec, res.model, info, mesh=res.mesh)


def _heldout_curve(res, eval_fn) -> list:
  """[(step, held-out metrics)]: the loop's every ``train.eval_every`` steps, and the final
  step's (evaluated here when the loop's last evaluation came earlier)."""
  curve = [(s, m) for s, m in res.eval_history]
  if eval_fn is not None and res.step > res.start_step and (not curve or curve[-1][0] != res.step):
    curve.append((res.step, {k: float(v) for k, v in eval_fn(res.model, res.step).items()}))
  return curve


def _loss_curve(method_dir: str, res) -> list:
  """[(step, loss)] of the whole training: this run's steps, and before them the steps of
  earlier runs that a resumed run finds in ``metrics.jsonl`` (those logged: every
  ``train.log_every``; none on a process that cannot read process 0's files)."""
  from userllm_jax.train import metrics_writer  # pylint: disable=g-import-not-at-top
  earlier = []
  if res.start_step > 0:
    try:
      logged = metrics_writer.read_metrics(method_dir)
    except FileNotFoundError:
      logged = {}
    earlier = [(s, m["train/loss"]) for s, m in sorted(logged.items())
               if s < res.start_step and "train/loss" in m]
  return earlier + [(s, m.get("loss")) for s, m in res.history]


def lowered_flops(lowered) -> float:
  """FLOPs from XLA's cost analysis of a lowered computation; backends without an HLO-level
  analysis (GPU) give none, and then the compiled computation's is used."""
  for get in (lambda: lowered.cost_analysis(), lambda: lowered.compile().cost_analysis()):
    cost = get()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    if cost and cost.get("flops", 0) > 0:
      return float(cost["flops"])
  return float("nan")


def train_step_flops(spec: MethodSpec, batch: dict, *, max_target_tokens: int,
                     vocab_ids: Optional[np.ndarray]) -> float:
  """FLOPs of one training step (loss + gradient of the trained params) on ``batch`` (arrays
  or ``jax.ShapeDtypeStruct``s).

  From XLA's cost analysis of the *lowered* step on abstract shapes (nothing is
  materialised or compiled), the same way for every method, so two methods' figures
  compare; the optimizer update is left out (it is negligible beside the model).
  """
  abstract = nnx.eval_shape(lambda: spec.build_model(nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, spec.trainable, ...)
  loss_fn = make_loss_fn(spec, max_target_tokens=max_target_tokens, vocab_ids=vocab_ids)

  def step(params, rest, batch):
    def f(p):
      return loss_fn(nnx.merge(graphdef, p, rest), batch, jax.random.key(0))[0]
    return jax.grad(f)(params)

  abs_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), batch)
  flops = lowered_flops(jax.jit(step).lower(params, rest, abs_batch))
  if not np.isfinite(flops) or flops <= 0:
    raise RuntimeError(f"train_step_flops({spec.name}): XLA gave no FLOP count (got {flops})")
  return flops
