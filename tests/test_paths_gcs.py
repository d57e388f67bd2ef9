"""The path layer against a GCS emulator on 127.0.0.1 (PyPI ``gcp-storage-emulator``, in memory).

Clients pointed at it by :func:`paths.use_gcs_emulator`: gcsfs (etils.epath's gs:// backend)
through ``STORAGE_EMULATOR_HOST``, TensorStore (Orbax's array writer) through
``TENSORSTORE_GCS_HTTP_URL`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING``. Covered:

* paths: ``write_atomic`` / ``read_text`` / ``sha256_file`` / ``replace_dir`` (marker last) /
  ``join`` on ``gs://``;
* ``MetricsWriter`` on a gs:// workdir (JSON lines kept across a restart, TensorBoard events);
* ``Checkpointer`` (Orbax + the Grain iterator) saving to and restoring from ``gs://`` into a
  sharded abstract target, without the directory being turned into a local path;
* a prepared dataset written to and opened from gs:// (through the local mirror);
* the encoder job through the real entry point, ``python -m userllm_jax.main
  --workdir=gs://...``: checkpoint, metrics and ``results.json`` land in the bucket, and a
  second run resumes from that checkpoint.
"""

import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import portpicker
import pytest

if importlib.util.find_spec("gcsfs") is None:
  pytest.skip("gcsfs not installed (pip install .[test])", allow_module_level=True)
emulator_server = pytest.importorskip("gcp_storage_emulator.server")

from userllm_jax import paths  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "userllm-test"
_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
        "FSSPEC_GCS_TOKEN", "NO_GCE_CHECK", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


@pytest.fixture(scope="module")
def gcs():
  """An in-memory GCS emulator with one bucket; returns its endpoint."""
  port = portpicker.pick_unused_port()
  server = emulator_server.create_server("127.0.0.1", port, in_memory=True,
                                         default_bucket=BUCKET)
  server.start()
  saved = {k: os.environ.get(k) for k in _ENV}
  endpoint = f"http://127.0.0.1:{port}"
  paths.use_gcs_emulator(endpoint)
  # gcsfs logs a credentials warning per bucket-type probe: not useful against an emulator.
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  try:
    yield endpoint
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def test_paths_on_gcs(gcs, tmp_path):
  del gcs
  base = f"gs://{BUCKET}/paths"
  assert paths.is_remote(base) and not paths.is_remote(str(tmp_path))
  assert paths.join(base, "a", "b.json") == f"{base}/a/b.json"   # not $PWD/gs:/...
  paths.write_atomic(paths.join(base, "a", "b.json"), '{"x": 1}')
  assert json.loads(paths.read_text(f"{base}/a/b.json")) == {"x": 1}
  paths.write_atomic(f"{base}/a/b.json", b'{"x": 2}')              # overwrite: one PUT
  assert paths.read_bytes(f"{base}/a/b.json") == b'{"x": 2}'
  assert paths.sha256_file(f"{base}/a/b.json") == paths.sha256_bytes(b'{"x": 2}')
  # replace_dir: the old tree goes, the new one arrives with its marker written last
  for version in (1, 2):
    src = tmp_path / f"v{version}"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "data.bin").write_bytes(bytes([version]) * 10)
    if version == 1:
      (src / "only_in_v1.txt").write_text("old")
    (src / "metadata.json").write_text(json.dumps({"v": version}))
    paths.replace_dir(src, f"{base}/ds", marker="metadata.json")
    assert not src.exists()
  ds = paths.path(f"{base}/ds")
  assert json.loads((ds / "metadata.json").read_text()) == {"v": 2}
  assert (ds / "sub" / "data.bin").read_bytes() == b"\x02" * 10
  assert not (ds / "only_in_v1.txt").exists()
  got = paths.download_tree(f"{base}/ds", tmp_path / "down")
  assert (got / "sub" / "data.bin").read_bytes() == b"\x02" * 10


