#!/usr/bin/env bash
# The GPU session script: one device call installs the carried wheels, then runs the named steps;
# logs and Markdown tables land under $OUT.
#   usage: bash kernels/gpu_check.sh STEP [STEP ...]      (default: trainer train-bench)
# Steps:
#   trainer       the user's path on the GPU: every architecture trains through `sessa-scale train`
#                 (bf16 asserted inside the engine, resume bitwise under train.deterministic)
#                 = pytest -m gpu tests/test_precision.py
#   train-bench   `sessa-scale bench train`: the 350M trio through the trainer ($TRAIN_BENCH_ARGS)
#   parallel-bench     `sessa-scale bench parallel` on 2 GPUs (nvidia-h200-x2): the 350M Sessa, every layout, T=2048
#   parallel-bench-8k  the same, 1 GPU vs tp=2+SP at T=8192
#   solve-tests   GPU tests of the Triton feedback solve ($GPU_TEST_K: a pytest -k filter)
#   solve-bench   `bench layer` and `bench solve` tables
#   ssd-tests     GPU tests of the Triton SSD scan (Mamba-2)
#   quick         kernels.bench_quick with $QUICK_ARGS
# Wheels: $WHL (default .whl) holds the packages the GPU image lacks (deepspeed, megatron-core,
# webdataset, pydantic, fla-core, ...); see README "GPU machines".
set -o pipefail
STEPS=("$@"); [[ ${#STEPS[@]} -eq 0 ]] && STEPS=(trainer train-bench)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
WHL=${WHL:-.whl}
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
git rev-parse HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$OUT/device.txt"
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
rc=0
for step in "${STEPS[@]}"; do
  echo "=== $step $(date -u +%H:%M:%S)" | tee -a "$OUT/device.txt"
  case $step in
    trainer)
      python3 -m pytest -q -m gpu -p no:cacheprovider --durations=0 -rs tests/test_precision.py 2>&1 | tee "$OUT/trainer_gpu.log" || rc=1 ;;
    train-bench)
      # shellcheck disable=SC2086
      timeout "$BENCH_TIMEOUT" python3 -m sessa_scale bench train ${TRAIN_BENCH_ARGS:-} --runs-dir /tmp/bench_train \
        --out "$OUT/train_bench.md" 2>&1 | tee "$OUT/train_bench.log" || rc=1
      # profiles of steps run with train.profile_step=N (in TRAIN_BENCH_ARGS): one file of all their tables
      for f in /tmp/bench_train/*/profile/step_*.txt; do [[ -f $f ]] && { echo "## $f"; cat "$f"; }; done > "$OUT/train_profiles.txt" ;;
    parallel-bench)  # a partial table is written after every run, so a timeout still leaves one
      timeout "${PARALLEL_TIMEOUT:-540}" python3 -m sessa_scale bench parallel --steps 10 --out /tmp/bench_parallel \
        --report "$OUT/parallel_T2048.md" 2>&1 | tee "$OUT/parallel_T2048.log" || rc=1 ;;
    parallel-bench-8k)
      timeout "${PARALLEL_TIMEOUT:-540}" python3 -m sessa_scale bench parallel --steps 10 --seq-len 8192 --micro-batch-size 2 \
        --layouts "1 GPU" "tp=2+SP" --out /tmp/bench_parallel_8k --report "$OUT/parallel_T8192.md" 2>&1 \
        | tee "$OUT/parallel_T8192.log" || rc=1 ;;
    solve-tests)
      python3 -m pytest -q -m gpu -p no:cacheprovider --durations=0 -rs tests/test_feedback_triton.py \
        ${GPU_TEST_K:+-k "$GPU_TEST_K"} 2>&1 | tee "$OUT/solve_gpu.log" || rc=1 ;;
    solve-bench)
      timeout "$BENCH_TIMEOUT" python3 -m sessa_scale.bench.layer --seq-lens 2048,8192,16384 --out "$OUT/layer.md" 2>&1 | tee "$OUT/bench_layer.log" || rc=1
      SMALL_IMPLS=sdpa_flash,triton,fla_deltaformer,chunked,dense
      if ! python3 -c "import sys, kernels.baselines as b; sys.exit(0 if b.fla_available() else 1)"; then
        echo "fla-core not importable (no wheels in $WHL): no DeltaFormer column" | tee -a "$OUT/device.txt"
        SMALL_IMPLS=sdpa_flash,triton,chunked,dense
      fi
      timeout "$BENCH_TIMEOUT" python3 -m sessa_scale.bench.solve --device cuda --dtype bfloat16 --batch-tokens 16384 \
        --seq-lens 2048,8192,16384 --layouts 6x128 --impls $SMALL_IMPLS --repeats ${SMALL_REPEATS:-10} \
        --max-quadratic-gib 45 --out "$OUT/solve_small_heads.md" 2>&1 | tee "$OUT/bench_solve_small.log" || rc=1
      timeout "$BENCH_TIMEOUT" python3 -m sessa_scale.bench.solve --device cuda --dtype bfloat16 --batch-tokens 16384 \
        --seq-lens 2048,8192,32768 --layouts 1x768 --impls triton,chunked --repeats ${WIDE_REPEATS:-5} \
        --max-quadratic-gib 45 --out "$OUT/solve_wide_heads.md" 2>&1 | tee "$OUT/bench_solve_wide.log" || rc=1 ;;
    ssd-tests)
      python3 -m pytest -q -m gpu -p no:cacheprovider --durations=0 -rs tests/test_ssd*.py 2>&1 | tee "$OUT/ssd_gpu.log" || rc=1 ;;
    quick)
      # shellcheck disable=SC2086
      python3 -m kernels.bench_quick ${QUICK_ARGS:-} 2>&1 | tee "$OUT/bench_quick.log" || rc=1 ;;
    *) echo "unknown step $step (trainer, train-bench, parallel-bench, parallel-bench-8k, solve-tests, solve-bench, ssd-tests, quick)"; rc=2 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S) rc=$rc" | tee -a "$OUT/device.txt"
exit $rc
