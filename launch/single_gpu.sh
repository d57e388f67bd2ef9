#!/usr/bin/env bash
# One machine, one process: a single GPU (or CPU / one TPU VM host with all its chips).
#
#   launch/single_gpu.sh CONFIG WORKDIR [--config.a.b=value ...]
#   launch/single_gpu.sh configs/encoder_movielens_100k.py runs/enc --config.train.steps=2000
#
# Rerunning the same command in the same WORKDIR resumes from the latest checkpoint.
# Env: PYTHON (default: python), CUDA_VISIBLE_DEVICES to pick the GPU.
# DRY_RUN=1: print the environment and the exact command (one process), run nothing.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.a.b=value ...]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."
# JAX preallocates 75% of GPU memory by default; keep that (fastest), but let the user
# lower it (e.g. XLA_PYTHON_CLIENT_MEM_FRACTION=.5) when sharing the GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.75}
CMD=("$PYTHON" -m userllm_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  echo "# single_gpu: 1 process, no coordinator; cwd $(pwd)"
  ENVS=("XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION")
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then ENVS+=("CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"); fi
  echo "process 0/1 on $(hostname): env $(printf '%q ' "${ENVS[@]}" "${CMD[@]}")"
  exit 0
fi
mkdir -p "$WORKDIR"
# SIGTERM (e.g. `timeout`, a preemptible VM shutting down) -> checkpoint at the next step
# and exit 0; exec so the signal reaches Python directly.
exec "${CMD[@]}"
