"""Every file in configs/ loads, names a known job and has the fields its job reads."""

import importlib.util
import pathlib

import ml_collections
import pytest

from userllm_jax.jobs import JOBS

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_configs():
  assert CONFIG_FILES, f"no config files in {CONFIG_DIR}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_loads(path):
  cfg = _load(path).get_config()
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert cfg.job in JOBS, f"{path.name}: job={cfg.job!r}"
  for section in ("data", "train", "mesh"):
    assert section in cfg, f"{path.name}: missing section {section!r}"
  assert cfg.seed is not None