def test_metrics_writer_on_gcs(gcs):
  del gcs
  from userllm_jax.train.metrics_writer import MetricsWriter, read_metrics
  workdir = f"gs://{BUCKET}/metrics"
  w = MetricsWriter(workdir, enabled=True)
  w.write_scalars(1, {"train/loss": 2.0})
  w.write_scalars(2, {"train/loss": float("nan")})
  w.close()
  w = MetricsWriter(workdir, enabled=True)     # a resumed run appends
  w.write_scalars(2, {"train/loss": 1.5})
  w.close()
  assert read_metrics(workdir) == {1: {"train/loss": 2.0}, 2: {"train/loss": 1.5}}
  events = [p.name for p in paths.path(f"{workdir}/tb").iterdir()]
  assert len(events) == 2 and all(e.startswith("events.out.tfevents") for e in events)


def test_orbax_checkpoint_and_data_position_on_gcs(gcs):
  del gcs
  import grain
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from userllm_jax.train import checkpoint as ckpt_lib

  directory = f"gs://{BUCKET}/run/checkpoints"
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sh = NamedSharding(mesh, P())
  state = {"step": jnp.asarray(3, jnp.int32),
           "params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4)},
           "rest": {"key": jax.random.key(5)}}
  it = iter(grain.MapDataset.range(100).to_iter_dataset().batch(4))
  next(it), next(it)                                    # position: 8 examples
  ck = ckpt_lib.Checkpointer(directory, max_to_keep=2)
  assert str(ck.directory) == directory                # never os.path.abspath'd
  assert ck.save(3, state, it)
  ck.close()
  assert paths.path(f"{directory}/3/data/process_0-of-1.json").exists()

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state)
  fresh = iter(grain.MapDataset.range(100).to_iter_dataset().batch(4))
  ck = ckpt_lib.Checkpointer(directory)
  assert ck.latest_step() == 3
  got = ck.restore(3, abstract, fresh)
  ck.close()
  np.testing.assert_array_equal(got["params"]["w"], state["params"]["w"])
  assert int(got["step"]) == 3
  np.testing.assert_array_equal(jax.random.key_data(got["rest"]["key"]),
                                jax.random.key_data(state["rest"]["key"]))
  np.testing.assert_array_equal(next(fresh), [8, 9, 10, 11])


def _synthetic_config_file(tmp_path: pathlib.Path) -> pathlib.Path:
  cfg = tmp_path / "encoder_tiny_synthetic.py"
  cfg.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(REPO / "tests")!r})
      from test_encoder_job import tiny_config

      def get_config(arg=""):
        del arg
        return tiny_config("gs://{BUCKET}/prepared/synthetic")
      """))
  return cfg


def _main(cfg, workdir, endpoint, cache, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), USERLLM_CACHE=str(cache))
  for k in _ENV:
    env[k] = os.environ[k]
  assert env["STORAGE_EMULATOR_HOST"] == endpoint
  proc = subprocess.run([sys.executable, "-m", "userllm_jax.main", f"--config={cfg}",
                         f"--workdir={workdir}", *overrides], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc


@pytest.mark.slow   # not yet seen passing: timed out (600 s) on a 2-core machine at load ~20
def test_encoder_job_with_gcs_workdir(gcs, tmp_path):
  cfg = _synthetic_config_file(tmp_path)
  workdir = f"gs://{BUCKET}/encoder"
  _main(cfg, workdir, gcs, tmp_path / "cache")
  wd = paths.path(workdir)
  results = json.loads((wd / "results.json").read_text())
  assert results["train"]["steps"] == 6 and results["train"]["resumed_from"] == 0
  assert results["dataset"]["dir"] == f"gs://{BUCKET}/prepared/synthetic"
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()
                if p.name.isdigit()) == ["3", "6"]
  assert (wd / "checkpoints" / "6" / "data" / "process_0-of-1.json").exists()
  assert (wd / "metrics.jsonl").exists() and list((wd / "tb").iterdir())
  assert not (REPO / "gs:").exists() and not (tmp_path / "gs:").exists()
  # The prepared dataset is in the bucket, metadata.json included (written last).
  assert (paths.path(f"gs://{BUCKET}/prepared/synthetic") / "metadata.json").exists()

  # A second run with more steps resumes from the checkpoint in the bucket.
  _main(cfg, workdir, gcs, tmp_path / "cache", "--config.train.steps=9")
  results = json.loads((wd / "results.json").read_text())
  assert results["train"]["steps"] == 9 and results["train"]["resumed_from"] == 6
