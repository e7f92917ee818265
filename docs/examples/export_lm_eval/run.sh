#!/usr/bin/env bash
# Worked example: train a tiny Sessa model on CPU, export it to a Hugging Face transformers directory,
# load it with AutoModelForCausalLM, and score it with lm-evaluation-harness on two local tasks (no
# network: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set). Run from the repository root with the extras
# installed (`pip install -e ".[hf,lm-eval]"`): `bash docs/examples/export_lm_eval/run.sh`.
# Runs go to $RUNS (default runs/export-lm-eval-example, which must not hold a run yet: training starts with
# train.resume=none); STEPS sets the training length (default 300).
set -euo pipefail
RUNS=${RUNS:-runs/export-lm-eval-example}
STEPS=${STEPS:-300}
TASKS=docs/examples/export_lm_eval/tasks
S="python3 -m sessa_scale"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# 1. The tiny Sessa config (configs/sessa/tiny.yaml) on the embedded byte-level corpus, 128-token samples;
#    the vocabulary from the data: 257 byte-level tokens padded to 384 (a multiple of 128).
$S config model.vocab_size=auto data.seq_len=128 train.max_steps="$STEPS" | tail -3
$S train run.dir="$RUNS/sessa" model.vocab_size=auto data.seq_len=128 train.max_steps="$STEPS" \
  train.eval_interval=100 train.resume=none logging.progress=false

# 2. The Hugging Face directory.
$S export "$RUNS/sessa" --out "$RUNS/sessa-hf"
ls "$RUNS/sessa-hf"

# 3. transformers loads it (remote code that imports sessa_scale) and reproduces sessa_scale's logits and
#    greedy decoding; `sessa-scale generate --temperature 0` gives the same text.
python3 - "$RUNS" <<'EOF'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sessa_scale.checkpoint.merge import load_model

runs = sys.argv[1]
hf = AutoModelForCausalLM.from_pretrained(f"{runs}/sessa-hf", trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(f"{runs}/sessa-hf", trust_remote_code=True)
ours, _, _ = load_model(f"{runs}/sessa")
ids = tok("def ", return_tensors="pt").input_ids
with torch.no_grad():
    diff = (hf(ids).logits - ours(ids)).abs().max().item()
out = hf.generate(ids, max_new_tokens=60, do_sample=False)
same = torch.equal(out[0, : ids.shape[1] + 60], ours.generate(ids, 60, temperature=0)[0])
print(f"{type(hf).__name__}: {sum(p.numel() for p in hf.parameters()):,} parameters; prompt of {ids.shape[1]} tokens "
      f"(EOS first); max |logit difference| vs sessa_scale: {diff:.3g}; greedy tokens identical: {same}")
print("transformers greedy continuation:", repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
EOF
$S generate "$RUNS/sessa" --prompt "def " --max-new-tokens 60 --temperature 0

# 4. lm-evaluation-harness through sessa-scale (exports to a temporary directory, runs the harness's hf
#    model): the two local tasks in tasks/ (YAML + JSONL), batches of 4 (generation left-pads them).
$S eval "$RUNS/sessa" --task lm-eval --lm-eval-tasks python_syntax,python_completion \
  --lm-eval-include "$TASKS" --batch-size 4 --device cpu

# 5. The same with the harness's own command line on the exported directory (as for any HF model).
lm-eval run --model hf --model_args "pretrained=$RUNS/sessa-hf,trust_remote_code=True,dtype=float32" \
  --tasks python_syntax --include_path "$TASKS" --batch_size 4 --device cpu 2>&1 | grep -E '^\|'
