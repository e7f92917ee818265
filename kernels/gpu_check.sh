#!/usr/bin/env bash
# One device call: install carried wheels (.whl/: fla-core, einops), run the GPU tests of the
# Triton feedback solve, the benchmarks, kernel profiles and a small tile sweep; logs and Markdown
# tables land under $OUT.
#   usage: bash kernels/gpu_check.sh [all|tests|bench|profile|sweep]
# Knobs: GPU_TEST_K (pytest -k filter), SMALL_REPEATS / WIDE_REPEATS (timed calls per bench point),
# DELTAFORMER=1 (add fla's DeltaFormer to the 6x128 table: ~30 s of compilation), SWEEP_CONFIGS
# (";"-separated SolveConfig overrides, "-" = defaults).  Every step has its own time limit.
set -o pipefail
MODE=${1:-all}
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
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, note the wall time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=1
  echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/times.txt"
}
if [[ $MODE == tests || $MODE == all ]]; then
  step gpu_tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=0 -rs -s tests/test_feedback_triton.py \
    ${GPU_TEST_K:+-k "$GPU_TEST_K"}
fi
if [[ $MODE == bench || $MODE == all ]]; then
  step bench_layer 120 python3 -m sessa_scale.bench.layer --seq-lens 2048,8192,16384 --out "$OUT/layer.md"
  SMALL_IMPLS=sdpa_flash,triton
  if [[ ${DELTAFORMER:-0} == 1 ]]; then
    if python3 -c "import sys, kernels.baselines as b; sys.exit(0 if b.fla_available() else 1)"; then
      SMALL_IMPLS=sdpa_flash,triton,fla_deltaformer
    else
      echo "fla-core not importable (no wheels in $WHL): the table has no DeltaFormer column" | tee -a "$OUT/device.txt"
    fi
  fi
  # Head dims <= 256: SDPA flash first, so the ratio columns read "x SDPA".
  step bench_solve_small 120 python3 -m sessa_scale.bench.solve --device cuda --dtype bfloat16 --batch-tokens 16384 \
    --seq-lens 2048,8192,16384 --layouts 6x128 --impls $SMALL_IMPLS --repeats ${SMALL_REPEATS:-10} \
    --out "$OUT/solve_small_heads.md"
  # The paper's single wide head: time and memory against T.
  step bench_solve_wide 120 python3 -m sessa_scale.bench.solve --device cuda --dtype bfloat16 --batch-tokens 16384 \
    --seq-lens 2048,8192,16384,32768 --layouts 1x768 --impls triton --repeats ${WIDE_REPEATS:-5} \
    --out "$OUT/solve_wide_heads.md"
fi
if [[ $MODE == profile || $MODE == all ]]; then
  step profile 90 python3 -m kernels.bench_quick --profile --layouts 6x128 --seq-lens 2048,16384 --out "$OUT/profile_6x128.md"
  step profile_wide 60 python3 -m kernels.bench_quick --profile --layouts 1x768 --seq-lens 32768 --out "$OUT/profile_1x768.md"
fi
if [[ $MODE == sweep || $MODE == all ]]; then
  step sweep 120 python3 -m kernels.bench_quick --layouts 6x128 --seq-lens 8192 --out "$OUT/sweep_6x128.md" \
    --configs "${SWEEP_CONFIGS:--;FWD_WARPS=4,DQ_WARPS=4;FWD_BN=128,BWD_WARPS=4;fuse_dk=0}"
  step sweep_graphs 60 python3 -m kernels.bench_quick --layouts 6x128,1x768 --seq-lens 2048 \
    --out "$OUT/sweep_graphs.md" --configs "-;graphs=0"
fi
exit $rc
