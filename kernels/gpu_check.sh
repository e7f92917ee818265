#!/usr/bin/env bash
# The GPU session script: one device call installs the carried wheels, then runs the named steps,
# each under a time limit; logs, Markdown tables and times.txt land under $OUT.
#   usage: bash kernels/gpu_check.sh STEP [STEP ...]      (default: trainer train-bench)
# Steps:
#   trainer       the user's path on the GPU: every architecture trains through `sessa-scale train`
#                 (bf16 asserted inside the engine, resume bitwise under train.deterministic; train.cuda_graphs
#                 against eager)
#   train-bench   `sessa-scale bench train`: the 350M trio through the trainer ($TRAIN_BENCH_ARGS)
#   parallel-bench     `sessa-scale bench parallel` on 2 GPUs (nvidia-h200-x2): the 350M Sessa, every layout, T=2048
#   parallel-bench-8k  the same, 1 GPU vs tp=2+SP at T=8192
#   solve-tests   GPU tests of the Triton feedback solve ($GPU_TEST_K: a pytest -k filter)
#   solve-bench   `bench layer` (SessaLayer vs the project's Transformer block) and `bench solve` tables
#   solve-profile kernel profiles of the solve (bench/solve_quick.py --profile)
#   solve-sweep   a small tile sweep of the solve ($SWEEP_CONFIGS: ";"-separated SolveConfig overrides, "default" for none)
#   ssd-tests     GPU tests of the Triton SSD scan (Mamba-2)
#   ssd-bench     `bench ssd`: the scan alone vs the chunked scan, fla and SDPA flash of the same tokens
# Knobs: STEP_TIMEOUT (seconds per step, default 300), SMALL_REPEATS / WIDE_REPEATS (timed calls per
# solve bench point). Wheels: $WHL (default .whl) holds the packages the GPU image lacks (deepspeed,
# megatron-core, webdataset, pydantic, fla-core, ...); README "GPU machines" lists them.
# Two GPUs (nvidia-h200-x2): run one copy per GPU with its own CUDA_VISIBLE_DEVICES and OUT, e.g.
#   CUDA_VISIBLE_DEVICES=0 OUT=$OUT/gpu0 bash kernels/gpu_check.sh trainer & CUDA_VISIBLE_DEVICES=1 OUT=$OUT/gpu1 bash kernels/gpu_check.sh solve-tests & wait
set -o pipefail
STEPS=("$@"); [[ ${#STEPS[@]} -eq 0 ]] && STEPS=(trainer train-bench)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
WHL=${WHL:-.whl}
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  # once per machine, also when two copies of this script run side by side (one per GPU of nvidia-h200-x2)
  ( flock 9; [[ -f /tmp/site/.installed ]] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site "$WHL"/*.whl && touch /tmp/site/.installed; } ) 9>/tmp/site.lock || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
rc=0
step() {  # step NAME CMD...: run under $STEP_TIMEOUT, log to $OUT/NAME.log, note the wall time
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name $(date -u +%H:%M:%S)" | tee -a "$OUT/times.txt"
  timeout "${STEP_TIMEOUT:-300}" "$@" 2>&1 | tee "$OUT/$name.log" || rc=1
  echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/times.txt"
}
fla_impls() {  # the DeltaFormer column only where fla-core imports
  python3 -c "import sys; from sessa_scale.bench.solve import IMPLS; sys.exit(0 if 'fla_deltaformer' in IMPLS else 1)" && echo ",fla_deltaformer"
}
for s in "${STEPS[@]}"; do
  case $s in
    trainer)
      step trainer python3 -m pytest -q -m gpu -p no:cacheprovider --durations=0 -rsP tests/training/test_precision.py tests/training/test_cuda_graphs.py ;;
    train-bench)
      # shellcheck disable=SC2086
      runs=/tmp/bench_train${CUDA_VISIBLE_DEVICES:+_gpu$CUDA_VISIBLE_DEVICES}  # one per copy of this script
      step train_bench python3 -m sessa_scale bench train ${TRAIN_BENCH_ARGS:-} --runs-dir "$runs" --out "$OUT/train_bench.md"
      # profiles of steps run with train.profile_step=N (in TRAIN_BENCH_ARGS): one file of all their tables
      for f in "$runs"/*/profile/step_*.txt; do [[ -f $f ]] && { echo "## $f"; cat "$f"; }; done > "$OUT/train_profiles.txt"
      # diagnostic: where those steps left the GPU idle, and what the host did then
      ls "$runs"/*/profile/step_*.json >/dev/null 2>&1 && \
        python3 -m sessa_scale.bench.trace_gaps "$runs"/*/profile/step_*.json > "$OUT/train_gaps.md" 2>&1 ;;
    parallel-bench)  # a partial table is written after every run, so a time-out still leaves one
      STEP_TIMEOUT=${PARALLEL_TIMEOUT:-540} step parallel_T2048 python3 -m sessa_scale bench parallel --steps 10 \
        --out /tmp/bench_parallel --report "$OUT/parallel_T2048.md" ;;
    parallel-bench-8k)
      STEP_TIMEOUT=${PARALLEL_TIMEOUT:-540} step parallel_T8192 python3 -m sessa_scale bench parallel --steps 10 --seq-len 8192 \
        --micro-batch-size 2 --layouts "1 GPU" "tp=2+SP" --out /tmp/bench_parallel_8k --report "$OUT/parallel_T8192.md" ;;
    solve-tests)
      step solve_tests python3 -m pytest -q -m gpu -p no:cacheprovider --durations=0 -rs -s tests/ops/test_feedback_triton.py \
        ${GPU_TEST_K:+-k "$GPU_TEST_K"} ;;
    solve-bench)
      step bench_layer python3 -m sessa_scale.bench.layer --seq-lens 2048,8192,16384 --out "$OUT/layer.md"
      # head dims <= 256: SDPA flash first, so the ratio columns read "x SDPA"
      step bench_solve_small python3 -m sessa_scale.bench.solve --device cuda --dtype bfloat16 --batch-tokens 16384 \
        --seq-lens 2048,8192,16384 --layouts 6x128 --impls "sdpa_flash,triton$(fla_impls)" --repeats "${SMALL_REPEATS:-10}" \
        --out "$OUT/solve_small_heads.md"
      # the paper's single wide head: time and memory against T
      step bench_solve_wide python3 -m sessa_scale.bench.solve --device cuda --dtype bfloat16 --batch-tokens 16384 \
        --seq-lens 2048,8192,16384,32768 --layouts 1x768 --impls triton --repeats "${WIDE_REPEATS:-5}" \
        --out "$OUT/solve_wide_heads.md" ;;
    solve-profile)
      step solve_profile python3 -m sessa_scale.bench.solve_quick --profile --layouts 6x128 --seq-lens 2048,16384 --out "$OUT/profile_6x128.md"
      step solve_profile_wide python3 -m sessa_scale.bench.solve_quick --profile --layouts 1x768 --seq-lens 32768 --out "$OUT/profile_1x768.md" ;;
    solve-sweep)
      step solve_sweep python3 -m sessa_scale.bench.solve_quick --layouts 6x128 --seq-lens 2048,8192 --out "$OUT/sweep_6x128.md" \
        --configs "${SWEEP_CONFIGS:-default;min_leaves=8;FWD_BN=32;LEAF_STAGES=4}" ;;
    ssd-tests)
      # -rsP: skip reasons, and the error figures each passing test prints
      step ssd_tests python3 -m pytest -q -m gpu -p no:cacheprovider -rsP --durations=10 tests/ops/test_ssd_triton.py tests/ops/test_ssd_keep_states.py \
        tests/ops/test_mamba2_fused.py tests/ops/test_ssd.py ;;
    ssd-bench)
      step bench_ssd python3 -m sessa_scale bench ssd --out "$OUT/ssd.md" ;;
    *) echo "unknown step $s (trainer, train-bench, parallel-bench, parallel-bench-8k, solve-tests, solve-bench, solve-profile, solve-sweep, ssd-tests, ssd-bench)"; rc=2 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S) rc=$rc" | tee -a "$OUT/times.txt"
exit $rc
