"""Review generation in the User-LLM job: ROUGE-L on Amazon-2018 files, tiny encoder and Gemma."""

import importlib.util
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from userllm_jax.data import tasks as tasks_lib
from userllm_jax.eval import text_metrics

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"

GENRES = ("Drama", "Comedy", "Horror")
WORDS = ("great", "fine", "dull", "funny", "scary", "long", "short", "sharp", "warm", "odd")


def _load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def _write_amazon_2018(d: pathlib.Path, num_users=48, num_items=24, seed=0):
  """A Movies_and_TV reviews file + meta file in the 2018 format (JSON lines)."""
  rng = np.random.default_rng(seed)
  d.mkdir()
  meta = []
  for i in range(num_items):
    meta.append({"asin": f"B{i:04d}", "title": f"{WORDS[i % 10].title()} Tale {i}",
                 "category": ["Movies & TV", GENRES[i % 3]], "main_cat": "Movies & TV"})
  rows = []
  for u in range(num_users):
    n = int(rng.integers(8, 14))
    items = rng.choice(num_items, size=n, replace=False)
    for k, i in enumerate(items.tolist()):
      rating = float(rng.integers(1, 6))
      words = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))).tolist())
      # Some reviews are longer than max_review_tokens (cut in training, whole in ROUGE-L).
      text = f"A {words} {GENRES[i % 3].lower()} film, {'loved' if rating >= 4 else 'meh'}."
      rows.append({"overall": rating, "verified": True, "reviewerID": f"U{u:03d}",
                   "asin": f"B{i:04d}", "unixReviewTime": 1_300_000_000 + 86400 * (k + u),
                   "reviewText": text, "summary": "x"})
  reviews = d / "Movies_and_TV.json"
  reviews.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  meta_path = d / "meta_Movies_and_TV.json"
  meta_path.write_text("".join(json.dumps(m) + "\n" for m in meta), encoding="utf-8")
  return reviews, meta_path


def review_config(tmp_path, methods=("userllm_xattn", "tp_lora")):
  reviews, meta = _write_amazon_2018(tmp_path / "amazon")
  c = _load("userllm_movielens_100k", "tiny")
  c.methods = methods
  c.encoder.data.name = "amazon-2018"
  c.encoder.data.source = f"{reviews},{meta}"
  c.encoder.data.dir = str(tmp_path / "prepared")
  c.encoder.data.domain = "amazon"
  c.encoder.data.settings = ml_collections.ConfigDict({"min_user_count": 5,
                                                       "min_item_count": 1})
  c.tasks.names = ("review",)
  c.tasks.window = 12
  c.tasks.history_lengths = (12,)
  c.tasks.num_test_users = 8
  c.tasks.min_history = 4
  c.tasks.stride = 3
  c.tasks.max_examples_per_user = 1
  c.tasks.max_train_users = 0
  c.encoder.data.max_len = 12
  c.encoder.model.features = ("item", "rating")
  c.encoder.loss.genre_weight = 0.0
  c.encoder.train.steps = 10
  # One layer and only the bridge training: this test checks the evaluation, not learning,
  # and compile time dominates.
  c.llm.tiny = ml_collections.ConfigDict(dict(num_layers=1, embed_dim=32, mlp_dim=64,
                                              sliding_window=64))
  c.userllm.strategy = "proj"
  c.userllm.use_perceiver = False
  c.userllm.xattn_every = 1
  c.userllm.xattn_num_heads = 2
  c.userllm.xattn_head_dim = 8
  c.userllm.xattn_mlp_dim = 32
  c.tp.budget_tokens = 64
  c.max_prompt_tokens = 24
  c.max_target_tokens = 8
  c.max_review_tokens = 12
  c.train.steps = 3
  c.train.batch_size = 8
  c.train.warmup_steps = 1
  c.train.loss_vocab = "full"
  c.eval.batch_size = 8
  return c


def test_rouge_l_hand_computed():
  # LCS("the cat sat on the mat", "the cat lay on the mat") = "the cat on the mat" = 5 of 6.
  assert text_metrics.lcs_length("the cat sat on the mat".split(),
                                 "the cat lay on the mat".split()) == 5
  r = text_metrics.rouge_l(["the cat lay on the mat"], ["the cat sat on the mat"])
  assert r == pytest.approx({"precision": 5 / 6, "recall": 5 / 6, "fmeasure": 5 / 6})
  # Generated "The cat, sat!" (3 tokens after rouge-score's lowercasing / punctuation split):
  # LCS 3, P = 3/3, R = 3/6, F = 2PR/(P+R) = 2/3.  The mean over both examples:
  r = text_metrics.rouge_l(["the cat lay on the mat", "The cat, sat!"],
                           ["the cat sat on the mat", "the cat sat on the mat"])
  assert r == pytest.approx({"precision": (5 / 6 + 1) / 2, "recall": (5 / 6 + 1 / 2) / 2,
                             "fmeasure": (5 / 6 + 2 / 3) / 2})
  assert text_metrics.rouge_l([""], ["the cat"])["fmeasure"] == 0.0


