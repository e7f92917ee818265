"""`sessa-scale eval CHECKPOINT --task ppl|answers|mqar|passkey|lm-eval [options] [--json]`: evaluate a
trained model; results are printed and saved to RUN_DIR/eval/<name>.json for `sessa-scale report`.
`--write-jsonl` / `--write-data` write mqar / passkey out instead: the older spelling of `sessa-scale
synth` (commands/synth.py, which owns it and the task options)."""

from __future__ import annotations

import argparse
import json
import sys

from sessa_scale.commands.synth import (
    SYNTHETIC_TASKS,
    add_dataset_arguments,
    add_task_arguments,
    list_of,
    task_set,
    write_task,
)
from sessa_scale.errors import UserError

TASKS = ("ppl", "answers", "mqar", "passkey", "lm-eval")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model: perplexity, prompt->answer accuracy, MQAR, passkey, lm-evaluation-harness tasks",
        description="Evaluate a run directory (its latest checkpoint) or a checkpoint directory. Tasks: ppl "
        "(validation loss at several context lengths), answers (greedy exact match on a JSONL file of "
        '{"prompt", "answer"} records), mqar (multi-query associative recall) and passkey (retrieval at controlled '
        "depths), lm-eval (lm-evaluation-harness tasks on the model exported to transformers, run by the harness's hf model). Results go to RUN_DIR/eval/NAME.json. --write-jsonl (prompt/answer records) and "
        "--write-data (a training dataset for data.path) write mqar/passkey out instead, with no checkpoint: the older "
        "spelling of `sessa-scale synth TASK --jsonl FILE --out DIR`.",
    )
    p.add_argument("checkpoint", nargs="?", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--name", default=None, help="result file RUN_DIR/eval/NAME.json (default: the task name)")
    p.add_argument("--no-save", action="store_true", help="do not write the result into the run directory")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    g = p.add_argument_group("ppl")
    g.add_argument("--context-lengths", type=list_of(int), default=None, metavar="L,L,...",
                   help="context lengths in tokens (default: half, one and two times the run's data.seq_len)")
    g.add_argument("--max-tokens", type=int, default=65536, help="predictions per context length (default 65536)")
    g.add_argument("--data", default=None, metavar="DIR_OR_URL",
                   help="a prepared dataset whose validation split is scored (default: the run's data)")
    g = p.add_argument_group("answers")
    g.add_argument("--file", default=None, help='JSONL of {"prompt": str, "answer": str} records (optional "length")')
    g = p.add_argument_group("lm-eval (needs the lm-eval extra)")
    g.add_argument("--lm-eval-tasks", type=list_of(str), default=[], metavar="NAME,NAME,...",
                   help="lm-evaluation-harness task or group names, e.g. hellaswag,arc_easy")
    g.add_argument("--lm-eval-include", default=None, metavar="DIR",
                   help="a directory of extra task YAMLs (e.g. local tasks over your own JSONL files)")
    g.add_argument("--limit", type=float, default=None,
                   help="lm-eval: examples per task (a count, or a fraction of the task when < 1)")
    g.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (default: each task's own)")
    add_task_arguments(p.add_argument_group("mqar and passkey"))
    g = p.add_argument_group("writing mqar / passkey out (older spelling of `sessa-scale synth`)")
    g.add_argument("--write-jsonl", default=None, metavar="FILE",
                   help="write the task's prompt/answer records to FILE (= synth TASK --jsonl FILE)")
    g.add_argument("--write-data", default=None, metavar="DIR",
                   help="write the task's examples as a byte-level training dataset (= synth TASK --out DIR)")
    add_dataset_arguments(g, "--write-data")


def _summary(result: dict) -> str:
    if result["task"] == "lm-eval":
        return result["table"]
    if result["task"] == "ppl":
        rows = [f"{'context':>8}  {'loss':>8}  {'ppl':>10}  {'tail loss':>9}  {'tokens':>8}"]
        rows += [
            f"{r['context_length']:>8}  {r['loss']:>8.4f}  {r['ppl']:>10.3f}  {r['tail_loss']:>9.4f}  {r['tokens']:>8}"
            for r in result["lengths"]
        ]
        return "\n".join(rows)
    chance = f" (chance {result['chance']:.3g})" if result.get("chance") is not None else ""
    rows = [f"{result['task']}: exact match {result['accuracy']:.4f} = {result['correct']}/{result['n']}{chance}"]
    rows += [f"  length {r['length']:>6}: {r['accuracy']:.4f} ({r['n']} records)" for r in result["by_length"]]
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_examples is not None and args.num_examples < 1:
        raise UserError(f"--num-examples must be >= 1, got {args.num_examples}")
    if args.write_jsonl or args.write_data:
        if args.task not in SYNTHETIC_TASKS:
            raise UserError(f"--write-jsonl / --write-data write the synthetic tasks mqar and passkey, not --task {args.task}")
        print("sessa-scale eval: note: `sessa-scale synth TASK --out DIR --jsonl FILE` is the new spelling of "
              "--write-data / --write-jsonl", file=sys.stderr)
        return write_task(args, args.write_data, args.write_jsonl, False, "eval")
    if args.checkpoint is None:
        raise UserError("eval needs a RUN_DIR_OR_CHECKPOINT to evaluate (or --write-jsonl / --write-data to write a task out)")
    if args.task == "lm-eval":
        return _lm_eval(args)
    if args.task == "answers" and not args.file:
        raise UserError('--task answers needs --file FILE.jsonl with one {"prompt": ..., "answer": ...} per line')

    import torch

    from sessa_scale.checkpoint import read_meta
    from sessa_scale.evaluation.results import run_dir_of, save_result
    from sessa_scale.checkpoint.merge import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, checkpoint = load_model(args.checkpoint, device)
    meta = read_meta(checkpoint)
    header = {"task": args.task, "checkpoint": str(checkpoint), "step": meta["step"], "arch": cfg.model.arch}
    result = {**header, **_evaluate(args, model, cfg, torch.device(device), meta.get("tokenizer"))}
    if not args.no_save:
        path = save_result(run_dir_of(checkpoint), args.name or args.task, result)
        print(f"sessa-scale eval: wrote {path}", file=sys.stderr)
    print(json.dumps(result, indent=1) if args.json else _summary(result))
    return 0


def _lm_eval(args: argparse.Namespace) -> int:
    """lm-evaluation-harness on the exported model (sessa_scale/hf/harness.py); same result file and
    printing as the other tasks."""
    import torch

    from sessa_scale.checkpoint import find_checkpoint, read_meta
    from sessa_scale.evaluation.results import run_dir_of, save_result
    from sessa_scale.hf.harness import run_lm_eval

    checkpoint = find_checkpoint(args.checkpoint)
    meta = read_meta(checkpoint)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    scores = run_lm_eval(
        checkpoint, args.lm_eval_tasks, args.lm_eval_include, limit, args.num_fewshot, args.batch_size, device
    )
    header = {"task": "lm-eval", "checkpoint": str(checkpoint), "step": meta["step"], "arch": meta["config"]["model"]["arch"]}
    result = {**header, "tasks": args.lm_eval_tasks, "limit": limit, "num_fewshot": args.num_fewshot, **scores}
    if not args.no_save:
        path = save_result(run_dir_of(checkpoint), args.name or "lm-eval", result)
        print(f"sessa-scale eval: wrote {path}", file=sys.stderr)
    print(json.dumps(result, indent=1) if args.json else _summary(result))
    return 0


def _evaluate(args: argparse.Namespace, model, cfg, device, model_tokenizer: dict | None) -> dict:
    """The task's result. model_tokenizer: the tokenizer identity the checkpoint recorded (None for
    checkpoints that predate it: then the run's data manifest says)."""
    from sessa_scale.evaluation.answers import exact_match
    from sessa_scale.data.setup import check_eval_data, load_corpus, run_tokenizer, tokenizer_for

    if args.task == "ppl":
        import dataclasses

        from sessa_scale.evaluation.perplexity import loss_at_length
        from sessa_scale.training.precision import autocast

        lengths = args.context_lengths or [max(1, cfg.data.seq_len // 2), cfg.data.seq_len, 2 * cfg.data.seq_len]
        if min(lengths) < 1 or args.max_tokens < 1:
            raise UserError(f"--context-lengths must be >= 1 and --max-tokens >= 1, got {lengths} and {args.max_tokens}")
        data = dataclasses.replace(cfg.data, path=args.data, sources=None) if args.data else cfg.data
        if args.data:
            from sessa_scale.data.reader import load_manifest

            model_tokenizer = model_tokenizer or run_tokenizer(cfg.data)
            check_eval_data(args.data, load_manifest(args.data)["tokenizer"], model_tokenizer, cfg.model.vocab_size)
        corpus = load_corpus(data)
        rows = [
            loss_at_length(model, corpus.val, L, args.max_tokens, args.batch_size, lambda: autocast(cfg.train.precision, device))
            for L in lengths
        ]
        return {"data": corpus.description, "lengths": rows}
    tokenizer = tokenizer_for(cfg.data)
    if args.task == "answers":
        from sessa_scale.evaluation.tasks import read_records

        return {"file": args.file, "chance": None, **exact_match(model, tokenizer, read_records(args.file), args.batch_size)}
    tasks = task_set(args)
    return {"params": tasks.params, "chance": tasks.chance, **exact_match(model, tokenizer, tasks.records, args.batch_size)}
