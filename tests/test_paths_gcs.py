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
  second run resumes from that checkpoint;
* the same job as 2 processes x 4 CPU devices on one gs:// workdir: one shared checkpoint,
  SIGKILL, restart, resume from it, ``results.json`` in the bucket.

The emulator sends no ``x-goog-generation`` with object bytes; the fixture adds it (see
``_serve_object_generations``), without which TensorStore's conditional writes fail.
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


def _serve_object_generations():
  """Makes the emulator's media downloads carry ``x-goog-generation`` (as GCS does).

  ``gcp-storage-emulator`` sends no generation header with an object's bytes; TensorStore then
  stamps the read with generation 0, and its next conditional request on that object
  (``ifGenerationMatch`` / ``ifGenerationNotMatch``) fails with "Malformed StorageGeneration".
  Orbax's OCDBT writer does exactly that on ``manifest.ocdbt`` from the second write batch of
  a save on, so any checkpoint with more than a handful of arrays failed (the encoder job did,
  the 3-array checkpoint of test_orbax_checkpoint_and_data_position_on_gcs did not).
  """
  from gcp_storage_emulator.handlers import objects
  original = objects.download
  if getattr(original, "_serves_generation", False):
    return

  def download(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except Exception:   # pylint: disable=broad-except  (not found: the original answers 404)
      pass
    return original(request, response, storage, *args, **kwargs)

  download._serves_generation = True
  objects.download = download            # objects.get(alt=media) calls it by this name
  for _, handlers in emulator_server.HANDLERS:
    for method, fn in list(handlers.items()):
      if fn is original:
        handlers[method] = download


@pytest.fixture(scope="module")
def gcs():
  """An in-memory GCS emulator with one bucket; returns its endpoint."""
  _serve_object_generations()
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


@pytest.mark.slow   # ~65 s on 2 cores (two launches); the 2-process test below covers more
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


@pytest.mark.slow   # ~3 min on 2 cores: see the docstring
def test_two_process_job_shares_one_gcs_checkpoint_and_resumes_after_sigkill(gcs, tmp_path):
  """``python -m userllm_jax.main --workdir=gs://...`` as 2 processes x 4 CPU devices (the tiny
  synthetic encoder job, 9 steps, a checkpoint every 3): both processes write ONE checkpoint in
  the bucket (Orbax's step directories once, a data-iterator file per process); process 1 is
  SIGKILLed once step 3 is committed, process 0 is killed too, both are restarted and resume
  from that checkpoint; ``results.json`` lands in the bucket with ``resumed_from`` = that step,
  and the losses of every step and the evaluation metrics equal an
  uninterrupted 1 process x 8 devices run of the same config (2 x 4 = 1 x 8 itself is
  test_main_distributed's subject).

  Slow (``--runslow``): ~3 minutes on 2 busy cores (five launches; each compiles its step)."""
  import signal
  import time

  import fsspec

  import test_main_distributed as tmd

  cfg = _synthetic_config_file(tmp_path)
  args = [f"--config={cfg}", "--config.train.steps=9", "--config.train.ckpt_every=3",
          "--config.train.keep=5", "--config.train.log_every=1"]
  workdir = f"gs://{BUCKET}/two_procs"
  wd = paths.path(workdir)
  ckpts = wd / "checkpoints"

  def committed():
    # Orbax on an object store (no atomic rename) finishes a step with commit_success.txt.
    # gcsfs caches listings per instance (epath's has finalize_on_close=True): drop them.
    fsspec.filesystem("gs", finalize_on_close=True).invalidate_cache()
    if not ckpts.exists():
      return []
    return sorted(int(p.name) for p in ckpts.iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").exists())

  pair = tmd.spawn_pair(workdir, tmp_path / "run1", args=args)
  deadline = time.time() + 600
  try:
    while not committed():
      assert time.time() < deadline, tmd.tail(tmp_path / "run1.0.log")
      assert pair[0].poll() is None, (
          f"ended before a checkpoint:\n{tmd.tail(tmp_path / 'run1.0.log')}")
      time.sleep(0.2)
    pair[1].send_signal(signal.SIGKILL)
    pair[1].wait()
    try:       # process 0 cannot go on without its peer: it errors or blocks in a collective
      pair[0].wait(timeout=30)
    except subprocess.TimeoutExpired:
      pass
  finally:
    for p in pair:
      if p.poll() is None:
        p.kill()
        p.wait()
  at_kill = committed()
  assert at_kill and at_kill[-1] < 9, at_kill
  assert not (wd / "results.json").exists()
  step = at_kill[-1]
  # One shared checkpoint: each step directory once in the bucket, the Grain position of each
  # process in it, and nothing under a local "gs:" path.
  names = [p.name for p in ckpts.iterdir()]
  assert len(names) == len(set(names))
  assert sorted(p.name for p in (ckpts / str(step) / "data").iterdir()
                if p.name.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"]
  assert (ckpts / str(step) / "state").is_dir()

  restarted = tmd.spawn_pair(workdir, tmp_path / "run2", args=args)
  reference = tmd.spawn(tmp_path / "ref", tmp_path / "ref.log", devices=8, args=args)
  assert tmd.wait(restarted + [reference], timeout=600) == [0, 0, 0], [
      tmd.tail(tmp_path / f) for f in ("run2.0.log", "run2.1.log", "ref.log")]
  fsspec.filesystem("gs", finalize_on_close=True).invalidate_cache()
  results = json.loads((wd / "results.json").read_text())
  assert results["train"]["resumed_from"] == step and results["train"]["steps"] == 9
  assert results["processes"] == 2
  final = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert final[-1] == 9 and (ckpts / "9" / "state").is_dir(), final
  assert not (REPO / "gs:").exists() and not (tmp_path / "gs:").exists()

  ref = json.loads((tmp_path / "ref" / "results.json").read_text())
  assert ref["train"]["resumed_from"] == 0 and ref["processes"] == 1
  # Losses of every step: the killed run's lines up to its checkpoint are in the bucket (the
  # loop flushes the metrics writer with every checkpoint), the restarted run's after it.
  from userllm_jax.train.metrics_writer import read_metrics
  ma, mb = read_metrics(workdir), read_metrics(str(tmp_path / "ref"))
  assert sorted(mb) == list(range(9)) and sorted(ma) == list(range(9)), sorted(ma)
  np.testing.assert_allclose([ma[s]["train/loss"] for s in sorted(ma)],
                             [mb[s]["train/loss"] for s in sorted(ma)], rtol=2e-5)
  for split in ("valid", "test"):
    for k, v in ref[split]["model"].items():
      np.testing.assert_allclose(results[split]["model"][k], v, rtol=1e-6, err_msg=f"{split} {k}")
