#!/usr/bin/env bash
# Multi-host Cloud TPU VM (v4/v5e/v5p/v6e pod slice): run the same command on every worker.
# jax.distributed auto-detects the slice (--distributed=auto): no coordinator flags needed;
# one process per TPU host, process 0 (worker 0) is the coordinator.
#
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a [PROJECT=p] launch/tpu_vm.sh setup
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a launch/tpu_vm.sh run CONFIG gs://BUCKET/runs/enc [--config.x=y ...]
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a launch/tpu_vm.sh stop      # SIGTERM -> checkpoint, exit 0
#
# DRY_RUN=1: print the gcloud command line and, with TOPOLOGY (e.g. v5e-16, v5e-8, v4-32,
# v5p-16, v6e-16), what each worker runs ("process i/N on worker-i: env ... python -m ..."),
# and run nothing.  Tested by tests/test_launch.py.
#
# WORKDIR must be shared by all hosts (a gs:// bucket): Orbax writes one checkpoint from all
# processes together, and a restart reads it back.  Rerunning `run` resumes.
# REPO_URL / BRANCH (setup) and REMOTE_DIR (default ~/userllm_jax) can be overridden.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR=${REMOTE_DIR:-'~/userllm_jax'}
REMOTE_PYTHON=${REMOTE_PYTHON:-'~/venv/bin/python'}
GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then GCLOUD+=(--project="$PROJECT"); fi

# Hosts of a slice: v4-N / v5p-N count TensorCores (2 per chip), v5e-N / v6e-N count chips;
# a host has 4 chips, except single-host v5e-8 / v6e-8 (8 chips).
topology_hosts() {
  local gen=${1%%-*} n=${1##*-} chips
  case "$gen" in
    v4|v5p) chips=$((n / 2)) ;;
    v5e|v5litepod|v6e) chips=$n ;;
    *) echo "unknown TOPOLOGY $1 (expected v4-N, v5p-N, v5e-N, v6e-N)" >&2; return 2 ;;
  esac
  if (( chips <= 8 )) && [[ "$gen" == v5e || "$gen" == v5litepod || "$gen" == v6e ]]; then
    echo "1 $chips"
  elif (( chips <= 4 )); then
    echo "1 $chips"
  else
    echo "$((chips / 4)) 4"
  fi
}

run_gcloud() {   # run_gcloud REMOTE_COMMAND
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "$(printf '%q ' "${GCLOUD[@]}")--command=$(printf '%q' "$1")"
  else
    "${GCLOUD[@]}" --command="$1"
  fi
}

cmd=${1:-}; shift || true
case "$cmd" in
  setup)
    : "${REPO_URL:?set REPO_URL (a git URL of this repository)}"
    run_gcloud "set -e; \
      if [ ! -d $REMOTE_DIR ]; then git clone ${REPO_URL} $REMOTE_DIR; fi; \
      cd $REMOTE_DIR && git fetch -q && git checkout -q ${BRANCH:-main} && git pull -q || true; \
      python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip && \
      ~/venv/bin/pip install -q '.[tpu,gguf]'"
    ;;
  run)
    if [[ $# -lt 2 ]]; then echo "usage: $0 run CONFIG WORKDIR [--config.x=y ...]" >&2; exit 2; fi
    CONFIG=$1; WORKDIR=$2; shift 2
    PY_CMD="$REMOTE_PYTHON -m userllm_jax.main $(printf '%q ' "--config=$CONFIG" "--workdir=$WORKDIR" --distributed=auto "$@")"
    if [[ -n "${DRY_RUN:-}" && -n "${TOPOLOGY:-}" ]]; then
      read -r HOSTS CHIPS < <(topology_hosts "$TOPOLOGY")
      echo "# tpu_vm: TPU_NAME=$TPU_NAME ZONE=$ZONE topology $TOPOLOGY: $HOSTS hosts x $CHIPS chips," \
           "$HOSTS processes (one per host); coordinator: worker 0, auto-detected by" \
           "jax.distributed.initialize() from the TPU metadata; cwd $REMOTE_DIR"
      for ((i = 0; i < HOSTS; i++)); do
        echo "process $i/$HOSTS on worker-$i: env $PY_CMD"
      done
    fi
    # nohup + log per worker so an ssh drop does not kill the run.
    run_gcloud "cd $REMOTE_DIR && nohup $PY_CMD > /tmp/userllm_jax.log 2>&1 & \
      echo \$! > /tmp/userllm_jax.pid; sleep 5; tail -n 5 /tmp/userllm_jax.log"
    if [[ -z "${DRY_RUN:-}" ]]; then
      echo "logs: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f /tmp/userllm_jax.log'"
    fi
    ;;
  stop)
    run_gcloud "kill -TERM \$(cat /tmp/userllm_jax.pid) 2>/dev/null || true"
    ;;
  *)
    echo "usage: $0 setup | run CONFIG WORKDIR [overrides] | stop" >&2; exit 2 ;;
esac
