"""The frozen trunk (stage2/trunk.py): the cached step computes the full forward's loss and
gradients; sequences are computed once; only frozen-LLM cross-attention methods get one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from userllm_jax.models import gemma as gemma_lib

from test_userllm_job import tiny_config


def test_gemma_resumes_from_the_trunk_it_stopped_at():
  cfg = gemma_lib.tiny(num_layers=3, cross_attention_layers=(1,), sliding_window=64)
  g = gemma_lib.Gemma3(cfg, rngs=nnx.Rngs(0))
  # The gates start at zero: open them so the cross-attention changes the output.
  nnx.update(g.xattn, jax.tree.map(lambda x: x + 0.3 if x.ndim == 0 else x,
                                   nnx.state(g.xattn, nnx.Param)))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 7)), jnp.int32)
  mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], bool)
  media = jnp.asarray(rng.normal(size=(2, 3, cfg.embed_dim)), jnp.float32)
  kw = dict(input_mask_BxL=mask, media_BxMxD=media)
  full = g(tokens, **kw)
  zero = g(tokens, input_mask_BxL=mask, media_BxMxD=jnp.zeros_like(media))
  assert float(jnp.max(jnp.abs(full - zero))) > 1e-3       # the media matter
  trunk = g(tokens, input_mask_BxL=mask, stop_after_layer=1)
  assert trunk.shape == (2, 7, cfg.embed_dim)
  resumed = g(tokens, trunk_BxLxD=trunk, trunk_layer=1, **kw)
  np.testing.assert_allclose(resumed[0], full[0], atol=2e-5)
  np.testing.assert_allclose(resumed[1, :4], full[1, :4], atol=2e-5)
  # The padding after a row does not change its trunk.
  short = g(tokens[1:, :4], stop_after_layer=1)
  np.testing.assert_allclose(short[0], trunk[1, :4], atol=2e-5)
  with pytest.raises(ValueError, match="trunk_layer"):
    g(tokens, trunk_BxLxD=trunk, **kw)
  with pytest.raises(ValueError, match="shape"):
    g(tokens, trunk_BxLxD=trunk[:, :3], trunk_layer=1, **kw)


def _setup(tmp_path, xattn_layers=(-1,)):
  from userllm_jax.data import tasks as tasks_lib
  from userllm_jax.jobs import encoder_job
  from userllm_jax.stage2 import evaluate as eval_lib
  from userllm_jax.stage2 import examples as examples_lib
  from userllm_jax.stage2 import llm as llm_lib
  from userllm_jax.stage2 import loss as loss_lib
  cfg = tiny_config()
  cfg.encoder.train.steps = 5
  cfg.userllm.xattn_layers = xattn_layers
  cfg.userllm.user_vector_token = True
  cfg.train.trunk_cache = True
  _, encoder, prepared = encoder_job.train_and_evaluate(cfg.encoder, str(tmp_path / "stage1"))
  catalog = tasks_lib.Catalog.from_dataset(prepared, domain=cfg.encoder.data.domain)
  data = examples_lib.build_task_data(cfg, prepared, catalog)
  gemma, tok = llm_lib.load_llm(cfg, catalog)
  answers = eval_lib.AnswerSets.build(catalog, tok, gemma.cfg.vocab_size)
  vocab, tries = loss_lib.loss_vocabulary(cfg, answers, eos_id=tok.eos_id)
  return cfg, encoder, catalog, data, gemma, tok, vocab, tries


def test_cached_step_has_the_full_forwards_loss_and_gradients(tmp_path):
  from userllm_jax.stage2 import examples as examples_lib
  from userllm_jax.stage2 import methods as methods_lib
  from userllm_jax.stage2 import trunk as trunk_lib
  cfg, encoder, catalog, data, gemma, tok, vocab, tries = _setup(tmp_path)
  build = lambda name: methods_lib.build_method(cfg, name, encoder=encoder, gemma=gemma,
                                                tokenizer=tok, catalog=catalog)
  spec = build("userllm_xattn_proj")
  assert spec.trunk_layer == gemma.cfg.num_layers - 1
  # Only cross-attention with a frozen LLM has a trunk; the cache only when asked for.
  for name in ("userllm_soft_prompt_proj", "userllm_xattn_lora", "userllm_xattn_full",
               "tp_lora"):
    assert trunk_lib.for_method(cfg, build(name), gemma) is None, name
  assert trunk_lib.for_method(cfg, build("userllm_xattn_enc"), gemma) is not None
  cfg.train.trunk_cache = False
  assert trunk_lib.for_method(cfg, spec, gemma) is None
  cfg.train.trunk_cache = True
  cache = trunk_lib.for_method(cfg, spec, gemma)

  model = spec.build_model(nnx.Rngs(1))
  # Open the gates so the cross-attention (and the gradient through the trunk's output) counts.
  nnx.update(model.gemma.xattn, jax.tree.map(lambda x: x + 0.5 if x.ndim == 0 else x,
                                             nnx.state(model.gemma.xattn, nnx.Param)))
  target_len, _ = examples_lib.target_budgets(cfg)
  loss_fn = methods_lib.make_loss_fn(spec, max_target_tokens=target_len, vocab_ids=vocab,
                                     deterministic=True)
  prompts = [spec.prompt_fn(e) for e in data.train]
  stream = examples_lib.training_stream(cfg, data.train, prompts, tok,
                                        max_prompt_tokens=spec.max_prompt_tokens,
                                        batch_size=8, answer_tries=tries, trunk=cache)
  graphdef, trainable, rest = nnx.split(model, spec.trainable, ...)

  def loss_and_grads(batch):
    f = lambda params: loss_fn(nnx.merge(graphdef, params, rest), batch, None)[0]
    return jax.value_and_grad(f)(trainable)

  for _ in range(4):
    batch = next(stream)
    assert batch["trunk_BxLxD"].shape == batch["tokens_BxL"].shape + (gemma.cfg.embed_dim,)
    full = {k: v for k, v in batch.items() if k != "trunk_BxLxD"}
    (l1, g1), (l0, g0) = loss_and_grads(batch), loss_and_grads(full)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
  assert any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(g1))
  # Every sequence once: a second epoch computes nothing; the computations are counted.
  computed, flops = cache.batches_computed, cache.flops
  assert computed >= 1 and flops > 0 and cache.num_sequences >= 8
  epoch = -(-len(data.train) // 8)
  for _ in range(3 * epoch):
    next(stream)
  n_seq = cache.num_sequences
  assert n_seq <= len(data.train)
  computed = cache.batches_computed
  for _ in range(2 * epoch):
    next(stream)
  assert cache.batches_computed == computed and cache.num_sequences == n_seq
