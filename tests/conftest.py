"""Shared pytest set-up: the opt-in `slow` marker."""

import os

import pytest

# Tests run on the CPU; fake devices are only set in subprocesses that need them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' models are tiny, so the run is bound by XLA compile time: LLVM optimisation
# level 0 cuts the default run by about 30% (the numerics stay within the tests' float32
# tolerances; the jobs, benchmarks and users compile at XLA's default).  Subprocesses inherit
# it (they add their fake-device flag to XLA_FLAGS).  USERLLM_TEST_XLA_OPT=default keeps
# XLA's default level here too.
if (os.environ.get("USERLLM_TEST_XLA_OPT") != "default"
    and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False,
                   help="also run tests marked slow (long, benchmark-like)")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow") or os.environ.get("USERLLM_RUNSLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow or USERLLM_RUNSLOW=1")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
