"""GatedCrossAttention against a naive numpy implementation written from the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from userllm_jax.models.xattn import GatedCrossAttention

D, E, H, DH, F = 16, 12, 2, 8, 24


def _block(seed=0):
  return GatedCrossAttention(D, E, H, DH, F, rngs=nnx.Rngs(seed))


def _rms(x, w, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1.0 + w)


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _reference(blk, x, media, mask):
  """Per example, per head, per query loops: softmax over the valid media only."""
  p = {k: np.asarray(v, np.float64) for k, v in {
      "norm": blk.norm.scale[...], "q": blk.q_proj[...], "k": blk.k_proj[...],
      "v": blk.v_proj[...], "o": blk.o_proj[...], "fnorm": blk.ffw_norm.scale[...],
      "g": blk.gate_proj[...], "u": blk.up_proj[...], "d": blk.down_proj[...],
      "ga": blk.attn_gate[...], "gf": blk.ffw_gate[...], "mnorm": blk.media_norm.scale[...]}.items()}
  x = np.asarray(x, np.float64)
  media = np.asarray(media, np.float64)
  B, L, _ = x.shape
  out = np.zeros_like(x)
  for b in range(B):
    s_x = np.sqrt(np.mean(x[b] * x[b], -1, keepdims=True))   # the residual stream's RMS
    m = _rms(media[b], p["mnorm"])
    h = _rms(x[b], p["norm"])
    attn = np.zeros((L, D))
    valid = np.nonzero(mask[b])[0]
    if len(valid):
      for n in range(H):
        q = h @ p["q"][:, n, :]                         # L x Dh
        k = m[valid] @ p["k"][:, n, :]                   # m x Dh
        v = m[valid] @ p["v"][:, n, :]
        s = q @ k.T / np.sqrt(DH)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        attn += (s @ v) @ p["o"][n]
    y = x[b] + np.tanh(p["ga"]) * s_x * attn
    h2 = _rms(y, p["fnorm"])
    ff = (_gelu_tanh(h2 @ p["g"]) * (h2 @ p["u"])) @ p["d"]
    out[b] = y + np.tanh(p["gf"]) * s_x * ff
  return out


def _inputs(seed=1, B=3, L=5, M=7):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  media = rng.normal(size=(B, M, E)).astype(np.float32)
  mask = np.ones((B, M), bool)
  mask[1, 4:] = False          # partially padded
  mask[2, :] = False           # empty history
  return x, media, mask


def test_zero_gates_are_exactly_identity():
  blk = _block()
  x, media, mask = _inputs()
  y = blk(jnp.asarray(x), jnp.asarray(media), jnp.asarray(mask))
  assert np.array_equal(np.asarray(y), x)


def test_matches_numpy_reference_with_open_gates():
  blk = _block()
  blk.attn_gate[...] = jnp.asarray(0.7)
  blk.ffw_gate[...] = jnp.asarray(-0.4)
  rng = np.random.default_rng(3)
  blk.norm.scale[...] = jnp.asarray(rng.normal(size=D) * 0.3, jnp.float32)
  blk.ffw_norm.scale[...] = jnp.asarray(rng.normal(size=D) * 0.3, jnp.float32)
  blk.media_norm.scale[...] = jnp.asarray(rng.normal(size=E) * 0.3, jnp.float32)
  x, media, mask = _inputs()
  x = x * 40.0    # a host LLM whose residual stream is far from unit scale
  y = blk(jnp.asarray(x), jnp.asarray(media), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(y), _reference(blk, x, media, mask), rtol=2e-5,
                             atol=2e-5 * 40)


def test_branch_writes_a_fraction_of_the_residual_stream_whatever_its_scale():
  """residual_scale: scaling the stream by c scales the update by c (the gate reads as a
  fraction of the stream); without it the update does not grow with the stream."""
  x, media, mask = _inputs()
  for residual_scale, expect in ((True, 100.0), (False, 1.0)):
    blk = GatedCrossAttention(D, E, H, DH, F, rngs=nnx.Rngs(0), residual_scale=residual_scale)
    blk.attn_gate[...] = jnp.asarray(0.5)
    # (Without the scale the MLP branch would read a stream the attention update perturbed
    # less: compare the attention branch alone there.)
    blk.ffw_gate[...] = jnp.asarray(0.5 if residual_scale else 0.0)
    d1 = np.asarray(blk(jnp.asarray(x), jnp.asarray(media), jnp.asarray(mask))) - x
    d100 = (np.asarray(blk(jnp.asarray(100 * x), jnp.asarray(media), jnp.asarray(mask)))
            - 100 * x)
    np.testing.assert_allclose(d100[0], expect * d1[0], rtol=2e-3, atol=1e-3 * expect)


def test_all_masked_media_gives_exactly_zero_attention_branch():
  blk = _block()
  blk.attn_gate[...] = jnp.asarray(1.3)      # attention branch open, MLP closed
  x, media, mask = _inputs()
  y = np.asarray(blk(jnp.asarray(x), jnp.asarray(media), jnp.asarray(mask)))
  assert np.array_equal(y[2], x[2])          # example 2 has no valid media
  assert not np.allclose(y[0], x[0])         # the others do receive attention
  # And the masked example's output is finite even with garbage media.
  media_nan = media.copy()
  media_nan[2] = 1e30
  y2 = np.asarray(blk(jnp.asarray(x), jnp.asarray(media_nan), jnp.asarray(mask)))
  assert np.isfinite(y2).all() and np.array_equal(y2[2], x[2])


def test_padding_content_does_not_change_output():
  blk = _block()
  blk.attn_gate[...] = jnp.asarray(0.9)
  blk.ffw_gate[...] = jnp.asarray(0.5)
  x, media, mask = _inputs()
  media2 = media.copy()
  media2[~mask] = np.random.default_rng(9).normal(size=(int((~mask).sum()), E)) * 50
  f = jax.jit(lambda a, b, c: blk(a, b, c))
  y1 = f(jnp.asarray(x), jnp.asarray(media), jnp.asarray(mask))
  y2 = f(jnp.asarray(x), jnp.asarray(media2), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=0, atol=1e-6)


def test_params_carry_logical_axes():
  blk = _block()
  state = nnx.state(blk, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    axes = var.get_metadata()["logical_axes"]
    assert len(axes) == var[...].ndim, (path, axes)
