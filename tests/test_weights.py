"""Weight loader tests.

* Goldens: our Gemma3 on the embedded GGUF weights against transformers' logits, greedy tokens
  (tests/golden, written by benchmarks/make_gemma_golden.py). First use builds the cache (~1 min).
* GGUF / safetensors / Orbax: tiny checkpoints written here in each format's own layout; the
  loaded flat dict must equal the source (quantised types within their quantisation error),
  and malformed files must fail with errors that name the tensor / field.
* Assignment: missing / unexpected / wrong-shape keys reported by name; sharded placement on a
  fake 4-device CPU mesh (subprocess) puts each param on its NamedSharding.
"""

import json
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from userllm_jax.models import gemma as gemma_lib
from userllm_jax.weights import assign, embedded, gguf_loader, orbax_loader, safetensors_loader

GOLDEN = pathlib.Path(__file__).parent / "golden"
REPO = pathlib.Path(__file__).resolve().parents[1]
# Achieved max |ours - transformers| on the golden logits is ~8e-5 (f32, 262k-way logits of
# magnitude ~30); 5e-4 leaves room for other CPUs / XLA versions.
LOGIT_ATOL = 5e-4


def _tiny_cfg(**kw):
  return gemma_lib.tiny(**kw)


def _flat_params(model) -> dict:
  return {assign.path_str(p): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _random_params(cfg, seed=0) -> dict:
  """Random params in our tree, norms non-zero so a wrong '1 +' would show."""
  rng = np.random.default_rng(seed)
  shapes = assign.expected_shapes(_spec_of(cfg))
  return {k: (rng.standard_normal(s) * (0.3 if k.endswith("scale") else 0.2)).astype(np.float32)
          for k, s in shapes.items()}


def _spec_of(cfg) -> dict:
  return {"vocab_size": cfg.vocab_size, "num_layers": cfg.num_layers,
          "embed_dim": cfg.embed_dim, "mlp_dim": cfg.mlp_dim, "num_heads": cfg.num_heads,
          "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}


# ----------------------------------------------------------------------------------------------
# Goldens on the embedded 270M


@pytest.fixture(scope="module")
def gemma270m():
  from userllm_jax import weights
  return weights.load_gemma("gemma3-270m")


def test_embedded_cache_is_complete_and_fast():
  embedded.load_cached()  # builds on first use
  target = embedded.cache_path()
  manifest = json.loads((target / "manifest.json").read_text())
  assert manifest["format_version"] == embedded.FORMAT_VERSION
  assert len(manifest["params"]) == 2 + 18 * 13
  assert manifest["spec"]["num_layers"] == 18 and manifest["spec"]["vocab_size"] == 262_144
  assert not list(target.parent.glob(f".{target.name}.tmp-*")), "temporary build dirs left"
  t0 = time.time()
  params, spec, proto = embedded.load_cached()
  assert time.time() - t0 < 15.0
  assert isinstance(params["embedder.input_embedding"], np.memmap)
  assert params["layers.0.attn.q_proj.kernel"].shape == (640, 4, 256)
  # Norms were stored as 1 + w by llama.cpp; we store w (mean applied scale stays positive).
  assert float(np.mean(params["final_norm.scale"] + 1.0)) > 0
  import hashlib
  assert hashlib.sha256(proto).hexdigest() == manifest["files"]["tokenizer.model"]["sha256"]


def test_cache_build_is_atomic_and_detects_corruption(tmp_path):
  """build_cache on a tiny GGUF: complete directory, no temp dirs left, and a truncated array,
  a wrong source hash or a changed file are each detected."""
  cfg = _tiny_cfg()
  params = _random_params(cfg, seed=11)
  _write_gguf(tmp_path / "m.gguf", cfg, params)
  target = embedded.build_cache(tmp_path / "cache" / "m", gguf_path=str(tmp_path / "m.gguf"),
                                verbose=False)
  assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m"]
  manifest = json.loads((target / "manifest.json").read_text())
  sha = manifest["source_sha256"]
  embedded._check_cache(target, verify=True, expected_sha256=sha)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.load(target / "params/layers.2.mlp.up_proj.kernel.npy"),
                             params["layers.2.mlp.up_proj.kernel"], atol=1e-6)
  with pytest.raises(ValueError, match="built from GGUF"):
    embedded._check_cache(target, verify=False, expected_sha256="0" * 64)  # pylint: disable=protected-access
  f = target / "params/final_norm.scale.npy"
  data = bytearray(f.read_bytes())
  data[-1] ^= 0xFF  # same size, different content: only the hash sees it
  f.write_bytes(bytes(data))
  embedded._check_cache(target, verify=False, expected_sha256=sha)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="final_norm.scale.npy: sha256"):
    embedded._check_cache(target, verify=True, expected_sha256=sha)  # pylint: disable=protected-access
  f.write_bytes(bytes(data[:-4]))
  with pytest.raises(ValueError, match="final_norm.scale.npy: size"):
    embedded._check_cache(target, verify=False, expected_sha256=sha)  # pylint: disable=protected-access


