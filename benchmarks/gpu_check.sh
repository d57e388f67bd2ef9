#!/usr/bin/env bash
# One-shot accelerator check: the GPU path under the installed JAX, and throughput.
#
#   USERLLM_CACHE=DIR OUT=DIR bash benchmarks/gpu_check.sh
#
# USERLLM_CACHE must already hold the embedded ml-100k (python -m userllm_jax.prepare
# --dataset=movielens-100k fills it; the machine may be offline).  Phase A runs, side by side
# on the one GPU, the ml-100k encoder job through the real entry point and the encoder tuning
# sweep ($SWEEP, default benchmarks/encoder_sweep_short.txt; benchmarks/sweep_encoder.py runs
# the same job with each line's config overrides).
# Phase B runs the throughput benchmarks alone, phase C the model test subset on the GPU (f32
# matmuls at full precision, since the tests' tolerances are for f32).  Everything lands in
# $OUT (logs, results.json, sweep.json).  On an H100 (2026-11-27): the job 2.5 min, the short
# sweep 4 min at --parallel 7, the benchmarks 3 min; the tests compile for ~10 s each, so
# give phase C several minutes (PYTEST_TIMEOUT, default 300 s).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export USERLLM_OFFLINE=1 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import sys, jax, flax, optax, orbax.checkpoint as o, grain; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'grain', grain.__version__, jax.devices())"

SWEEP=${SWEEP:-benchmarks/encoder_sweep_short.txt}

# Phase A (concurrent): the real job beside the sweep.
( /usr/bin/time -v timeout 230 $PY -m userllm_jax.main --config=configs/encoder_movielens_100k.py \
    --workdir=/tmp/enc_job > "$OUT/encoder_job.log" 2>&1; echo "encoder job rc $?" >> "$OUT/encoder_job.log";
  cp /tmp/enc_job/results.json "$OUT/encoder_job_results.json" 2>/dev/null ) &
timeout 300 $PY benchmarks/sweep_encoder.py --sweep "$SWEEP" --parallel 7 \
    --out "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1; echo "sweep rc $?" >> "$OUT/sweep.log"
wait
grep -E "test: |wall clock|Maximum resident|rc " "$OUT/encoder_job.log" | tail -6
sed -n '/^test split/,$p' "$OUT/sweep.log"; tail -1 "$OUT/sweep.log"

# Phase B (alone): throughput.
{ timeout 100 $PY benchmarks/encoder.py --lengths=50,1000,8192 --steps=10
  timeout 60 $PY benchmarks/encoder.py --lengths=1000,8192 --steps=10 --attention=cudnn --dtype=bfloat16
  timeout 120 $PY benchmarks/gemma.py --random_init --dtype=bfloat16 --batch_sizes=1,8,64 --prompt_len=128 --new_tokens=32
} > "$OUT/bench.log" 2>&1
grep -v -i warning "$OUT/bench.log" | tail -30

# Phase C (alone): the model tests on the GPU.
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${PYTEST_TIMEOUT:-300}" \
    $PY -m pytest -q -rA -p no:cacheprovider --timeout 120 \
    tests/test_encoder.py tests/test_perceiver.py tests/test_xattn.py tests/test_userllm.py \
    tests/test_sampler.py tests/test_lora.py tests/test_ranking.py tests/test_gemma_model.py \
    -k "not real_gemma and not eight_device" > "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc $?" >> "$OUT/pytest_gpu.log"
grep -E "passed|failed|error|rc " "$OUT/pytest_gpu.log" | tail -5
