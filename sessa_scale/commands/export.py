"""`sessa-scale export RUN_DIR_OR_CHECKPOINT --out DIR`: a Hugging Face transformers model directory."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a trained model to a Hugging Face transformers directory",
        description="Write a run's latest checkpoint (or a checkpoint directory) as a transformers model "
        "directory: model.safetensors (fp32; tensor-parallel shards merged, ZeRO partitions gathered), config.json, "
        "generation_config.json, tokenizer.json + tokenizer_config.json, and remote code that imports the model "
        "classes from sessa_scale. Load it with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) "
        "where sessa_scale is installed; train from it with model.init_from=DIR. Needs the `hf` extra.",
    )
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) directory to write")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from sessa_scale.hf.export import export_model

    summary = export_model(args.checkpoint, args.out)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(
            f"sessa-scale export: wrote {summary['out']} ({summary['arch']}, {summary['parameters']:,} parameters, "
            f"step {summary['step']} of {summary['checkpoint']}): {', '.join(summary['files'])}",
            file=sys.stderr,
        )
    return 0