def test_golden_logits(gemma270m):
  model, _ = gemma270m
  z = np.load(GOLDEN / "gemma3_270m.npz")
  prompts = [z[f"prompt_{i}"] for i in range(3)]
  L = max(len(p) for p in prompts)
  tokens = np.zeros((3, L), np.int32)
  mask = np.zeros((3, L), bool)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
    mask[i, :len(p)] = True
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, tokens, mask):
    m = nnx.merge(graphdef, state)
    logits = m(tokens, input_mask_BxL=mask)
    return logits, jax.nn.logsumexp(logits, axis=-1)

  logits, lse = fwd(state, tokens, mask)
  logits, lse = np.asarray(logits), np.asarray(lse)
  worst = 0.0
  for i, p in enumerate(prompts):
    n = len(p)
    got = np.take_along_axis(logits[i, :n], z[f"top_ids_{i}"], axis=-1)
    np.testing.assert_allclose(got, z[f"top_vals_{i}"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(lse[i, :n], z[f"lse_{i}"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_array_equal(logits[i, :n].argmax(-1), z[f"top_ids_{i}"][:, 0])
    worst = max(worst, float(np.abs(got - z[f"top_vals_{i}"]).max()))
  print(f"max |logit - transformers| = {worst:.2e}")


def test_golden_greedy(gemma270m):
  model, tok = gemma270m
  z = np.load(GOLDEN / "gemma3_270m.npz")
  from userllm_jax.models import sampler as sampler_lib
  prompts = [z[f"gen_prompt_{i}"].tolist() for i in range(3)]
  out = sampler_lib.Sampler(model, eos_id=tok.eos_id, pad_id=tok.pad_id).generate(
      prompts, max_new_tokens=16)
  for i in range(3):
    np.testing.assert_array_equal(out.tokens_BxN[i], z[f"gen_{i}"], err_msg=f"prompt {i}")


# ----------------------------------------------------------------------------------------------
# GGUF


def _write_gguf(path, cfg, params, *, types=None, drop=(), extra=None, arch="gemma3"):
  """A GGUF in llama.cpp's Gemma 3 layout from our params (norms written as 1 + w)."""
  import gguf
  types = types or {}
  d, h, k, dh = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_embedding_length(d)
  w.add_feed_forward_length(cfg.mlp_dim)
  w.add_head_count(h)
  w.add_head_count_kv(k)
  w.add_key_length(dh)
  w.add_value_length(dh)
  w.add_sliding_window(cfg.sliding_window)
  w.add_rope_freq_base(cfg.global_rope_base)
  w.add_context_length(128)
  w.add_layer_norm_rms_eps(1e-6)
  from tests.test_tokenizer import _TINY_SCORES, _TINY_TOKENS, _TINY_TYPES
  w.add_tokenizer_model("llama")
  w.add_token_list(_TINY_TOKENS)
  w.add_token_scores(_TINY_SCORES)
  w.add_token_types(_TINY_TYPES)
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_pad_token_id(0)
  w.add_unk_token_id(3)
  tensors = {"token_embd.weight": params["embedder.input_embedding"],
             "output_norm.weight": params["final_norm.scale"] + 1}
  for i in range(cfg.num_layers):
    p = f"layers.{i}."
    b = f"blk.{i}."
    tensors.update({
        b + "attn_q.weight": params[p + "attn.q_proj.kernel"].reshape(d, h * dh).T,
        b + "attn_k.weight": params[p + "attn.k_proj.kernel"].reshape(d, k * dh).T,
        b + "attn_v.weight": params[p + "attn.v_proj.kernel"].reshape(d, k * dh).T,
        b + "attn_output.weight": params[p + "attn.o_proj.kernel"].reshape(h * dh, d).T,
        b + "attn_q_norm.weight": params[p + "attn.q_norm.scale"] + 1,
        b + "attn_k_norm.weight": params[p + "attn.k_norm.scale"] + 1,
        b + "attn_norm.weight": params[p + "pre_attention_norm.scale"] + 1,
        b + "post_attention_norm.weight": params[p + "post_attention_norm.scale"] + 1,
        b + "ffn_norm.weight": params[p + "pre_ffw_norm.scale"] + 1,
        b + "post_ffw_norm.weight": params[p + "post_ffw_norm.scale"] + 1,
        b + "ffn_gate.weight": params[p + "mlp.gate_proj.kernel"].T,
        b + "ffn_up.weight": params[p + "mlp.up_proj.kernel"].T,
        b + "ffn_down.weight": params[p + "mlp.down_proj.kernel"].T,
    })
  tensors.update(extra or {})
  for name, arr in tensors.items():
    if name in drop:
      continue
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    qtype = types.get(name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0])
    if qtype is None or qtype == "F32":
      w.add_tensor(name, arr)
    elif qtype == "F16":
      w.add_tensor(name, arr.astype(np.float16))
    else:
      q = getattr(gguf.GGMLQuantizationType, qtype)
      w.add_tensor(name, gguf.quants.quantize(arr, q), raw_dtype=q)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_roundtrip_f32_exact_with_spec_and_tokenizer(tmp_path):
  cfg = _tiny_cfg()
  params = _random_params(cfg)
  _write_gguf(tmp_path / "m.gguf", cfg, params)
  got, spec, proto = gguf_loader.load_gguf(tmp_path / "m.gguf")
  assert set(got) == set(params)
  for k in params:
    np.testing.assert_allclose(got[k], params[k], atol=1e-6, err_msg=k)
  assert spec["num_layers"] == 6 and spec["num_kv_heads"] == 2 and spec["head_dim"] == 8
  assert spec["sliding_window"] == 4 and spec["rope_base_global"] == 1e6
  assert spec["norm_eps"] == 1e-6
  assign.check_against_preset(spec, cfg, source="m.gguf")
  from userllm_jax.weights.tokenizer import Tokenizer
  assert Tokenizer(proto).encode("<start_of_turn>ab", add_bos=True) == [2, 4, 12]


def test_gguf_quantised_types(tmp_path):
  cfg = _tiny_cfg()
  params = _random_params(cfg, seed=1)
  types = {"attn_q": "Q8_0", "attn_k": "F16", "attn_v": "BF16", "ffn_gate": "Q5_0",
           "ffn_down": "Q8_0", "token_embd": "F16"}
  _write_gguf(tmp_path / "q.gguf", cfg, params, types=types)
  got, _, _ = gguf_loader.load_gguf(tmp_path / "q.gguf")
  tol = {"q_proj": 0.01, "k_proj": 1e-3, "v_proj": 5e-3, "gate_proj": 0.05,
         "down_proj": 0.01, "input_embedding": 1e-3}
  for k in params:
    t = next((v for key, v in tol.items() if key in k), 1e-6)
    np.testing.assert_allclose(got[k], params[k], atol=t, err_msg=k)
  assert got["layers.0.attn.q_proj.kernel"].dtype == np.float32


def test_gguf_refuses_unsupported_type_by_name(tmp_path):
  cfg = _tiny_cfg()
  _write_gguf(tmp_path / "bad.gguf", cfg, _random_params(cfg), types={"ffn_up": "Q4_0"})
  with pytest.raises(gguf_loader.GGUFError, match=r"blk\.0\.ffn_up\.weight.*Q4_0"):
    gguf_loader.load_gguf(tmp_path / "bad.gguf")


def test_gguf_missing_and_unexpected_tensors(tmp_path):
  cfg = _tiny_cfg()
  params = _random_params(cfg)
  _write_gguf(tmp_path / "miss.gguf", cfg, params, drop=("blk.3.ffn_up.weight",))
  with pytest.raises(assign.WeightsError, match=r"missing \(1\): layers\.3\.mlp\.up_proj"):
    gguf_loader.load_gguf(tmp_path / "miss.gguf")
  _write_gguf(tmp_path / "extra.gguf", cfg, params,
              extra={"blk.0.attn_qkv.weight": np.zeros((32, 32), np.float32)})
  with pytest.raises(gguf_loader.GGUFError, match="blk.0.attn_qkv.weight"):
    gguf_loader.load_gguf(tmp_path / "extra.gguf")
  _write_gguf(tmp_path / "llama.gguf", cfg, params, arch="llama")
  with pytest.raises(gguf_loader.GGUFError, match="general.architecture is 'llama'"):
    gguf_loader.load_gguf(tmp_path / "llama.gguf")
  with pytest.raises(FileNotFoundError):
    gguf_loader.load_gguf(tmp_path / "nope.gguf")


def test_load_gemma_from_gguf_runs_model(tmp_path):
  from userllm_jax import weights
  cfg = _tiny_cfg()
  params = _random_params(cfg, seed=3)
  _write_gguf(tmp_path / "m.gguf", cfg, params)
  model, tok = weights.load_gemma(tmp_path / "m.gguf")
  ref = assign.build_model(cfg, params)
  x = jnp.asarray([tok.encode("abcab ab", add_bos=True)])
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(ref(x)), atol=1e-5)
  assert model.cfg.sliding_window == 4 and model.cfg.global_every == 6


# ----------------------------------------------------------------------------------------------
# safetensors (torch-free: the HF layout written with numpy)


def _to_hf(params, cfg, prefix="model."):
  d, h, k, dh = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out = {prefix + "embed_tokens.weight": params["embedder.input_embedding"],
         prefix + "norm.weight": params["final_norm.scale"]}
  for i in range(cfg.num_layers):
    p, b = f"layers.{i}.", f"{prefix}layers.{i}."
    out.update({
        b + "self_attn.q_proj.weight": params[p + "attn.q_proj.kernel"].reshape(d, h * dh).T,
        b + "self_attn.k_proj.weight": params[p + "attn.k_proj.kernel"].reshape(d, k * dh).T,
        b + "self_attn.v_proj.weight": params[p + "attn.v_proj.kernel"].reshape(d, k * dh).T,
        b + "self_attn.o_proj.weight": params[p + "attn.o_proj.kernel"].reshape(h * dh, d).T,
        b + "self_attn.q_norm.weight": params[p + "attn.q_norm.scale"],
        b + "self_attn.k_norm.weight": params[p + "attn.k_norm.scale"],
        b + "input_layernorm.weight": params[p + "pre_attention_norm.scale"],
        b + "post_attention_layernorm.weight": params[p + "post_attention_norm.scale"],
        b + "pre_feedforward_layernorm.weight": params[p + "pre_ffw_norm.scale"],
        b + "post_feedforward_layernorm.weight": params[p + "post_ffw_norm.scale"],
        b + "mlp.gate_proj.weight": params[p + "mlp.gate_proj.kernel"].T,
        b + "mlp.up_proj.weight": params[p + "mlp.up_proj.kernel"].T,
        b + "mlp.down_proj.weight": params[p + "mlp.down_proj.kernel"].T,
    })
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _hf_config(cfg, **kw):
  c = {"model_type": "gemma3_text", "vocab_size": cfg.vocab_size,
       "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
       "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
       "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
       "sliding_window": cfg.sliding_window, "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
       "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
       "hidden_activation": "gelu_pytorch_tanh", "sliding_window_pattern": 6}
  c.update(kw)
  return c


def _write_hf(directory, cfg, params, *, shards=1, bf16=False, prefix="model.", extra=None,
              config=None):
  from safetensors.numpy import save_file
  import ml_dtypes
  directory.mkdir(parents=True, exist_ok=True)
  hf = _to_hf(params, cfg, prefix)
  hf.update(extra or {})
  if bf16:
    hf = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf.items()}
  names = sorted(hf)
  (directory / "config.json").write_text(json.dumps(config or _hf_config(cfg)))
  if shards == 1:
    save_file(hf, str(directory / "model.safetensors"))
    return
  weight_map = {}
  for s in range(shards):
    fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: hf[n] for n in names[s::shards]}
    save_file(part, str(directory / fname))
    weight_map.update({n: fname for n in part})
  (directory / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_safetensors_single_and_sharded(tmp_path):
  cfg = _tiny_cfg()
  params = _random_params(cfg, seed=4)
  _write_hf(tmp_path / "single", cfg, params)
  got, spec, skipped = safetensors_loader.load_safetensors(tmp_path / "single")
  assert skipped == [] and set(got) == set(params)
  for k in params:
    np.testing.assert_array_equal(got[k], params[k], err_msg=k)
  assert spec["sliding_window"] == 4 and spec["query_pre_attn_scalar"] == 8.0
  _write_hf(tmp_path / "sharded", cfg, params, shards=3, bf16=True,
            prefix="model.language_model.",
            extra={"model.vision_tower.patch.weight": np.zeros((2, 2), np.float32)})
  got, _, skipped = safetensors_loader.load_safetensors(tmp_path / "sharded")
  assert skipped == ["model.vision_tower.patch.weight"]
  assert got["layers.1.attn.q_proj.kernel"].dtype == jnp.bfloat16
  for k in params:
    np.testing.assert_allclose(np.asarray(got[k], np.float32), params[k], rtol=1e-2, atol=1e-3)
  # bf16 on disk -> f32 model params (cast at assignment).
  model = assign.build_model(cfg, got)
  assert model.layers[0].attn.q_proj.kernel[...].dtype == jnp.float32


def test_safetensors_errors_name_the_problem(tmp_path):
  cfg = _tiny_cfg()
  params = _random_params(cfg, seed=5)
  bad = dict(params)
  bad["layers.2.attn.k_proj.kernel"] = np.zeros((32, 1, 8), np.float32)
  with pytest.raises(ValueError):
    _write_hf(tmp_path / "x", cfg, bad)  # reshape in the writer already fails: fine
  _write_hf(tmp_path / "lm", cfg, params,
            extra={"lm_head.weight": np.ones((cfg.vocab_size, cfg.embed_dim), np.float32)})
  with pytest.raises(safetensors_loader.SafetensorsError, match="lm_head.weight.*differs"):
    safetensors_loader.load_safetensors(tmp_path / "lm")
  _write_hf(tmp_path / "cfg", cfg, params, config=_hf_config(cfg, num_key_value_heads=1))
  with pytest.raises(safetensors_loader.SafetensorsError, match="k_proj.weight.*shape"):
    safetensors_loader.load_safetensors(tmp_path / "cfg")
  _write_hf(tmp_path / "soft", cfg, params, config=_hf_config(cfg, final_logit_softcapping=30.0))
  got, spec, _ = safetensors_loader.load_safetensors(tmp_path / "soft")
  with pytest.raises(assign.WeightsError, match="final_logit_softcap"):
    assign.make_config(spec)
  (tmp_path / "trunc").mkdir()
  (tmp_path / "trunc" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
  with pytest.raises(safetensors_loader.SafetensorsError, match="header length"):
    safetensors_loader.read_safetensors(tmp_path / "trunc" / "model.safetensors")


def test_load_gemma_safetensors_dir_with_tokenizer(tmp_path):
  from userllm_jax import weights
  from tests.test_tokenizer import _tiny
  cfg = _tiny_cfg(vocab_size=272)
  params = _random_params(cfg, seed=6)
  _write_hf(tmp_path / "hf", cfg, params)
  _tiny().save(tmp_path / "hf" / "tokenizer.model")
  model, tok = weights.load_gemma(tmp_path / "hf", dtype=jnp.bfloat16)
  assert model.cfg.dtype == "bfloat16" and model.cfg.param_dtype == "bfloat16"
  assert model.embedder.input_embedding[...].dtype == jnp.bfloat16
  assert tok.encode("ab") == [12]
  model32, _ = weights.load_gemma(tmp_path / "hf", cross_attention_layers=(1,))
  assert "1" in model32.xattn  # fresh cross-attention block next to the pretrained weights
  x = jnp.asarray([[2, 12, 15]])
  ref = assign.build_model(cfg, params)
  # tanh gates start at 0, so the fresh block is the identity.
  np.testing.assert_allclose(np.asarray(model32(x, media_BxMxD=jnp.ones((1, 2, 32)))),
                             np.asarray(ref(x)), atol=1e-5)
  with pytest.raises(FileNotFoundError, match="neither"):
    weights.load_gemma(tmp_path / "does-not-exist")


# ----------------------------------------------------------------------------------------------
# Orbax (gemma library layout)


def test_orbax_gemma_layout_against_upstream_einsums(tmp_path):
  """Loads a checkpoint in the gemma library's tree and checks our projections against the
  library's own einsum equations applied to the raw checkpoint arrays."""
  cfg = _tiny_cfg()
  params = _random_params(cfg, seed=7)
  orbax_loader.save_gemma_tree(tmp_path / "ckpt", params)
  raw = orbax_loader.restore_tree(tmp_path / "ckpt")
  assert raw["transformer/layer_0/attn/q_einsum/w"].shape == (4, 32, 8)      # [H, D, Dh]
  assert raw["transformer/layer_0/attn/kv_einsum/w"].shape == (2, 2, 32, 8)  # [2, K, D, Dh]
  assert raw["transformer/layer_0/mlp/gating_einsum"].shape == (2, 64, 32)   # [2, F, D]
  got, spec, _ = orbax_loader.load_orbax(tmp_path / "ckpt", config=cfg)
  model = assign.build_model(assign.make_config(spec), got)
  x = np.random.default_rng(0).standard_normal((1, 3, 32)).astype(np.float32)
  lay = "transformer/layer_2/"
  attn = model.layers[2].attn
  np.testing.assert_allclose(
      np.asarray(attn.q_proj(jnp.asarray(x))),
      np.einsum("BTD,NDH->BTNH", x, raw[lay + "attn/q_einsum/w"]), atol=1e-5)
  k_ref, v_ref = np.einsum("BSD,CKDH->CBSKH", x, raw[lay + "attn/kv_einsum/w"])
  np.testing.assert_allclose(np.asarray(attn.k_proj(jnp.asarray(x))), k_ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(attn.v_proj(jnp.asarray(x))), v_ref, atol=1e-5)
  enc = np.random.default_rng(1).standard_normal((1, 3, 4, 8)).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(attn.o_proj(jnp.asarray(enc))),
      np.einsum("BTNH,NHD->BTD", enc, raw[lay + "attn/attn_vec_einsum/w"]), atol=1e-5)
  gate = np.einsum("...F,NHF->...NH", x, raw[lay + "mlp/gating_einsum"])
  mlp = model.layers[2].mlp
  np.testing.assert_allclose(np.asarray(mlp.gate_proj(jnp.asarray(x))), gate[..., 0, :],
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(mlp.up_proj(jnp.asarray(x))), gate[..., 1, :],
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(model.final_norm.scale[...]),
                                raw["transformer/final_norm/scale"])


def test_orbax_qkv_einsum_and_errors(tmp_path):
  cfg = _tiny_cfg(num_kv_heads=4)  # K == H: the gemma library stores qkv_einsum [3,H,D,Dh]
  params = _random_params(cfg, seed=8)
  orbax_loader.save_gemma_tree(tmp_path / "mha", params, transpose_gating=False)
  raw = orbax_loader.restore_tree(tmp_path / "mha")
  assert raw["transformer/layer_0/attn/qkv_einsum/w"].shape == (3, 4, 32, 8)
  assert raw["transformer/layer_0/mlp/gating_einsum"].shape == (2, 32, 64)
  got, _, _ = orbax_loader.load_orbax(tmp_path / "mha", config=cfg)
  for k in params:
    np.testing.assert_array_equal(got[k], params[k], err_msg=k)
  with pytest.raises(orbax_loader.OrbaxError, match="match no Gemma 3 preset"):
    orbax_loader.load_orbax(tmp_path / "mha")
  with pytest.raises(orbax_loader.OrbaxError, match="disagrees"):
    orbax_loader.load_orbax(tmp_path / "mha", config=_tiny_cfg(num_kv_heads=2))


# ----------------------------------------------------------------------------------------------
# Assignment


def test_assign_reports_keys_and_shapes_by_name():
  cfg = _tiny_cfg()
  params = _random_params(cfg)
  bad = dict(params)
  del bad["layers.4.attn.k_norm.scale"]
  bad["layers.0.attn.bias"] = np.zeros(3, np.float32)
  bad["layers.1.mlp.up_proj.kernel"] = np.zeros((64, 32), np.float32)
  with pytest.raises(assign.WeightsError) as e:
    assign.build_model(cfg, bad, source="unit")
  msg = str(e.value)
  assert "missing (1): layers.4.attn.k_norm.scale" in msg
  assert "unexpected (1): layers.0.attn.bias" in msg
  assert "layers.1.mlp.up_proj.kernel: expected (32, 64), got (64, 32)" in msg
  nan = dict(params)
  nan["final_norm.scale"] = np.full(32, np.nan, np.float32)
  with pytest.raises(assign.WeightsError, match="final_norm.scale contains non-finite"):
    assign.build_model(cfg, nan)


def test_assign_matches_model_tree_and_values():
  cfg = _tiny_cfg()
  ref = gemma_lib.Gemma3(cfg, rngs=nnx.Rngs(3))
  flat = _flat_params(ref)
  assert set(flat) == set(assign.expected_shapes(_spec_of(cfg)))
  model = assign.build_model(cfg.replace(param_dtype="bfloat16"), flat)
  assert model.layers[3].mlp.down_proj.kernel[...].dtype == jnp.bfloat16
  model = assign.build_model(cfg, flat)
  x = jnp.asarray([[5, 6, 7, 8, 9, 10, 11]])
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(ref(x)))
  # LoRA factors are not in a pretrained checkpoint: freshly initialised (B = 0: no change).
  from userllm_jax.models.lora import LoRAConfig
  lora = assign.build_model(cfg.replace(lora=LoRAConfig(rank=2)), flat)
  assert lora.layers[0].attn.q_proj.lora_a is not None
  np.testing.assert_allclose(np.asarray(lora(x)), np.asarray(ref(x)), atol=1e-6)


