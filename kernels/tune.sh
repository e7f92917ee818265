#!/usr/bin/env bash
# Tile/warp sweep of the Triton solve on GPU (fwd+bwd, bf16, B*T = 16384); appends to $OUT/tune.log.
#   usage: bash kernels/tune.sh "LAYOUTS" "SEQ_LENS" CFG1 CFG2 ...   (CFG: SESSA_TRITON_CFG string, "-" = default)
OUT=${OUT:-/tmp/out}; LAY=$1; TS=$2; shift 2
for c in "$@"; do
  [[ $c == - ]] && c=""
  SESSA_TRITON_CFG=$c timeout 120 python3 -m kernels.bench_quick --layouts "$LAY" --seq-lens "$TS" --impls triton 2>&1 \
    | grep " ms," | sed "s/^/[${c:-default}] /" | tee -a "$OUT/tune.log"
done
