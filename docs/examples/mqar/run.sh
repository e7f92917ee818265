#!/usr/bin/env bash
# Worked example: tiny Sessa vs Transformer vs Mamba-2 on MQAR (multi-query associative recall), CPU.
# Run from the repository root: `bash docs/examples/mqar/run.sh`. Runs go to $RUNS (default
# runs/mqar-example), the report to $REPORT (default docs/examples/mqar/report). STEPS sets the
# training length (default 300 optimizer steps of 16 x 64 tokens).
set -euo pipefail
RUNS=${RUNS:-runs/mqar-example}
REPORT=${REPORT:-docs/examples/mqar/report}
STEPS=${STEPS:-300}
S="python3 -m sessa_scale"

# 1. Training data: 20,000 MQAR sequences for each of 2, 4 and 8 key-value pairs (seed 0), byte-level,
#    packed into 64-token samples; 2% of the sequences held out for validation.
$S eval --task mqar --num-pairs 2,4,8 --num-examples 20000 --seed 0 \
  --write-data "$RUNS/data" --seq-len 64 --val-fraction 0.02

# 2. Three models with matched non-embedding parameters (75,266 / 75,328 / 74,224), identical data,
#    optimizer, schedule, batch and seed; only the block differs.
COMMON=(data.path="$RUNS/data" data.seq_len=64 model.d_model=64 model.n_heads=4 model.n_layers=2
  train.max_steps="$STEPS" train.micro_batch_size=16 train.eval_interval=50 train.eval_batches=4
  optim.lr=3e-3 optim.warmup_steps=30 checkpoint.interval=0 run.seed=0 train.resume=none logging.progress=false)
$S train "${COMMON[@]}" run.dir="$RUNS/sessa" model.arch=sessa
$S train "${COMMON[@]}" run.dir="$RUNS/transformer" model.arch=transformer model.mlp_hidden=160
$S train "${COMMON[@]}" run.dir="$RUNS/mamba2" model.arch=mamba2 model.ssm_state=80 model.ssm_head_dim=16 model.ssm_chunk=32

# 3. Evaluation on held-out seeds: MQAR with 2..16 pairs (12 and 16 are longer than anything seen in
#    training), validation loss at 32..128 tokens of context, and the memory-tail probe at 256 tokens.
for arch in sessa transformer mamba2; do
  $S eval "$RUNS/$arch" --task mqar --num-pairs 2,4,8,12,16 --num-examples 32 --seed 1
  $S eval "$RUNS/$arch" --task ppl --context-lengths 32,64,128 --max-tokens 16384
  $S probe "$RUNS/$arch" --length 256 --sequences 4
done

# 4. The side-by-side report: report.md, report.json and the PNGs.
$S report "$RUNS/sessa" "$RUNS/transformer" "$RUNS/mamba2" --out "$REPORT"
