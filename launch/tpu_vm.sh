#!/usr/bin/env bash
# Multi-host Cloud TPU VM (v4/v5e/v5p/v6e pod slice): run the same command on every worker.
# jax.distributed auto-detects the slice (--distributed=auto): no coordinator flags needed.
#
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a [PROJECT=p] launch/tpu_vm.sh setup
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a launch/tpu_vm.sh run CONFIG gs://BUCKET/runs/enc [--config.x=y ...]
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a launch/tpu_vm.sh stop      # SIGTERM -> checkpoint, exit 0
#
# WORKDIR must be shared by all hosts (a gs:// bucket): Orbax writes one checkpoint from all
# processes together, and a restart reads it back.  Rerunning `run` resumes.
# REPO_URL / BRANCH (setup) and REMOTE_DIR (default ~/userllm_jax) can be overridden.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR=${REMOTE_DIR:-'~/userllm_jax'}
GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then GCLOUD+=(--project="$PROJECT"); fi

cmd=${1:-}; shift || true
case "$cmd" in
  setup)
    : "${REPO_URL:?set REPO_URL (a git URL of this repository)}"
    "${GCLOUD[@]}" --command="set -e; \
      if [ ! -d $REMOTE_DIR ]; then git clone ${REPO_URL} $REMOTE_DIR; fi; \
      cd $REMOTE_DIR && git fetch -q && git checkout -q ${BRANCH:-main} && git pull -q || true; \
      python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip && \
      ~/venv/bin/pip install -q '.[tpu,gguf]'"
    ;;
  run)
    if [[ $# -lt 2 ]]; then echo "usage: $0 run CONFIG WORKDIR [--config.x=y ...]" >&2; exit 2; fi
    CONFIG=$1; WORKDIR=$2; shift 2
    EXTRA=$(printf ' %q' "$@")
    # nohup + log per worker so an ssh drop does not kill the run.
    "${GCLOUD[@]}" --command="cd $REMOTE_DIR && \
      nohup ~/venv/bin/python -m userllm_jax.main --config=$CONFIG --workdir=$WORKDIR \
        --distributed=auto $EXTRA > /tmp/userllm_jax.log 2>&1 & echo \$! > /tmp/userllm_jax.pid;
      sleep 5; tail -n 5 /tmp/userllm_jax.log"
    echo "logs: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f /tmp/userllm_jax.log'"
    ;;
  stop)
    "${GCLOUD[@]}" --command="kill -TERM \$(cat /tmp/userllm_jax.pid) 2>/dev/null || true"
    ;;
  *)
    echo "usage: $0 setup | run CONFIG WORKDIR [overrides] | stop" >&2; exit 2 ;;
esac
