#!/usr/bin/env bash
# One device call (about 3-4 minutes on an H200): the GPU tests of the Triton SSD scan and of the fused
# Mamba-2 conv/norm kernels, `bench ssd` (the scan alone vs SDPA flash at T = 2k/8k/16k, and one block
# of each model), and `bench models` for the Transformer and Mamba-2 350m. Logs and Markdown tables
# land under $OUT; the exit status is 1 if any step failed.
#   usage: bash kernels/ssd_gpu_check.sh [tests|bench|models|all]   (default all)
# fla-core (for its rows and cross-check, skipped where its backward is flagged) must be on PYTHONPATH already.
set -o pipefail
MODE=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
rc=0
if [[ $MODE == tests || $MODE == all ]]; then
  # -rsP: skip reasons, and the error figures each passing test prints
  timeout ${TEST_TIMEOUT:-170} python3 -m pytest -q -m gpu -p no:cacheprovider -rsP --durations=10 \
    tests/test_ssd_triton.py tests/test_mamba2_fused.py tests/test_ssd.py ${GPU_TEST_K:+-k "$GPU_TEST_K"} 2>&1 | tee "$OUT/ssd_gpu_tests.log" || rc=1
fi
if [[ $MODE == bench || $MODE == all ]]; then
  timeout ${BENCH_TIMEOUT:-120} python3 -m sessa_scale bench ssd --out "$OUT/ssd.md" 2>&1 | tee "$OUT/bench_ssd.log" || rc=1
fi
if [[ $MODE == models || $MODE == all ]]; then
  timeout ${MODELS_TIMEOUT:-200} python3 -m sessa_scale bench models --archs transformer,mamba2 --seq-lens 2048,8192 \
    --steps 5 --warmup 2 --out "$OUT/models.md" 2>&1 | tee "$OUT/bench_models.log" || rc=1
fi
exit $rc
