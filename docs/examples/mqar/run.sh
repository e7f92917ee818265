#!/usr/bin/env bash
# Worked example: tiny Sessa vs Transformer vs Mamba-2 on MQAR (multi-query associative recall), CPU.
# Run from the repository root: `bash docs/examples/mqar/run.sh`. Runs go to $RUNS (default
# runs/mqar-example), the report to $REPORT (default docs/examples/mqar/report). STEPS sets the
# training length (default 2500 optimizer steps of 16 x 64 tokens).
#
# Two lanes run side by side, one thread each (a 2-core machine): lane 1 trains and evaluates
# Mamba-2 (the slowest per step on CPU), lane 2 Sessa and then the Transformer. Every command is
# seeded and single-process, so the lanes do not change any number, only the wall time.
set -euo pipefail
RUNS=${RUNS:-runs/mqar-example}
REPORT=${REPORT:-docs/examples/mqar/report}
STEPS=${STEPS:-2500}
S="python3 -m sessa_scale"
export OMP_NUM_THREADS=1

# 1. Training data: 80,000 MQAR sequences for each of 2 and 4 key-value pairs (seed 0), byte-level,
#    packed into 64-token samples; 2% of the sequences held out for validation.
$S synth mqar --num-pairs 2,4 --num-examples 80000 --seed 0 \
  --out "$RUNS/data" --seq-len 64 --val-fraction 0.02

# 2. Three models with matched non-embedding parameters (Sessa 297,986 / Transformer 298,112 /
#    Mamba-2 297,256), identical data, optimizer, schedule, batch and seed; only the block differs.
COMMON=(data.path="$RUNS/data" data.seq_len=64 model.d_model=128 model.n_heads=4 model.n_layers=2
  train.max_steps="$STEPS" train.micro_batch_size=16 train.eval_interval=250 train.eval_batches=4
  optim.lr=1e-3 optim.warmup_steps=200 checkpoint.interval=0 run.seed=0 train.resume=none logging.progress=false)
declare -A ARCH_ARGS=(
  [sessa]="model.arch=sessa"
  [transformer]="model.arch=transformer model.mlp_hidden=320"
  [mamba2]="model.arch=mamba2 model.ssm_state=180 model.ssm_head_dim=64 model.ssm_chunk=64"
)

# 3. Per model: train, then evaluate on held-out seeds: MQAR with the trained 2 and 4 pairs and with
#    8, 12 and 16 pairs (longer than anything seen in training), validation loss at 32..128 tokens
#    of context, and the memory-tail probe at 256 tokens.
one() {
  local arch=$1
  # shellcheck disable=SC2086
  $S train "${COMMON[@]}" run.dir="$RUNS/$arch" ${ARCH_ARGS[$arch]}
  $S eval "$RUNS/$arch" --task mqar --name mqar_trained --num-pairs 2,4 --num-examples 128 --seed 1
  $S eval "$RUNS/$arch" --task mqar --name mqar_longer --num-pairs 8,12,16 --num-examples 32 --seed 1
  $S eval "$RUNS/$arch" --task ppl --context-lengths 32,64,128 --max-tokens 16384
  $S probe "$RUNS/$arch" --length 256 --sequences 4
}
one mamba2 > "$RUNS.mamba2.log" 2>&1 &
lane1=$!
{ one sessa && one transformer; } > "$RUNS.sessa-transformer.log" 2>&1 &
lane2=$!
wait $lane1 || { echo "lane 1 (mamba2) failed; see $RUNS.mamba2.log" >&2; exit 1; }
wait $lane2 || { echo "lane 2 (sessa, transformer) failed; see $RUNS.sessa-transformer.log" >&2; exit 1; }

# 4. The side-by-side report: report.md, report.json and the PNGs.
$S report "$RUNS/sessa" "$RUNS/transformer" "$RUNS/mamba2" --out "$REPORT"
