"""PerceiverResampler vs a naive numpy reference; masking invariance; empty histories."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from userllm_jax.models.perceiver import PerceiverConfig, PerceiverResampler

E, D = 12, 16
CFG = PerceiverConfig(input_dim=E, latent_dim=D, num_latents=5, num_layers=1, num_heads=2,
                      head_dim=8, mlp_dim=20, self_attention=True)


def _np(v):
  return np.asarray(v[...], np.float64)


def _rms(x, w, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1.0 + w)


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _attn(att, q_in, kv_in, valid):
  """Naive per-head attention over the rows `valid` of kv_in; no valid rows -> 0."""
  out = np.zeros((q_in.shape[0], _np(att.o_proj).shape[-1]))
  if len(valid) == 0:
    return out
  for h in range(_np(att.q_proj).shape[1]):
    q = q_in @ _np(att.q_proj)[:, h]
    k = kv_in[valid] @ _np(att.k_proj)[:, h]
    v = kv_in[valid] @ _np(att.v_proj)[:, h]
    s = q @ k.T / np.sqrt(q.shape[-1])
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    out += (s @ v) @ _np(att.o_proj)[h]
  return out


def _reference(model, x, mask):
  x = np.asarray(x, np.float64)
  outs = []
  for b in range(x.shape[0]):
    z = _np(model.latents).copy()
    valid = np.nonzero(mask[b])[0]
    for layer in model.layers:
      kv = _rms(x[b], _np(layer.kv_norm.scale))
      z = z + _attn(layer.cross_attn, _rms(z, _np(layer.cross_norm.scale)), kv, valid)
      if layer.self_attn is not None:
        h = _rms(z, _np(layer.self_norm.scale))
        z = z + _attn(layer.self_attn, h, h, np.arange(z.shape[0]))
      h = _rms(z, _np(layer.mlp_norm.scale))
      m = layer.mlp
      z = z + (_gelu_tanh(h @ _np(m.gate_proj)) * (h @ _np(m.up_proj))) @ _np(m.down_proj)
    outs.append(_rms(z, _np(model.final_norm.scale)))
  return np.stack(outs)


def _randomise_norms(model, seed=0):
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "scale":
      var[...] = jnp.asarray(rng.normal(size=var[...].shape) * 0.3, jnp.float32)


def _inputs(B=3, T=6, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, T, E)).astype(np.float32)
  mask = np.ones((B, T), bool)
  mask[1, 3:] = False
  mask[2, :] = False
  return x, mask


@pytest.mark.parametrize("self_attention", [True, False])
def test_one_layer_matches_numpy_reference(self_attention):
  cfg = dataclasses.replace(CFG, self_attention=self_attention)
  model = PerceiverResampler(cfg, rngs=nnx.Rngs(0))
  _randomise_norms(model)
  x, mask = _inputs()
  y = model(jnp.asarray(x), jnp.asarray(mask))
  assert y.shape == (3, cfg.num_latents, D)
  np.testing.assert_allclose(np.asarray(y), _reference(model, x, mask), rtol=1e-4, atol=1e-4)


def test_two_layers_match_reference_and_jit():
  cfg = dataclasses.replace(CFG, num_layers=2)
  model = PerceiverResampler(cfg, rngs=nnx.Rngs(4))
  _randomise_norms(model, 5)
  x, mask = _inputs(seed=7)
  y = nnx.jit(lambda m, a, b: m(a, b))(model, jnp.asarray(x), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(y), _reference(model, x, mask), rtol=1e-4, atol=1e-4)


def test_padding_content_and_length_do_not_change_output():
  model = PerceiverResampler(dataclasses.replace(CFG, num_layers=2), rngs=nnx.Rngs(1))
  x, mask = _inputs()
  y = np.asarray(model(jnp.asarray(x), jnp.asarray(mask)))
  # Garbage in the padded slots.
  x2 = x.copy()
  x2[~mask] = 1e4
  y2 = np.asarray(model(jnp.asarray(x2), jnp.asarray(mask)))
  np.testing.assert_allclose(y2, y, rtol=0, atol=1e-6)
  # Extra padding at the end (a longer batch) does not change anything either.
  x3 = np.concatenate([x, np.full((3, 4, E), -3.0, np.float32)], axis=1)
  m3 = np.concatenate([mask, np.zeros((3, 4), bool)], axis=1)
  y3 = np.asarray(model(jnp.asarray(x3), jnp.asarray(m3)))
  np.testing.assert_allclose(y3, y, rtol=0, atol=1e-5)
  # Each row only depends on its own history.
  y_single = np.asarray(model(jnp.asarray(x[:1, :]), jnp.asarray(mask[:1])))
  np.testing.assert_allclose(y_single[0], y[0], rtol=0, atol=1e-5)


def test_empty_history_is_finite_and_has_finite_gradients():
  model = PerceiverResampler(CFG, rngs=nnx.Rngs(2))
  x, _ = _inputs()
  mask = np.zeros((3, 6), bool)

  def loss(m):
    return jnp.sum(m(jnp.asarray(x), jnp.asarray(mask)) ** 2)

  val, grads = nnx.value_and_grad(loss)(model)
  assert np.isfinite(float(val))
  for _, g in nnx.to_flat_state(grads):
    assert np.isfinite(np.asarray(g[...])).all()
  # Empty history: the output is the same for every user (only the learned latents).
  y = np.asarray(model(jnp.asarray(x), jnp.asarray(mask)))
  np.testing.assert_allclose(y[0], y[1], atol=1e-6)


def test_bad_shapes_raise_clear_errors():
  model = PerceiverResampler(CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expected emb_BxTxE of shape"):
    model(jnp.zeros((2, 3, E + 1)))
  with pytest.raises(ValueError, match="mask_BxT shape"):
    model(jnp.zeros((2, 3, E)), jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="num_latents"):
    PerceiverConfig(num_latents=0).validate()


def test_params_carry_logical_axes():
  model = PerceiverResampler(CFG, rngs=nnx.Rngs(0))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert len(var.get_metadata()["logical_axes"]) == var[...].ndim, path
