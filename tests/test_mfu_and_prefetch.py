"""train/mfu.py (peak table, MFU formula), train/prefetch.py (device prefetch, exact
positions) and the loop's throughput / data-wait / MFU log line in a tiny run."""

import json
import logging as pylogging
import os
import threading
import time

import jax
import numpy as np
import pytest

from userllm_jax.train import loop
from userllm_jax.train import mfu
from userllm_jax.train import prefetch
from userllm_jax.train.metrics_writer import read_metrics

import _train_worker as tw


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
    ("cpu", None), ("TFRT_CPU_0", None), ("", None), (None, None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table(kind, peak):
  assert mfu.peak_flops(kind) == peak


def test_mfu_formula_hand_computed():
  # 2e12 FLOPs per device per step, 0.5 s per step, 1e13 FLOP/s peak -> 2e12 / 5e12 = 40%.
  assert mfu.mfu(2e12, 0.5, 1e13) == pytest.approx(0.4)
  # 6 * N * tokens: a 1B-param model, 4096 tokens/step/device, 0.1 s, H100 -> 24.85%.
  assert mfu.mfu(6 * 1e9 * 4096, 0.1, mfu.peak_flops("NVIDIA H100 80GB HBM3")) == \
      pytest.approx(6 * 1e9 * 4096 / (0.1 * 989e12))
  assert mfu.mfu(None, 0.5, 1e13) is None
  assert mfu.mfu(2e12, 0.5, None) is None
  assert mfu.device_peak_flops(jax.devices()[0]) is None   # CPU: throughput only


class _Source:
  """A checkpointable iterator of integers (state = next index)."""

  def __init__(self, n=10, fail_at=-1, delay=0.0):
    self.i, self.n, self.fail_at, self.delay = 0, n, fail_at, delay

  def __iter__(self):
    return self

  def __next__(self):
    if self.i == self.fail_at:
      raise ValueError(f"bad record {self.i}")
    if self.i >= self.n:
      raise StopIteration
    time.sleep(self.delay)
    self.i += 1
    return self.i - 1

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


@pytest.mark.parametrize("size", [0, 1, 3])
def test_prefetcher_order_position_and_end(size):
  src = _Source(n=6)
  threads = []
  feed = prefetch.DevicePrefetcher(
      src, lambda x: (threads.append(threading.current_thread().name), x * 10)[1], size)
  out = [next(feed), next(feed)]
  time.sleep(0.05)   # let the thread run ahead
  assert out == [0, 10]
  # The position is that of the consumed batches, however far the thread has read.
  assert json.loads(feed.position().get_state()) == {"i": 2}
  if size:
    assert src.i >= 2 + min(size, 4) - 1
  assert list(feed) == [20, 30, 40, 50]
  assert json.loads(feed.position().get_state()) == {"i": 6}
  with pytest.raises(StopIteration):
    next(feed)
  feed.close()
  assert (threads[0] == "device-prefetch") == (size > 0)


def test_prefetcher_first_batch_errors_and_wait_time():
  src = _Source(n=5, fail_at=3)
  first = next(src)
  feed = prefetch.DevicePrefetcher(src, lambda x: x, 2, first=first)
  assert json.loads(feed.position().get_state()) == {"i": 1}
  assert [next(feed), next(feed), next(feed)] == [0, 1, 2]
  with pytest.raises(ValueError, match="bad record 3"):
    next(feed)
  feed.close()
  slow = prefetch.DevicePrefetcher(_Source(n=3, delay=0.05), lambda x: x, 1)
  assert list(slow) == [0, 1, 2]
  assert slow.wait_s >= 0.1                 # the consumer waited for the slow source
  slow.close()


def test_loop_logs_throughput_data_wait_and_mfu(tmp_path, monkeypatch, caplog):
  # CPU has no peak: pretend it has one so the MFU path is exercised too.
  monkeypatch.setattr(mfu, "device_peak_flops", lambda device=None: 1e12)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO)
  caplog.set_level(pylogging.INFO)
  cfg = tw.make_config(steps=6, log_every=2)
  mesh = loop.mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  res = loop.run_training(cfg, str(tmp_path / "w"), build_model=tw.build_model,
                          loss_fn=tw.tiny_loss, train_iter=tw.make_iterator(cfg.train.batch_size),
                          mesh=mesh)
  lines = [r.getMessage() for r in caplog.records if "tokens/s" in r.getMessage()]
  assert len(lines) == 4, lines        # steps 0, 1, 3, 5
  assert all("data_wait=" in l and "MFU=" in l for l in lines), lines
  flops = res.compile_stats["cost_flops"]
  assert flops > 0 and res.compile_stats["peak_flops_per_device"] == 1e12
  B = cfg.train.batch_size
  for step, perf in res.throughput:
    assert perf["tokens_per_sec"] == pytest.approx(perf["steps_per_sec"] * B * tw.SEQ)
    assert perf["examples_per_sec"] == pytest.approx(perf["steps_per_sec"] * B)
    assert perf["mfu"] == pytest.approx(flops * perf["steps_per_sec"] / 1e12)
    assert 0.0 <= perf["data_wait_frac"] <= 1.0
  rows = read_metrics(str(tmp_path / "w"))
  assert {"train/tokens_per_sec", "train/data_wait_frac", "train/mfu",
          "train/steps_per_sec"} <= set(rows[5])


def test_batch_geometry_counts_llm_tokens_else_sequence_positions():
  sds = jax.ShapeDtypeStruct
  enc = {"genre_BxTxG": sds((8, 50, 3), np.int32), "item_BxT": sds((8, 50), np.int32)}
  assert loop._batch_geometry(enc) == (8, 50)
  stage2 = {"item": sds((4, 50), np.int32), "genre": sds((4, 50, 3), np.int32),
            "tokens_BxL": sds((4, 96), np.int32), "prompt_len_B": sds((4,), np.int32)}
  assert loop._batch_geometry(stage2) == (4, 96)
  assert loop._batch_geometry({"x_B": sds((6,), np.float32)}) == (6, 1)
