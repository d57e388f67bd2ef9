"""Shared pytest set-up: the opt-in `slow` marker."""

import os

import pytest

# Tests run on the CPU; fake devices are only set in subprocesses that need them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
