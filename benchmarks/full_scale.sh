#!/usr/bin/env bash
# The full-scale User-LLM comparison as one shot on an offline accelerator machine.
#
# Here (networked, in the repo root; commit first, the commit is recorded):
#   bash benchmarks/full_scale.sh --prepare [--piece_mib=50]
#       --fetch-wheels: .whl/*.whl from benchmarks/gpu_wheels.txt (cp312 manylinux, --no-deps)
#                       + .whl/data/ (the recbole wheel holding ml-100k, commit.txt)
#       --split-weights: .wts/a, .wts/b, ... + .wts/manifest.json (benchmarks/gpu_weights.py)
#       --prepare: both, then prints the device calls (carry lists and sizes).
# There (repo root as cwd, Python 3.12; .wts pieces carried in earlier calls, .whl in this one):
#   bash benchmarks/full_scale.sh [--config=configs/userllm_movielens_100k.py:full]
#       [--total_s=470] [--wts=.wts] [--gguf_use=cache|path] [--no-install] [-- OVERRIDES...]
#   1. prints the hardware (nvidia-smi), Python / jax / flax versions and the git commit;
#   2. installs .whl/*.whl into /tmp/site (skipped without .whl or with --no-install);
#   3. joins and sha256-checks the weight pieces (gpu_weights.py join; a bad or missing piece
#      is named and the run stops), then either builds the embedded gemma3-270m cache from the
#      GGUF (--gguf_use=cache, the default: llm.name stays 'gemma3-270m') or passes the file as
#      --config.llm.name (--gguf_use=path); no .wts: whatever $USERLLM_CACHE already holds;
#   4. runs `python -m userllm_jax.main --config=CONFIG --workdir=$WORK OVERRIDES...` under a
#      time guard so that the whole script ends within --total_s seconds (default 470: inside
#      the 8 minutes, with room to copy);
#   5. copies into $OUT (at most 8 files): env.txt, results.json, table.txt, job.log and up to
#      four *.png plots from the workdir.
# OVERRIDES after `--` go to main unchanged (a --config.llm.name there wins over step 3).
# Exit status: the job's (124 when the time guard stopped it), or 1 when a step before it failed.
set -u -o pipefail
START=$(date +%s)
ROOT=$(pwd)
PY=${PYTHON:-python3}
CONFIG=configs/userllm_movielens_100k.py:full
TOTAL_S=470
WTS=.wts
GGUF_USE=cache
INSTALL=1
PIECE_MIB=50
MODE=run
OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --fetch-wheels) MODE=wheels ;;
    --split-weights) MODE=split ;;
    --config=*) CONFIG=${1#*=} ;;
    --total_s=*) TOTAL_S=${1#*=} ;;
    --wts=*) WTS=${1#*=} ;;
    --gguf_use=*) GGUF_USE=${1#*=} ;;
    --piece_mib=*) PIECE_MIB=${1#*=} ;;
    --no-install) INSTALL=0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) echo "full_scale.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

mib() { du -b "$@" 2>/dev/null | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }

fetch_wheels() {
  mkdir -p .whl/data
  rm -f .whl/*.whl
  local plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
  # shellcheck disable=SC2086
  grep -v -E '^\s*(#|$)' benchmarks/gpu_wheels.txt | grep -v '# build' | sed 's/#.*//' \
    | xargs $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp $plat -d .whl || return 1
  grep '# build' benchmarks/gpu_wheels.txt | grep -v -E '^\s*#' | sed 's/#.*//' \
    | xargs $PY -m pip wheel -q --no-deps -w .whl || return 1
  # The embedded ml-100k (weights.embedded / data.sources.embedded read it from the wheel; not
  # installed): from the local cache when there, else from PyPI.
  local cached=${USERLLM_CACHE:-$HOME/.cache/userllm_jax}/downloads/recbole-1.2.1-py3-none-any.whl
  if [ -f "$cached" ]; then cp "$cached" .whl/data/;
  else $PY -m pip download -q --no-deps recbole==1.2.1 -d .whl/data || return 1; fi
  { git rev-parse HEAD; git status --porcelain | sed 's/^/dirty: /'; } > .whl/data/commit.txt
  ls -la .whl .whl/data
  echo "wheels: $(mib .whl/*.whl .whl/data/*) MiB"
}

split_weights() {
  $PY benchmarks/gpu_weights.py split --out="$WTS" --piece_mib="$PIECE_MIB"
}

print_plan() {
  local pieces=() p
  for p in $(cd "$WTS" && ls | grep -E '^[a-z]{1,3}$' | sort); do pieces+=("$p"); done
  local n=${#pieces[@]} last=${pieces[$((${#pieces[@]} - 1))]}
  echo
  echo "Device calls (back to back: a warm machine keeps ignored files for ~30 s only)."
  echo "The working tree travels each time ($(git ls-files -z | xargs -0 du -cb | tail -1 | awk '{printf "%.1f", $1/1048576}') MiB)."
  local i=1
  for p in "${pieces[@]}"; do
    if [ "$p" != "$last" ]; then
      echo "  call $i: carry [\"$WTS/$p\", \"$WTS/manifest.json\"] ($(mib "$WTS/$p") MiB)"
      echo "          command: python3 benchmarks/gpu_weights.py check --src=$WTS"
      i=$((i + 1))
    fi
  done
  echo "  call $i: carry [\"$WTS/$last\", \"$WTS/manifest.json\", \".whl\"] ($(mib "$WTS/$last" .whl) MiB)"
  echo "          command: bash benchmarks/full_scale.sh --config=$CONFIG"
  echo "          (timeout_s 540; check the output of calls 2..$((i - 1)): every earlier piece must be 'ok')"
}

case "$MODE" in
  wheels) fetch_wheels; exit $? ;;
  split) split_weights; exit $? ;;
  prepare) fetch_wheels && split_weights && print_plan; exit $? ;;
