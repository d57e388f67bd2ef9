"""User encoder: shapes, causality, packing, fusion, attention/block/loss references, training."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from userllm_jax.eval import ranking
from userllm_jax.models import encoder as enc

ALL = ("item", "genre", "rating", "timegap")


def _cfg(**kw):
  base = dict(num_items=30, num_genres=8, num_ratings=7, num_timegap_buckets=6, features=ALL,
              embed_dim=16, num_layers=2, num_heads=2, max_len=8, dropout=0.1)
  base.update(kw)
  return enc.EncoderConfig(**base)


def _batch(B=2, T=8, G=3, seed=0, num_items=30, lengths=None):
  rng = np.random.default_rng(seed)
  b = dict(item_BxT=rng.integers(2, num_items, (B, T)),
           genre_BxTxG=rng.integers(0, 8, (B, T, G)),
           rating_BxT=rng.integers(2, 7, (B, T)),
           timegap_BxT=rng.integers(1, 6, (B, T)),
           position_BxT=np.broadcast_to(np.arange(T), (B, T)).copy(),
           segment_BxT=np.ones((B, T), np.int32),
           target_item_BxT=rng.integers(2, num_items, (B, T)),
           target_genre_BxTxG=rng.integers(0, 8, (B, T, G)),
           target_rating_BxT=rng.integers(2, 7, (B, T)))
  if lengths is not None:
    for i, n in enumerate(lengths):
      for k in ("item_BxT", "genre_BxTxG", "rating_BxT", "timegap_BxT", "position_BxT",
                "segment_BxT", "target_item_BxT", "target_genre_BxTxG", "target_rating_BxT"):
        b[k][i, n:] = 0
  return {k: np.asarray(v, np.int32) for k, v in b.items()}


def _loss(model, batch, key, cfg):
  """Jitted pretrain_loss (eager dispatch is slow on a shared 2-core CPU)."""
  return nnx.jit(lambda m, b, k: enc.pretrain_loss(m, b, k, cfg))(model, batch, key)


def _forward(model, batch):
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state, batch):
    return nnx.merge(graphdef, state)(batch)
  return f(state, batch)


def test_shapes_and_pooling():
  model = enc.UserEncoder(_cfg(), rngs=nnx.Rngs(0))
  batch = _batch(lengths=[8, 5])
  h, u = _forward(model, batch)
  assert h.shape == (2, 8, 16) and u.shape == (2, 16)
  np.testing.assert_allclose(u[0], h[0, 7], rtol=1e-6)
  np.testing.assert_allclose(u[1], h[1, 4], rtol=1e-6)
  assert np.all(np.asarray(h[1, 5:]) == 0)  # padding positions are zeroed
  mean_u = enc.pool(h, jnp.asarray(batch["segment_BxT"]), "mean")
  np.testing.assert_allclose(mean_u[1], np.asarray(h[1, :5]).mean(0), rtol=1e-5, atol=1e-6)
  # Every parameter carries logical axis names matching its rank.
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata()["logical_axes"]
    assert len(axes) == var[...].ndim, (path, axes)
  assert model.item_embedding.get_metadata()["logical_axes"] == ("items", "embed")


@pytest.mark.parametrize("fusion,position", [("early", "learned"), ("late", "rotary")])
def test_causality(fusion, position):
  model = enc.UserEncoder(_cfg(fusion=fusion, position=position), rngs=nnx.Rngs(1))
  b1 = _batch(seed=3)
  b2 = {k: v.copy() for k, v in b1.items()}
  t = 5
  b2["item_BxT"][:, t] = (b2["item_BxT"][:, t] + 7) % 28 + 2
  b2["rating_BxT"][:, t:] = 2
  b2["genre_BxTxG"][:, t] = 4
  h1, _ = _forward(model, b1)
  h2, _ = _forward(model, b2)
  np.testing.assert_allclose(h1[:, :t], h2[:, :t], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(h1[:, t:] - h2[:, t:])).max() > 1e-4


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_packed_equals_unpadded(position):
  model = enc.UserEncoder(_cfg(position=position, fusion="early", combine="concat"),
                          rngs=nnx.Rngs(2))
  a = _batch(B=1, T=8, seed=4)
  c = _batch(B=1, T=8, seed=5)
  la, lc = 3, 4
  packed = {}
  for k in a:
    if k in ("segment_BxT", "position_BxT"):
      continue
    x = np.zeros_like(a[k])
    x[0, :la] = a[k][0, :la]
    x[0, la:la + lc] = c[k][0, :lc]
    packed[k] = x
  packed["segment_BxT"] = np.array([[1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
  packed["position_BxT"] = np.array([[0, 1, 2, 0, 1, 2, 3, 0]], np.int32)
  hp, up = _forward(model, packed)
  ha, _ = _forward(model, {k: v[:, :la] for k, v in a.items()})
  hc, uc = _forward(model, {k: v[:, :lc] for k, v in c.items()})
  np.testing.assert_allclose(hp[0, :la], ha[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hp[0, la:la + lc], hc[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(up[0], uc[0], rtol=1e-5, atol=1e-5)  # last segment's last item


def test_early_and_late_fusion_differ():
  b = _batch(seed=6)
  outs = {}
  for fusion in ("early", "late"):
    for combine in ("sum", "concat"):
      model = enc.UserEncoder(_cfg(fusion=fusion, combine=combine), rngs=nnx.Rngs(0))
      h, u = _forward(model, b)
      assert np.all(np.isfinite(np.asarray(h)))
      outs[fusion, combine] = np.asarray(u)
      if fusion == "late":
        assert len(model.streams) == len(ALL)
  assert np.abs(outs["early", "sum"] - outs["late", "sum"]).max() > 1e-3
  assert np.abs(outs["early", "concat"] - outs["late", "concat"]).max() > 1e-3


def _np_attention(q, k, v, seg):
  B, T, N, H = q.shape
  out = np.zeros_like(q)
  for b in range(B):
    for n in range(N):
      s = q[b, :, n] @ k[b, :, n].T / np.sqrt(H)
      mask = np.tril(np.ones((T, T), bool)) & (seg[b][:, None] == seg[b][None, :])
      s = np.where(mask, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b, :, n] = p @ v[b, :, n]
  return out


def test_attention_matches_numpy_reference():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 7, 3, 4)).astype(np.float32) for _ in range(3))
  seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
  got = jax.jit(enc.get_attention("xla"))(q, k, v, seg)
  np.testing.assert_allclose(got, _np_attention(q, k, v, seg), rtol=1e-5, atol=1e-5)


def _np_rmsnorm(x, w):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * (1 + w)


def _np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_rotary(x, pos, base=10_000.0):
  H = x.shape[-1]
  half = H // 2
  inv = 1.0 / base ** (np.arange(half) * 2.0 / H)
  ang = pos[..., None] * inv
  sin, cos = np.sin(ang)[:, :, None], np.cos(ang)[:, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def test_block_matches_numpy_reference():
  cfg = _cfg(position="rotary", dropout=0.0, embed_dim=8, num_heads=2)
  block = enc.Block(cfg, rngs=nnx.Rngs(3))
  # Non-trivial norm weights and bias.
  block.attn_norm.scale[...] = jnp.linspace(-0.5, 0.5, 8)
  block.up_bias[...] = jnp.linspace(-0.1, 0.1, 32)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 8)).astype(np.float32)
  seg = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 2, 0]], np.int32)
  pos = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 0]], np.int32)
  got = np.asarray(block(jnp.asarray(x), seg, pos, None))
  p = {n: np.asarray(getattr(block, n)[...], np.float64) for n in
       ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "up_bias", "down_proj")}
  x64 = x.astype(np.float64)
  h = _np_rmsnorm(x64, np.asarray(block.attn_norm.scale[...]))
  q = _np_rotary(np.einsum("btd,dnh->btnh", h, p["q_proj"]), pos)
  k = _np_rotary(np.einsum("btd,dnh->btnh", h, p["k_proj"]), pos)
  v = np.einsum("btd,dnh->btnh", h, p["v_proj"])
  y = x64 + np.einsum("btnh,nhd->btd", _np_attention(q, k, v, seg), p["o_proj"])
  h = _np_rmsnorm(y, np.asarray(block.mlp_norm.scale[...]))
  want = y + _np_gelu(h @ p["up_proj"] + p["up_bias"]) @ p["down_proj"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _np_log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_full_softmax_and_heads_match_numpy():
  rng = np.random.default_rng(0)
  N, D, V, C, G = 6, 5, 9, 6, 3
  h = rng.normal(size=(N, D)).astype(np.float32)
  table = rng.normal(size=(V, D)).astype(np.float32)
  target = rng.integers(2, V, N)
  mask = np.array([1, 1, 0, 1, 1, 0], bool)
  loss, acc = jax.jit(enc.full_softmax_loss)(h, target, table, mask)
  logits = (h @ table.T)[:, 2:]
  lp = _np_log_softmax(logits.astype(np.float64))
  nll = -lp[np.arange(N), target - 2]
  np.testing.assert_allclose(loss, nll[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(acc, (logits.argmax(-1) + 2 == target)[mask].mean())
  # Genre: multi-label BCE over classes >= 2, duplicate and padded labels collapse.
  head = rng.normal(size=(D, C)).astype(np.float32)
  tg = np.array([[2, 3, 0], [5, 5, 0], [0, 0, 0], [4, 2, 3], [1, 0, 0], [2, 0, 0]])
  got = enc.genre_loss(h, tg, head, mask)
  z = (h @ head).astype(np.float64)
  y = np.zeros((N, C))
  for i in range(N):
    for g in tg[i]:
      y[i, g] = 1.0
  bce = -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))
  np.testing.assert_allclose(got, bce[:, 2:].mean(-1)[mask].mean(), rtol=1e-5)
  # Rating: softmax CE over rating ids >= 2; target 0 (no rating) is masked.
  tr = np.array([2, 5, 3, 0, 4, 5])
  r_loss, _ = enc.rating_loss(h, tr, head, mask)
  lp = _np_log_softmax(z[:, 2:])
  m = mask & (tr >= 2)
  np.testing.assert_allclose(r_loss, -lp[np.arange(N), np.maximum(tr - 2, 0)][m].mean(),
                             rtol=1e-5)


def test_sampled_softmax_all_items_equals_full():
  rng = np.random.default_rng(1)
  N, D, V = 7, 4, 12
  h = rng.normal(size=(N, D)).astype(np.float32)
  table = rng.normal(size=(V, D)).astype(np.float32)
  target = rng.integers(2, V, N)
  mask = np.ones(N, bool)
  full, _ = enc.full_softmax_loss(h, target, table, mask)
  negs = np.arange(2, V)  # every item drawn exactly once (uniform proposal)
  sampled, _ = enc.sampled_softmax_loss(h, target, table, mask, jnp.asarray(negs))
  np.testing.assert_allclose(sampled, full, rtol=1e-5)
  # logQ correction: with a non-uniform q and every item sampled once, the corrected logits
  # shift by -log q; check against numpy.
  q = rng.uniform(0.5, 2.0, V)
  q[:2] = 0
  q /= q.sum()
  log_q = np.log(np.maximum(q, 1e-30)).astype(np.float32)
  got, _ = enc.sampled_softmax_loss(h, target, table, mask, jnp.asarray(negs), jnp.asarray(log_q))
  logits = (h @ table.T).astype(np.float64) - log_q - np.log(len(negs))
  lp = _np_log_softmax(logits[:, 2:])
  np.testing.assert_allclose(got, -lp[np.arange(N), target - 2].mean(), rtol=1e-5)


def test_in_batch_softmax_matches_numpy():
  rng = np.random.default_rng(2)
  N, D, V = 6, 4, 10
  h = rng.normal(size=(N, D)).astype(np.float32)
  table = rng.normal(size=(V, D)).astype(np.float32)
  target = np.array([2, 3, 3, 5, 7, 2])
  mask = np.array([1, 1, 1, 1, 0, 1], bool)
  got, _ = enc.in_batch_softmax_loss(h, target, table, mask)
  valid = np.where(mask)[0]
  counts = {t: sum(target[j] == t for j in valid) for t in set(target)}
  nll = []
  for i in valid:
    cols = [j for j in valid if j == i or target[j] != target[i]]
    z = np.array([h[i] @ table[target[j]] - np.log(counts[target[j]] / len(valid)) for j in cols])
    lp = _np_log_softmax(z)
    nll.append(-lp[cols.index(i)])
  np.testing.assert_allclose(got, np.mean(nll), rtol=1e-5)


def test_pretrain_loss_masking_and_modes():
  model = enc.UserEncoder(_cfg(dropout=0.0), rngs=nnx.Rngs(0))
  b = _batch(lengths=[8, 4])
  b["target_item_BxT"][0, 6:] = 0  # no target at the last two positions of user 0
  key = jax.random.key(0)
  loss, metrics = _loss(model, b, key, dict(item_softmax="full"))
  assert float(metrics["num_targets"]) == 6 + 4
  h, _ = _forward(model, b)
  tgt = b["target_item_BxT"].reshape(-1)
  m = tgt >= 2
  logits = np.asarray(h).reshape(16, -1) @ np.asarray(model.item_embedding[...]).T
  lp = _np_log_softmax(logits[:, 2:].astype(np.float64))
  want = -lp[np.arange(16), np.maximum(tgt - 2, 0)][m].mean()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  full_feats, mf = _loss(model, b, key, dict(genre_weight=0.5, rating_weight=0.25))
  np.testing.assert_allclose(
      full_feats, mf["item_loss"] + 0.5 * mf["genre_loss"] + 0.25 * mf["rating_loss"], rtol=1e-6)
  for mode in ("sampled", "in_batch"):
    l, mm = _loss(model, b, key, dict(item_softmax=mode, num_negatives=16))
    assert np.isfinite(float(l)) and "item_acc" in mm
  with pytest.raises(ValueError, match="item_softmax"):
    enc.pretrain_loss(model, b, key, dict(item_softmax="nce"))
  with pytest.raises(ValueError, match="unknown field"):
    enc.pretrain_loss(model, b, key, dict(item_sofmax="full"))


def test_dropout_remat_dtype_and_untied_output():
  cfg = _cfg(dropout=0.3)
  model = enc.UserEncoder(cfg, rngs=nnx.Rngs(0))
  b = _batch()
  with pytest.raises(ValueError, match="rng"):
    model(b, deterministic=False)
  h_det, _ = _forward(model, b)
  h_drop, _ = nnx.jit(lambda m, bb, k: m(bb, deterministic=False, rng=k))(
      model, b, jax.random.key(1))
  assert np.abs(np.asarray(h_det - h_drop)).max() > 1e-3
  # remat: same values and gradients.
  remat_model = enc.UserEncoder(_cfg(dropout=0.3, remat=True), rngs=nnx.Rngs(0))
  lf = lambda m: enc.pretrain_loss(m, b, jax.random.key(2), None)[0]
  g1 = jax.jit(nnx.grad(lf))(model)
  g2 = jax.jit(nnx.grad(lf))(remat_model)
  for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)
  # bf16 compute stays close to f32.
  bf = enc.UserEncoder(_cfg(dtype="bfloat16"), rngs=nnx.Rngs(0))
  h_bf, _ = _forward(bf, b)
  assert h_bf.dtype == jnp.float32
  np.testing.assert_allclose(h_bf, h_det, atol=0.1)
  untied = enc.UserEncoder(_cfg(tie_output=False), rngs=nnx.Rngs(0))
  assert untied.output_table().shape == (30, 16)
  s = nnx.jit(enc.score_items)(untied, b)
  assert s.shape == (2, 30) and np.all(np.isneginf(np.asarray(s[:, :2])))


def test_registered_attention_is_used():
  calls = []

  def my_attention(q, k, v, seg):
    calls.append(q.shape)
    return enc.get_attention("xla")(q, k, v, seg)

  enc.register_attention("test_custom", my_attention)
  model = enc.UserEncoder(_cfg(attention="test_custom", num_layers=1), rngs=nnx.Rngs(0))
  model(_batch())
  assert calls == [(2, 8, 2, 8)]
  with pytest.raises(ValueError, match="unknown attention"):
    enc.UserEncoder(_cfg(attention="nope"), rngs=nnx.Rngs(0))(_batch())


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="fusion"):
    _cfg(fusion="middle")
  with pytest.raises(ValueError, match="num_genres"):
    _cfg(num_genres=0)
  with pytest.raises(ValueError, match="features"):
    _cfg(features=("genre",))
  with pytest.raises(ValueError, match="unknown field"):
    enc.EncoderConfig.from_config(dict(num_items=10, embed_size=3))
  model = enc.UserEncoder(_cfg(), rngs=nnx.Rngs(0))
  b = _batch()
  del b["genre_BxTxG"]
  with pytest.raises(KeyError, match="genre_BxTxG"):
    model(b)
  with pytest.raises(ValueError, match="max_len"):
    model(_batch(T=9))


def _planted_sequences(num_users, length, num_items, num_clusters, rng):
  """Each user stays in one cluster; next item = previous + 1 (cyclic within the cluster)
  with probability 0.8, else a random item of the same cluster."""
  per = (num_items - 2) // num_clusters
  seqs = []
  for _ in range(num_users):
    c = rng.integers(num_clusters)
    base = 2 + c * per
    x = rng.integers(per)
    seq = []
    for _ in range(length):
      seq.append(base + x)
      x = (x + 1) % per if rng.random() < 0.8 else rng.integers(per)
    seqs.append(np.array(seq, np.int32))
  return seqs


def test_tiny_encoder_learns_planted_preferences():
  t0 = time.time()
  rng = np.random.default_rng(0)
  V, T = 202, 12
  seqs = _planted_sequences(256, T + 2, V, 10, rng)
  cfg = enc.EncoderConfig(num_items=V, features=("item",), embed_dim=32, num_layers=1,
                          num_heads=2, max_len=T, dropout=0.0)
  model = enc.UserEncoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  train_items = np.stack([s[:T + 1] for s in seqs])  # last item of each user held out

  @jax.jit
  def step(params, opt_state, batch, key):
    def f(p):
      return enc.pretrain_loss(nnx.merge(graphdef, p), batch, key, None)
    (loss, _), grads = jax.value_and_grad(f, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for s in range(120):
    idx = rng.choice(len(seqs), 64, replace=False)
    batch = {"item_BxT": train_items[idx, :-1], "target_item_BxT": train_items[idx, 1:]}
    params, opt_state, loss = step(params, opt_state, batch, jax.random.key(s))
    losses.append(float(loss))
  model = nnx.merge(graphdef, params)
  hist = np.stack([s[1:T + 1] for s in seqs])
  target = np.array([s[T + 1] for s in seqs])
  ranks = jax.jit(lambda m, b: ranking.ranks_from_scores(enc.score_items(m, b),
                                                         b["target"]))(
      model, {"item_BxT": hist, "target": target})
  m = ranking.metrics_from_ranks(np.asarray(ranks), ks=(10,))
  chance = ranking.chance_hr(10, V - 2)
  assert losses[-1] < losses[0] - 1.0
  assert m["hr@10"] > 5 * chance, (m, chance)
  assert m["hr@10"] > 0.5, m
  print(f"planted: hr@10={m['hr@10']:.3f} chance={chance:.3f} in {time.time() - t0:.1f}s")
