"""Multi-process start-up: ``jax.distributed.initialize`` when the launcher asks for it.

Call :func:`maybe_initialize` before anything touches a device (``main.py`` does).

* explicit: ``coordinator_address='host:port'``, ``num_processes``, ``process_id``
  (Slurm scripts and local multi-process tests);
* auto: ``auto=True``, or env ``JAX_COORDINATOR_ADDRESS`` set -- JAX detects the
  cluster (Cloud TPU VMs / GKE TPU slices, Slurm, Open MPI, K8s jobsets);
* neither: single process, nothing happens.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import jax
from absl import logging


def maybe_initialize(coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None,
                     *,
                     auto: bool = False,
                     local_device_ids: Optional[Union[int, Sequence[int]]] = None,
                     initialization_timeout: int = 300) -> bool:
  """Initialise the JAX distributed runtime if requested; returns True if it runs.

  Idempotent: a second call after a successful initialisation does nothing.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  env_coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not (explicit or auto or env_coordinator):
    return False
  if explicit and coordinator_address is None and not env_coordinator:
    raise ValueError(
        f"distributed: num_processes={num_processes} / process_id={process_id} given "
        "without coordinator_address (host:port of process 0)")
  if coordinator_address is not None and ":" not in coordinator_address:
    raise ValueError(f"distributed: coordinator_address={coordinator_address!r}; expected 'host:port'")
  if (num_processes is None) != (process_id is None) and coordinator_address is not None:
    raise ValueError(
        f"distributed: give both num_processes and process_id (got {num_processes}, {process_id})")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"distributed: process_id={process_id} not in [0, {num_processes})")
  logging.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s, "
               "auto=%s)", coordinator_address or env_coordinator, num_processes, process_id,
               not explicit)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id,
                             local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout)
  logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """True on the process that writes logs and results (process 0)."""
  return jax.process_index() == 0
