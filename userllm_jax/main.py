"""The one entry point for jobs.

    python -m userllm_jax.main --config=configs/<experiment>.py --workdir=DIR \
        [--config.a.b=value ...]

``config.job`` selects the job: ``'encoder'`` (stage 1: user-encoder
pretraining) or ``'userllm'`` (the User-LLM main job: stage 1, stage 2 and the
text-prompt baseline).  Every job writes ``DIR/results.json``.

Multi-host: pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (or ``--distributed=auto`` on Cloud TPU / Slurm, where JAX
detects them) and ``jax.distributed.initialize`` runs before anything touches
a device.  The job runs inside one preemption scope (``train/preemption.py``): a
SIGTERM at any moment stops it at the next safe point with exit status 0.  Nothing
else lives here.
"""

from __future__ import annotations

import importlib

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from userllm_jax import paths
from userllm_jax.jobs import JOBS
from userllm_jax.train import preemption

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ["off", "auto", "explicit"],
    "'auto': jax.distributed.initialize() with cluster auto-detection (TPU pods, Slurm); "
    "'explicit': use --coordinator_address/--num_processes/--process_id.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")



def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/encoder_movielens_100k.py")
  workdir = _WORKDIR.value
  if not workdir:
    raise app.UsageError("--workdir is required")
  job = config.get("job", None)
  if job not in JOBS:
    raise app.UsageError(f"config.job must be one of {sorted(JOBS)}, got {job!r}")

  mode = _DISTRIBUTED.value
  if mode == "off" and _COORDINATOR.value:
    mode = "explicit"
  if mode != "off":
    from userllm_jax.train import distributed  # pylint: disable=g-import-not-at-top
    if mode == "auto":
      distributed.maybe_initialize(auto=True)
    else:
      distributed.maybe_initialize(
          coordinator_address=_COORDINATOR.value,
          num_processes=_NUM_PROCESSES.value,
          process_id=_PROCESS_ID.value)

  paths.makedirs(workdir)      # a local directory or an object-store URI (gs://bucket/run)
  logging.info("job=%s workdir=%s", job, workdir)
  module = importlib.import_module(JOBS[job])
  with preemption.scope():
    module.run(config, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