_SHARD_SCRIPT = textwrap.dedent("""
    import os, sys
    # keep the flags the test run set (tests/conftest.py), add the fake devices
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
      os.environ["XLA_FLAGS"] = _flags + " --xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from flax import nnx
    from userllm_jax.models import gemma
    from userllm_jax.weights import assign
    cfg = gemma.tiny()
    ref = gemma.Gemma3(cfg, rngs=nnx.Rngs(0))
    flat = {assign.path_str(p): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(ref, nnx.Param))}
    mesh = jax.make_mesh((1, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = assign.build_model(cfg, flat, mesh=mesh)
    emb = model.embedder.input_embedding[...]
    q = model.layers[0].attn.q_proj.kernel[...]
    print("EMB", emb.sharding.spec, [s.data.shape for s in emb.addressable_shards][0])
    print("Q", q.sharding.spec)
    x = jnp.asarray([[1, 2, 3, 4, 5, 6]])
    with jax.set_mesh(mesh):
      out = np.asarray(jax.jit(lambda m, x: m(x))(model, x))
    print("DIFF", float(np.abs(out - np.asarray(ref(x))).max()))
""")


def test_sharded_placement_on_fake_mesh(tmp_path):
  script = tmp_path / "shard.py"
  script.write_text(_SHARD_SCRIPT)
  res = subprocess.run([sys.executable, str(script), str(REPO)], capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
  # vocab -> tensor, embed -> fsdp: each device holds a [64, 16] block of the [128, 32] table.
  assert "('tensor', 'fsdp')" in lines["EMB"], lines["EMB"]
  assert "(64, 16)" in lines["EMB"]
  assert "fsdp" in lines["Q"] and "tensor" in lines["Q"], lines["Q"]
  assert float(lines["DIFF"]) < 1e-4


def test_spec_checked_against_preset_and_made_into_config():
  spec = {"vocab_size": 262_144, "num_layers": 18, "embed_dim": 640, "mlp_dim": 2048,
          "num_heads": 4, "num_kv_heads": 1, "head_dim": 256, "sliding_window": 512,
          "sliding_pattern": 6, "rope_base_global": 1e6, "rope_base_local": 1e4,
          "max_seq_len": 32768, "norm_eps": 1e-6, "query_pre_attn_scalar": 256.0,
          "attn_logit_softcap": None, "final_logit_softcap": None}
  preset = gemma_lib.gemma3_270m()
  assign.check_against_preset(spec, preset, source="x.gguf")
  cfg = assign.make_config(spec, dtype="bfloat16")
  assert cfg == preset.replace(dtype="bfloat16")
  with pytest.raises(assign.WeightsError, match="sliding_window: preset 512, x.gguf 1024"):
    assign.check_against_preset({**spec, "sliding_window": 1024}, preset, source="x.gguf")
  with pytest.raises(assign.WeightsError, match="attn_logit_softcap"):
    assign.make_config({**spec, "attn_logit_softcap": 50.0})
