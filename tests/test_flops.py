"""FLOP counting: XLA cost analysis vs hand counts; the User-LLM vs TP command on tiny configs."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from userllm_jax import flops as flops_cli
from userllm_jax.eval import flops as flops_lib
from userllm_jax.models import gemma as gemma_lib
from userllm_jax.models.encoder import EncoderConfig
from userllm_jax.models.userllm import UserLLMConfig


class _FakeCompiled:

  def __init__(self, ca):
    self._ca = ca

  def cost_analysis(self):
    return self._ca


def test_cost_analysis_accepts_dict_and_list_and_rejects_missing():
  assert flops_lib.cost_analysis_flops(_FakeCompiled({"flops": 10.0})) == 10.0
  assert flops_lib.cost_analysis_flops(_FakeCompiled([{"flops": 3.0}, {"flops": 4.0}])) == 7.0
  with pytest.raises(RuntimeError, match="no 'flops'"):
    flops_lib.cost_analysis_flops(_FakeCompiled([{"bytes accessed": 1.0}]))
  with pytest.raises(RuntimeError, match="None"):
    flops_lib.cost_analysis_flops(_FakeCompiled(None))


def test_matmul_flops_are_2mkn():
  a = jax.ShapeDtypeStruct((8, 16), jnp.float32)
  b = jax.ShapeDtypeStruct((16, 4), jnp.float32)
  assert flops_lib.compiled_flops(jnp.dot, a, b) == 2 * 8 * 16 * 4


GEMMA = gemma_lib.tiny(vocab_size=1000, embed_dim=128, num_heads=4, num_kv_heads=2,
                       head_dim=32, mlp_dim=512, num_layers=2)


def _gemma_matmul_flops(cfg, L):
  """Hand count: projections, full L x L attention (XLA computes all scores), MLP, 1 logit row."""
  D, H, K, Dh, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = (2 * L * D * H * Dh * 2          # q and o
               + 2 * L * D * K * Dh * 2        # k and v
               + 2 * 2 * L * L * H * Dh        # scores and weighted sum
               + 3 * 2 * L * D * F)            # gate, up, down
  return cfg.num_layers * per_layer + 2 * D * cfg.vocab_size


@pytest.mark.parametrize("L", [16, 64])
def test_tp_forward_flops_match_hand_count(L):
  got = flops_lib.tp_forward_flops(GEMMA, L)
  want = _gemma_matmul_flops(GEMMA, L)
  # XLA also counts norms, RoPE, softmax, GeLU: a few percent on top of the matmuls.
  assert want <= got <= 1.15 * want, (got, want)


def test_logits_only_at_the_last_position():
  # One more token adds one position's body, never another 2*D*V logit row.
  cfg = GEMMA.replace(vocab_size=20_000)       # a logit row (5.1 MFLOP) > a token's body
  f1 = flops_lib.tp_forward_flops(cfg, 32)
  f2 = flops_lib.tp_forward_flops(cfg, 33)
  body = _gemma_matmul_flops(cfg, 33) - _gemma_matmul_flops(cfg, 32)
  assert body <= f2 - f1 < 2 * cfg.embed_dim * cfg.vocab_size


ENC = EncoderConfig(num_items=50, embed_dim=32, num_layers=1, num_heads=2, max_len=8,
                    dropout=0.0)
UCFG = UserLLMConfig(num_latents=4, perceiver_layers=1, perceiver_heads=2, perceiver_head_dim=16,
                     xattn_every=1)


def test_userllm_flops_grow_with_history_and_exceed_the_bare_prompt():
  prompt = 10
  bare = flops_lib.tp_forward_flops(GEMMA, prompt)
  f8 = flops_lib.userllm_forward_flops(UCFG, ENC, GEMMA, 8, prompt)
  f64 = flops_lib.userllm_forward_flops(UCFG, ENC, GEMMA, 64, prompt)   # max_len raised
  soft = flops_lib.userllm_forward_flops(UCFG.replace(mode="soft_prompt"), ENC, GEMMA, 8, prompt)
  assert bare < f8 < f64
  assert bare < soft
  parts = flops_lib.component_flops(UCFG, ENC, GEMMA, 8, prompt)
  assert parts["encoder"] > 0 and parts["perceiver_projector"] > 0 and parts["llm_body"] > 0
  assert abs(sum(parts.values()) - f8) / f8 < 0.05


def _tiny_experiment():
  c = ml_collections.ConfigDict()
  c.llm = ml_collections.ConfigDict(dict(name="tiny", dtype="float32"))
  c.data = ml_collections.ConfigDict(dict(domain="movielens"))
  c.encoder = ml_collections.ConfigDict()
  c.encoder.model = ml_collections.ConfigDict(dict(
      features=("item", "genre", "rating"), embed_dim=16, num_layers=1, num_heads=2,
      max_len=8))
  c.userllm = ml_collections.ConfigDict(dict(num_latents=4, perceiver_layers=1,
                                             perceiver_heads=2, perceiver_head_dim=8))
  return c


def test_command_run_with_fallback_token_counts(tmp_path):
  result = flops_cli.run(_tiny_experiment(), [5, 20], use_tokenizer=False, breakdown=False)
  rows = result["rows"]
  assert [r["history_length"] for r in rows] == [5, 20]
  for r in rows:
    n = r["history_length"]
    assert r["userllm_prompt_tokens"] == flops_cli.FALLBACK_USERLLM_PROMPT_TOKENS
    assert r["tp_prompt_tokens"] == round(flops_cli.FALLBACK_TP_OVERHEAD_TOKENS +
                                          flops_cli.FALLBACK_USERLLM_PROMPT_TOKENS +
                                          flops_cli.FALLBACK_TOKENS_PER_ITEM * n)
    assert "fallback" in r["tp_tokens_source"]
    for mode in ("xattn", "soft_prompt"):
      assert r[f"ratio_tp_over_{mode}"] == pytest.approx(r["tp_flops"] / r[f"userllm_{mode}_flops"])
  assert rows[1]["ratio_tp_over_xattn"] > rows[0]["ratio_tp_over_xattn"]
  table = flops_cli.format_table(result)
  assert "TP/xattn" in table and "fallback" in table
  json.dumps(result)   # serialisable


def test_prompt_counts_from_the_real_serializer_with_a_word_tokenizer():
  from userllm_jax.data import tasks
  items = [tasks.HistoryItem("Toy Story (1995)", ("Animation", "Comedy"), "5"),
           tasks.HistoryItem("Heat (1995)", ("Action",), "3"),
           tasks.HistoryItem("Fargo (1996)", ("Crime",), "4")]
  prompt = tasks.PROMPT_TEMPLATES["next_item"].format(noun="movie", verb="watch", genre_noun="",
                                                      title="")
  tok = tasks.WordTokenizer([tasks.TP_HEADER, prompt] + [tasks.format_history_line(i)
                                                         for i in items])
  counts = flops_cli.prompt_token_counts([2, 3, 4], "next_item", "movielens", tok,
                                         [items, items[1:]])
  text2 = tasks.TP_HEADER + "\n".join(tasks.format_history_line(i) for i in items[1:]) + \
      "\n" + prompt
  assert counts[2]["tp_prompt_tokens"] == 1 + len(tok.encode(text2))   # both users, same suffix
  assert counts[2]["tp_users"] == 2 and counts[3]["tp_users"] == 1
  assert counts[2]["userllm_prompt_tokens"] == 1 + len(tok.encode(prompt))
  assert "fallback" in counts[4]["tp_tokens_source"]                   # nobody has 4 items


def test_ms_per_example_times_a_function():
  x = jnp.ones((64, 64))
  r = flops_lib.ms_per_example(lambda a: a @ a, x, batch=2, iters=3)
  assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] and r["batch"] == 2
  with pytest.raises(ValueError, match="iters"):
    flops_lib.ms_per_example(lambda a: a, x, iters=0)
