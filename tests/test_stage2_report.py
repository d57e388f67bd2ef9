"""stage2/report.py: the results table and the TP / User-LLM ratios, on hand-made rows."""

import pytest

from userllm_jax.stage2 import report


def test_table_has_intervals_and_drops_baselines_of_tasks_that_did_not_run():
  methods = {"userllm_soft_prompt": {"genre_accuracy": 0.735, "genre_accuracy_ci": [0.67, 0.791],
                                     "prompt_tokens": 11.0},
             "tp_lora": {"genre_accuracy": 0.69, "prompt_tokens": 201.0}}
  baselines = {"majority genre": {"genre_accuracy": 0.49, "genre_accuracy_ci": [0.422, 0.559]},
               "popularity": {"recall@10": None}}   # next item did not run
  lines = report.format_table(methods, baselines).splitlines()
  assert lines[0].split() == ["method", "genre_accuracy", "prompt_tokens"]
  assert lines[2].split() == ["userllm_soft_prompt", "0.735", "[0.670,0.791]", "11"]
  assert lines[3].split() == ["tp_lora", "0.69", "201"]
  assert lines[4].split() == ["(majority", "genre)", "0.490", "[0.422,0.559]", "-"]
  assert len(lines) == 5, "the popularity row has no figure and must not be printed"


def test_ratios_are_tp_over_userllm_per_history_length():
  sweep = {"userllm_soft_prompt": [
               {"history_len": 5, "gflops_per_example": 4.0, "fav_genre_ttft_ms": 50.0,
                "fav_genre_ms": 60.0},
               {"history_len": 20, "gflops_per_example": 4.0, "fav_genre_ttft_ms": 50.0}],
           "tp_lora": [
               {"history_len": 5, "gflops_per_example": 28.0, "fav_genre_ttft_ms": 350.0,
                "fav_genre_ms": 390.0}]}
  rows = report.ratio_rows(sweep)
  assert len(rows) == 1, "history 20 has no TP row to compare with"
  r = rows[0]
  assert r["flops"] == pytest.approx(7.0)
  assert r["fav_genre_ttft"] == pytest.approx(7.0)
  assert r["fav_genre_e2e"] == pytest.approx(6.5)
  assert r["min_ttft_over_half_flops"] == pytest.approx(7.0 / 3.5)
  text = report.format_ratios(rows)
  assert "7.0x" in text and "6.5x" in text