def test_review_targets_cut_without_eos_only_when_asked():
  tok = tasks_lib.WordTokenizer(["Write the user's review of X.\n a b c d e f"])
  hist = tasks_lib.history_window({"item": np.array([2, 3, 4]),
                                   "genre": np.zeros((3, 1), np.int32)}, cut=2, window=4)
  ex = tasks_lib.Example(0, "review", 2, hist, "Write the user's review of X.\n", " a b c d e f",
                         4)
  with pytest.raises(tasks_lib.ExampleTooLongError, match="max_target_tokens=4"):
    tasks_lib.tokenize_example(ex, ex.prompt, tok, max_prompt_tokens=12, max_target_tokens=8,
                               target_limit=4)
  f = tasks_lib.tokenize_example(ex, ex.prompt, tok, max_prompt_tokens=12, max_target_tokens=8,
                                 target_limit=4, truncate_target=True)
  p = int(f["prompt_len_B"])
  assert f["tokens_BxL"][p:p + 4].tolist() == tok.encode(" a b c d")  # no EOS after the cut
  assert tok.eos_id not in f["tokens_BxL"].tolist()
  assert int(f["loss_mask_BxL"].sum()) == 4
  # A target that fits keeps its EOS.
  f = tasks_lib.tokenize_example(ex, ex.prompt, tok, max_prompt_tokens=12, max_target_tokens=8,
                                 truncate_target=True)
  assert f["tokens_BxL"][p + 6] == tok.eos_id and int(f["loss_mask_BxL"].sum()) == 7


@pytest.mark.slow   # ~1 min: the default run keeps ROUGE-L hand-computed and the review configs
def test_job_scores_review_generation_with_rouge_l(tmp_path):
  from rouge_score import rouge_scorer
  from userllm_jax.jobs import userllm_job
  cfg = review_config(tmp_path)
  workdir = tmp_path / "run"
  res = userllm_job.run(cfg, str(workdir))
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk["table"] == res["table"]
  header = res["table"].splitlines()[0].split()
  assert "rougeL" in header and "review_ms" in header and "review_ttft_ms" in header
  assert not list(workdir.glob(".*.tmp")), "a temp file of an atomic write was left behind"
  n_test = on_disk["num_test_examples"]["review"]
  assert n_test > 0
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  for name in cfg.methods:
    m = on_disk["methods"][name]
    assert 0.0 <= m["rougeL"] <= 1.0, (name, m["rougeL"])
    assert m["review_ms"] >= m["review_ttft_ms"] > 0
    lo, hi = m["rougeL_ci"]
    assert lo <= m["rougeL"] <= hi
    assert "generations" not in m
    rows = [json.loads(l) for l in
            (workdir / "generations" / f"{name}_review.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["history_len"] == cfg.tasks.window]
    assert len(rows) == n_test
    assert any(r["generated"] for r in rows), rows[:3]
    scores = [scorer.score(r["target"], r["generated"])["rougeL"] for r in rows]
    assert m["rougeL"] == pytest.approx(np.mean([s.fmeasure for s in scores]), abs=1e-12)
    assert m["rougeL_precision"] == pytest.approx(np.mean([s.precision for s in scores]),
                                                  abs=1e-12)
    assert m["rougeL_recall"] == pytest.approx(np.mean([s.recall for s in scores]), abs=1e-12)
    # The kept examples are the first generations; targets are the users' whole reviews.
    for ex, r in zip(m["examples"]["review"], rows):
      assert (ex["user"], ex["target"], ex["candidates"][0]) == (r["user"], r["target"],
                                                                r["generated"])
    assert all(r["target"].startswith("A ") and r["target"].endswith(".") for r in rows)


@pytest.mark.parametrize("name", ["userllm_amazon", "userllm_google_local"])
def test_review_configs_evaluate_review(name):
  from userllm_jax.stage2 import examples as examples_lib
  c = _load(name)
  assert "review" in c.tasks.names
  assert c.encoder.data.name in ("amazon-2018", "google-local")
  assert c.encoder.data.domain in tasks_lib.DOMAINS
  assert c.train.loss_vocab == "full"
  target_len, budgets = examples_lib.target_budgets(c)
  assert budgets["review"] == c.max_review_tokens and target_len >= c.max_target_tokens
  from userllm_jax.stage2 import report
  assert "rougeL" in report.QUALITY
