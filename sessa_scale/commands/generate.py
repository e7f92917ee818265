"""`sessa-scale generate RUN_DIR_OR_CHECKPOINT --prompt TEXT --max-new-tokens N`: sample text."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample text from a trained model",
        description="Sample a continuation of a prompt from a run directory (its latest checkpoint) or a "
        "checkpoint directory, decoding token by token through the model's recurrent cache.",
    )
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def run(args: argparse.Namespace) -> int:
    from sessa_scale.checkpoint.merge import load_model
    from sessa_scale.errors import UserError
    from sessa_scale.generate import generate_text

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from sessa_scale.data.setup import tokenizer_for

    model, cfg, _ = load_model(args.checkpoint, device)
    tokenizer = tokenizer_for(cfg.data)
    text = generate_text(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, tokenizer)
    print(args.prompt + text)
    return 0