esac

# ---- run (on the accelerator machine) ---------------------------------------------------
OUT=${OUT:-$ROOT/benchmarks/out/full_scale}
mkdir -p "$OUT"
# The workdir and the cache live under the repo root, in a git-ignored folder: a warm device
# machine keeps them between calls, so a second call of this script resumes the job (finished
# methods are skipped, an interrupted one continues from its checkpoint) without re-joining
# the weights.
WORK=${WORK:-$ROOT/.full_scale/work}
export USERLLM_CACHE=${USERLLM_CACHE:-$ROOT/.full_scale/cache} USERLLM_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$USERLLM_CACHE/downloads" "$WORK"
ENV_TXT=$OUT/env.txt

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "command: $0 --config=$CONFIG ${OVERRIDES[*]}"
  commit=$(git rev-parse HEAD 2>/dev/null || true)
  [ -z "$commit" ] && [ -f .whl/data/commit.txt ] && commit="$(tr '\n' ' ' < .whl/data/commit.txt)(from .whl/data/commit.txt)"
  echo "commit: ${commit:-${GIT_COMMIT:-unknown}}"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    echo "nvidia-smi: not found"
  fi
  echo "cpus: $(nproc)  $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
} | tee "$ENV_TXT"

if [ "$INSTALL" = 1 ] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "wheel install failed" | tee -a "$ENV_TXT"; exit 1; }
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
cp .whl/data/recbole-*.whl "$USERLLM_CACHE/downloads/" 2>/dev/null || true

$PY -c "import sys, jax, flax, optax, grain; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'grain', grain.__version__, 'devices', jax.devices())" 2>&1 | tee -a "$ENV_TXT" \
  || { echo "imports failed" | tee -a "$ENV_TXT"; exit 1; }

LLM_OVERRIDE=()
if [ -f "$USERLLM_CACHE/gemma3-270m/manifest.json" ] && [ "$GGUF_USE" = cache ]; then
  echo "weights: the gemma3-270m cache of an earlier call is there ($USERLLM_CACHE)" | tee -a "$ENV_TXT"
elif [ -f "$WTS/manifest.json" ]; then
  t0=$(date +%s)
  if [ "$GGUF_USE" = cache ]; then
    $PY benchmarks/gpu_weights.py join --src="$WTS" --out="$WORK/gguf" --build_cache 2>&1 | tee -a "$ENV_TXT" || exit 1
  else
    line=$($PY benchmarks/gpu_weights.py join --src="$WTS" --out="$WORK/gguf" 2>&1) || { echo "$line" | tee -a "$ENV_TXT"; exit 1; }
    echo "$line" | tee -a "$ENV_TXT"
    gguf=$(echo "$line" | sed -n 's/^joined \(.*\) (sha256 checked)$/\1/p')
    LLM_OVERRIDE=("--config.llm.name=$gguf")
  fi
  echo "weights ready in $(( $(date +%s) - t0 )) s" | tee -a "$ENV_TXT"
fi
for o in "${OVERRIDES[@]}"; do
  case "$o" in --config.llm.name=*) LLM_OVERRIDE=() ;; esac
done

LEFT=$(( TOTAL_S - ($(date +%s) - START) - 20 ))
if [ "$LEFT" -lt 30 ]; then
  echo "only $LEFT s left for the job: not started" | tee -a "$ENV_TXT"; exit 1
fi
echo "job: $LEFT s time guard: $PY -m userllm_jax.main --config=$CONFIG --workdir=$WORK ${LLM_OVERRIDE[*]} ${OVERRIDES[*]}" | tee -a "$ENV_TXT"
timeout --kill-after=10 "$LEFT" $PY -m userllm_jax.main --config="$CONFIG" --workdir="$WORK" \
    "${LLM_OVERRIDE[@]}" "${OVERRIDES[@]}" > "$WORK/job.log" 2>&1
RC=$?
echo "job rc $RC after $(( $(date +%s) - START )) s in all" | tee -a "$ENV_TXT"

# The table: what the job printed from its results header on, without absl log lines.
if grep -q "results (" "$WORK/job.log"; then
  sed -n '/results (/,$p' "$WORK/job.log" | grep -v -E '^[IWEF][0-9]{4} ' > "$OUT/table.txt"
else
  tail -n 60 "$WORK/job.log" > "$OUT/table.txt"
fi
tail -c 15000000 "$WORK/job.log" > "$OUT/job.log"
[ -f "$WORK/results.json" ] && cp "$WORK/results.json" "$OUT/results.json"
# Every finished method's results (the job writes WORKDIR/<method>/results.json as it goes):
# what a run stopped by the time guard did finish.
( cd "$WORK" && ls */results.json > /dev/null 2>&1 && tar czf "$OUT/methods.tgz" */results.json )
n=0
for png in "$WORK"/*.png; do
  [ -f "$png" ] || continue
  [ "$n" -ge 4 ] && break
  name=$(basename "$png" | tr -c 'A-Za-z0-9._\n-' '_')
  cp "$png" "$OUT/$name"; n=$((n + 1))
done
cat "$OUT/table.txt"
ls -la "$OUT"
exit $RC
