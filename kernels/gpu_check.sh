#!/usr/bin/env bash
# One device call: install carried wheels (.whl/: fla-core, einops), run the GPU tests of the
# Triton feedback solve, then the benchmarks; logs and tables land under $OUT.
#   usage: bash kernels/gpu_check.sh [tests|bench|quick|all] [extra args for the quick bench]
set -o pipefail
MODE=${1:-all}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WHL=${WHL:-.whl}  # folder of carried wheels (fla-core, einops); run from elsewhere: WHL=path/to/.whl
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
rc=0
if [[ $MODE == tests || $MODE == all ]]; then
  # GPU_TEST_K: a pytest -k filter (e.g. "not large_widths" when the call's time is short)
  python3 -m pytest -q -m gpu -p no:cacheprovider --durations=0 tests/test_feedback_triton.py -rs \
    ${GPU_TEST_K:+-k "$GPU_TEST_K"} 2>&1 | tee "$OUT/gpu_tests.log" || rc=1
fi
if [[ $MODE == quick ]]; then
  python3 -m kernels.bench_quick "$@" 2>&1 | tee "$OUT/bench_quick.log" || rc=1
fi
if [[ $MODE == bench || $MODE == all ]]; then
  timeout ${BENCH_TIMEOUT:-300} python3 -m sessa_scale.bench.layer --seq-lens 2048,8192,16384 --out "$OUT/layer.md" 2>&1 | tee "$OUT/bench_layer.log" || rc=1
  SMALL_IMPLS=sdpa_flash,triton,fla_deltaformer,chunked,dense
  if ! python3 -c "import sys, kernels.baselines as b; sys.exit(0 if b.fla_available() else 1)"; then
    echo "fla-core not importable (no wheels in $WHL): the table has no DeltaFormer column" | tee -a "$OUT/device.txt"
    SMALL_IMPLS=sdpa_flash,triton,chunked,dense
  fi
  # Head dims <= 256: SDPA flash first, so the ratio columns read "x SDPA".
  timeout ${BENCH_TIMEOUT:-300} python3 -m sessa_scale.bench.solve --device cuda --dtype bfloat16 --batch-tokens 16384 \
    --seq-lens 2048,8192,16384,32768 --layouts 6x128,16x64 \
    --impls $SMALL_IMPLS --repeats ${SMALL_REPEATS:-10} --max-quadratic-gib 45 \
    --out "$OUT/solve_small_heads.md" 2>&1 | tee "$OUT/bench_solve_small.log" || rc=1
  # Wide single heads: ratios against the Triton kernel.
  timeout ${BENCH_TIMEOUT:-300} python3 -m sessa_scale.bench.solve --device cuda --dtype bfloat16 --batch-tokens 16384 \
    --seq-lens 2048,8192,16384,32768 --layouts 1x768,1x2048 \
    --impls triton,chunked,dense --repeats ${WIDE_REPEATS:-5} --max-quadratic-gib 45 \
    --out "$OUT/solve_wide_heads.md" 2>&1 | tee "$OUT/bench_solve_wide.log" || rc=1
fi
exit $rc
