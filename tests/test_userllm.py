"""UserLLM: identity at init, masks / variable lengths, training strategies, encoder restore."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from userllm_jax.models import gemma as gemma_lib
from userllm_jax.models.encoder import EncoderConfig, UserEncoder
from userllm_jax.models.lora import LoRAParam
from userllm_jax.stage2.loss import next_token_loss
from userllm_jax.models.userllm import (UserLLM, UserLLMConfig, build_userllm, history_inputs,
                                        load_encoder_from_checkpoint,
                                        trainable_filter)

ENC = EncoderConfig(num_items=20, embed_dim=16, num_layers=1, num_heads=2, max_len=8,
                    dropout=0.0)
GEMMA = gemma_lib.tiny()
CFG = UserLLMConfig(num_latents=3, perceiver_layers=1, perceiver_heads=2, perceiver_head_dim=8,
                    xattn_every=2, projector_hidden_dim=24, lora_rank=2)


def _history(B=3, T=6, seed=0, lengths=(6, 3, 0)):
  rng = np.random.default_rng(seed)
  item = np.zeros((B, T), np.int32)
  seg = np.zeros((B, T), np.int32)
  pos = np.zeros((B, T), np.int32)
  for b, n in enumerate(lengths):
    item[b, :n] = rng.integers(2, ENC.num_items, n)
    seg[b, :n] = 1
    pos[b, :n] = np.arange(n)
  return {"item_BxT": item, "segment_BxT": seg, "position_BxT": pos}


def _tokens(B=3, L=5, seed=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, GEMMA.vocab_size, (B, L)).astype(np.int32)
  mask = np.ones((B, L), bool)
  mask[1, 3:] = False
  return tokens, mask


def _build(cfg=CFG, seed=0):
  rngs = nnx.Rngs(seed)
  encoder = UserEncoder(ENC, rngs=rngs)
  gemma = gemma_lib.Gemma3(GEMMA, rngs=rngs)
  bare = nnx.clone(gemma)
  return build_userllm(cfg, encoder=encoder, gemma=gemma, rngs=rngs), bare


def _flat(model, filt=nnx.Param):
  return {"/".join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, filt))}


# --- identity at initialisation ------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["enc", "lora"])
def test_xattn_with_zero_gates_is_the_bare_llm(strategy):
  model, bare = _build(CFG.replace(strategy=strategy))
  assert sorted(model.gemma.xattn.keys()) == ["1", "3", "5"]
  tokens, mask = _tokens()
  got = model(_history(), tokens, mask)
  want = bare(tokens, input_mask_BxL=mask)
  assert got.shape == (3, 5, GEMMA.vocab_size)
  # Two different XLA graphs: equal up to float32 rounding (fusion may reorder accumulations).
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Unpadded fast path too.
  got2 = model(_history(), tokens)
  np.testing.assert_allclose(np.asarray(got2), np.asarray(bare(tokens)), rtol=1e-5, atol=1e-5)


def test_soft_prompt_empty_history_equals_bare_llm_and_nonempty_differs():
  model, bare = _build(CFG.replace(mode="soft_prompt"))
  assert len(model.gemma.xattn) == 0
  tokens, mask = _tokens()
  got = np.asarray(model(_history(), tokens, mask))
  want = np.asarray(bare(tokens, input_mask_BxL=mask))
  np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)   # empty history
  assert not np.allclose(got[0], want[0], atol=1e-3)                  # real user tokens


# --- shapes, masks, variable lengths ---------------------------------------------------------


@pytest.mark.parametrize("use_perceiver", [True, False])
def test_embed_users_shapes_masks_and_batch_independence(use_perceiver):
  model, _ = _build(CFG.replace(use_perceiver=use_perceiver, mode="soft_prompt"))
  hist = _history()
  user, mask = model.embed_users(hist)
  N = CFG.num_latents if use_perceiver else 6
  assert user.shape == (3, N, GEMMA.embed_dim) and mask.shape == (3, N)
  mask = np.asarray(mask)
  if use_perceiver:
    assert mask[0].all() and mask[1].all() and not mask[2].any()
  else:
    np.testing.assert_array_equal(mask, np.asarray(hist["segment_BxT"]) != 0)
  assert np.isfinite(np.asarray(user)).all()
  assert not np.asarray(user)[~mask].any()                 # masked slots are zero
  # A user's tokens do not depend on the batch padding: user 1 (3 items) alone, T=3.
  alone = {k: v[1:2, :3] for k, v in hist.items()}
  user1, _ = model.embed_users(alone)
  np.testing.assert_allclose(np.asarray(user1[0, :mask[1].sum()]),
                             np.asarray(user)[1][mask[1]], rtol=1e-5, atol=1e-5)
  # And the logits of a padded batch equal each example's logits alone.
  tokens, tmask = _tokens()
  logits = np.asarray(model(hist, tokens, tmask))
  logits1 = np.asarray(model(alone, tokens[1:2, :3]))
  np.testing.assert_allclose(logits1[0], logits[1, :3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_perceiver", [True, False])
def test_user_vector_token_is_the_projected_last_output(use_perceiver):
  """user_vector_token: one more token, the projector of the encoder's output at each user's
  last valid position (masked for an empty history); the other tokens are unchanged."""
  cfg = CFG.replace(use_perceiver=use_perceiver, mode="soft_prompt")
  model, _ = _build(cfg.replace(user_vector_token=True))
  plain, _ = _build(cfg)
  hist = _history()
  user, mask = (np.asarray(x) for x in model.embed_users(hist))
  base, base_mask = (np.asarray(x) for x in plain.embed_users(hist))
  assert user.shape[1] == base.shape[1] + 1
  np.testing.assert_allclose(user[:, :-1], base, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(mask[:, :-1], base_mask)
  np.testing.assert_array_equal(mask[:, -1], [True, True, False])
  h, _ = model.encoder(hist)
  for b, n in enumerate((6, 3)):
    want = model.projector(np.asarray(h)[b:b + 1, n - 1:n])
    np.testing.assert_allclose(user[b, -1], np.asarray(want)[0, 0], rtol=1e-5, atol=1e-5)
  assert not user[2, -1].any()
  if use_perceiver:
    wide, _ = _build(cfg.replace(user_vector_token=True, perceiver_dim=24))
    with pytest.raises(ValueError, match="user_vector_token: the encoder width 16"):
      wide.embed_users(hist)


def test_history_keys_are_the_encoders():
  """One spelling from the task pipeline to the encoder: the short names are refused."""
  model, _ = _build()
  hist = _history()
  short = {k[:-len("_BxT")]: v for k, v in hist.items()}
  with pytest.raises(KeyError, match="item_BxT"):
    model.embed_users(short)
  with pytest.raises(KeyError, match="item_BxT"):
    history_inputs({"tokens": np.zeros((1, 2))})


def test_config_validation_and_from_config():
  with pytest.raises(ValueError, match="mode"):
    UserLLMConfig(mode="prefix")
  with pytest.raises(ValueError, match="strategy"):
    UserLLMConfig(strategy="all")
  with pytest.raises(ValueError, match="unknown field"):
    UserLLMConfig.from_config({"mode": "xattn", "num_latent": 4})
  assert UserLLMConfig.from_config({"num_latents": 4}).num_latents == 4
  assert CFG.cross_attention_layers(6) == (1, 3, 5)
  assert CFG.replace(mode="soft_prompt").cross_attention_layers(6) == ()


# --- training strategies -----------------------------------------------------------------------


def _groups(model):
  out = {}
  for path, value in _flat(model).items():
    if path.startswith("gemma/xattn"):
      group = "xattn"
    elif "lora_" in path:
      group = "lora"
    else:
      group = path.split("/")[0]
    out.setdefault(group, {})[path] = value
  return out


def _train(strategy, mode="xattn", steps=3):
  cfg = CFG.replace(strategy=strategy, mode=mode)
  model, _ = _build(cfg)
  before = _groups(model)
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=trainable_filter(strategy))
  hist = _history()
  tokens, mask = _tokens()
  L = tokens.shape[1]
  batch = dict(hist, tokens_BxL=tokens, targets_BxL=np.roll(tokens, -1, axis=1),
               loss_mask_BxL=mask.astype(np.int32), input_mask_BxL=mask,
               prompt_len_B=np.ones((tokens.shape[0],), np.int32))

  @nnx.jit
  def step(model, opt, batch):
    def loss_fn(m):
      fwd = lambda t, msk, lp, v: m(batch, t, msk, logits_positions=lp)
      return next_token_loss(fwd, batch, max_target_tokens=L)[0]
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable_filter(strategy)))(model)
    opt.update(model, grads)

  for _ in range(steps):
    step(model, opt, batch)
  return model, opt, before, _groups(model)


def _changed(before, after, group):
  return any(not np.array_equal(before[group][k], after[group][k]) for k in before[group])


def _unchanged(before, after, group):
  return all(np.array_equal(before[group][k], after[group][k]) for k in before[group])


def _opt_paths(opt):
  return ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(opt.opt_state))]


def test_strategy_enc_freezes_llm_and_has_no_llm_optimizer_state():
  model, opt, before, after = _train("enc")
  assert _unchanged(before, after, "gemma")               # bit-identical LLM weights
  for g in ("encoder", "perceiver", "projector", "xattn"):
    assert _changed(before, after, g), g
  paths = _opt_paths(opt)
  assert paths and not [p for p in paths if "gemma" in p and "xattn" not in p]
  assert [p for p in paths if "encoder" in p]


def test_strategy_proj_freezes_encoder_and_llm():
  model, opt, before, after = _train("proj", mode="soft_prompt")
  assert _unchanged(before, after, "gemma") and _unchanged(before, after, "encoder")
  assert _changed(before, after, "perceiver") and _changed(before, after, "projector")
  assert not [p for p in _opt_paths(opt) if "encoder" in p or "gemma" in p]


def test_strategy_lora_changes_only_lora_and_bridge():
  model, opt, before, after = _train("lora", mode="soft_prompt")
  assert _unchanged(before, after, "gemma")              # base LLM kernels, norms, embedding
  for g in ("lora", "encoder", "perceiver", "projector"):
    assert _changed(before, after, g), g
  assert nnx.state(model, LoRAParam)


def test_strategy_full_trains_the_llm():
  _, _, before, after = _train("full", mode="soft_prompt", steps=1)
  assert _changed(before, after, "gemma") and _changed(before, after, "encoder")


def test_unknown_strategy_raises():
  with pytest.raises(ValueError, match="strategy"):
    trainable_filter("frozen")


# --- loss, prefill, encoder restore ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["xattn", "soft_prompt"])
def test_prefill_with_cache_matches_no_cache(mode):
  model, _ = _build(CFG.replace(mode=mode))
  if mode == "xattn":                       # open a gate so the media matter
    model.gemma.xattn["1"].attn_gate[...] = jnp.asarray(0.5)
  hist = _history()
  tokens, mask = _tokens()
  want = model(hist, tokens, mask)
  P = CFG.num_latents if mode == "soft_prompt" else 0
  cache = model.gemma.init_cache(3, P + 5 + 2)
  got, cache = model(hist, tokens, mask, cache=cache)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  assert int(cache["index"]) == P + 5


@pytest.mark.parametrize("mode", ["xattn", "soft_prompt"])
def test_generate_first_token_is_the_argmax_of_the_forward(mode):
  model, _ = _build(CFG.replace(mode=mode))
  if mode == "xattn":
    for blk in model.gemma.xattn.values():
      blk.attn_gate[...] = jnp.asarray(0.8)
  hist = _history()
  tokens, _ = _tokens()
  out = model.generate(hist, [list(map(int, row)) for row in tokens], max_new_tokens=2)
  want = np.argmax(np.asarray(model(hist, tokens))[:, -1], axis=-1)
  np.testing.assert_array_equal(out.tokens_BxN[:, 0], want)
  beams = model.beam_search(hist, [list(map(int, row)) for row in tokens], num_beams=2,
                            max_new_tokens=2)
  assert beams is not None


def test_load_encoder_from_checkpoint_round_trip(tmp_path):
  from userllm_jax.train.checkpoint import Checkpointer
  enc = UserEncoder(ENC, rngs=nnx.Rngs(7))
  params = nnx.state(enc, nnx.Param)
  moments = jax.tree.map(lambda x: x * 0 + 1, params)
  ck = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ck.save(3, {"step": jnp.asarray(3), "params": params, "opt_state": {"mu": moments,
                                                                      "nu": moments}})
  ck.close()
  restored = load_encoder_from_checkpoint(str(tmp_path / "ckpt"), ENC)
  want = _flat(enc)
  got = _flat(restored)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  batch = _history()
  np.testing.assert_array_equal(np.asarray(restored(batch)[0]), np.asarray(enc(batch)[0]))
  with pytest.raises(ValueError, match="no sub-tree matching"):
    load_encoder_from_checkpoint(str(tmp_path / "ckpt"), ENC.__class__(
        **{**ENC.__dict__, "embed_dim": 8}))
  with pytest.raises(FileNotFoundError):
    load_encoder_from_checkpoint(str(tmp_path / "nothing"), ENC)
