"""Every variant of every file in configs/ loads, names a known job, has the fields its job
reads, and builds its model on abstract shapes (nothing materialised)."""

import importlib.util
import pathlib

import jax
import ml_collections
import pytest
from flax import nnx

from userllm_jax.jobs import JOBS

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))
# Vocabulary sizes come from the data at run time; any plausible ones do for shapes.
SIZES = dict(num_items=1000, num_genres=20, num_ratings=7, num_timegap_buckets=24)


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _variants():
  out = []
  for path in CONFIG_FILES:
    module = _load(path)
    assert hasattr(module, "VARIANTS"), f"{path.name}: no VARIANTS tuple"
    out += [(path, v) for v in module.VARIANTS]
  return out


def test_there_are_configs():
  assert CONFIG_FILES, f"no config files in {CONFIG_DIR}"


def _encoder(enc_cfg):
  from userllm_jax.models import encoder as enc
  fields = dict(enc_cfg.model.to_dict())
  fields.update(SIZES, max_len=int(enc_cfg.data.max_len))
  return enc.EncoderConfig.from_config(fields)


@pytest.mark.parametrize("path,variant", _variants(),
                         ids=lambda x: x.name if isinstance(x, pathlib.Path) else repr(x))
def test_config_variant_loads_and_builds_on_abstract_shapes(path, variant):
  from userllm_jax.models import encoder as enc
  cfg = _load(path).get_config(variant)
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert cfg.job in JOBS, f"{path.name}: job={cfg.job!r}"
  assert "reference" not in cfg, "configs carry settings, not measured results"
  enc_cfg = cfg if cfg.job == "encoder" else cfg.encoder
  for section in ("data", "model", "loss", "train", "mesh", "eval"):
    assert section in enc_cfg, f"{path.name}:{variant}: encoder section lacks {section!r}"
  if cfg.job == "encoder":
    model = nnx.eval_shape(lambda: enc.UserEncoder(_encoder(cfg), rngs=nnx.Rngs(0)))
    assert jax.tree.leaves(nnx.state(model, nnx.Param))
    return
  from userllm_jax.models import gemma as gemma_lib
  from userllm_jax.models import userllm as ul
  from userllm_jax.stage2 import methods as methods_lib
  from userllm_jax.jobs import userllm_job
  from userllm_jax.stage2 import examples as examples_lib
  for h in userllm_job.history_lengths(cfg):   # validates the windows against the encoder
    assert examples_lib.tasks_at(cfg, h)       # and tasks.window_only against tasks.names
  gcfg = (gemma_lib.tiny(vocab_size=64, **cfg.llm.tiny.to_dict()) if cfg.llm.name == "tiny"
          else gemma_lib.get_config(cfg.llm.preset))
  for name in cfg.methods:
    m = methods_lib.parse_method(name, cfg)
    if m.kind != "userllm":
      continue
    ucfg = ul.UserLLMConfig.from_config(cfg.userllm, mode=m.mode, strategy=m.strategy)
    model = nnx.eval_shape(lambda: ul.init_userllm(ucfg, _encoder(cfg.encoder), gcfg,
                                                   rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n > 0


def test_the_user_llm_encoder_section_is_the_encoder_job_config():
  """One schema: the main job's encoder section is configs/encoder_movielens_100k.py as is."""
  main = _load(CONFIG_DIR / "userllm_movielens_100k.py").get_config()
  enc = _load(CONFIG_DIR / "encoder_movielens_100k.py").get_config()
  assert main.encoder.to_dict() == enc.to_dict()
