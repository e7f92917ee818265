"""`sessa-scale probe (RUN_DIR_OR_CHECKPOINT | --uniform --gamma G --length T) [--out PNG] [--json]`:
the memory-tail probe (influence vs lag, log-log plot, fitted power-law exponent)."""

from __future__ import annotations

import argparse
import json
import sys

from sessa_scale.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "probe",
        help="measure the memory tail: influence vs lag and its power-law exponent",
        description="Mean influence ||dy_{j+l}/dx_j|| of a token on the output l steps later, for sources j at the "
        "start of the sequence, over a log grid of lags l; fits I(l) ~ l^-beta. For a model, x are the input "
        "embeddings and y the final-norm hidden states (or one block's output with --layer); with --uniform, the "
        "feedback solve under uniform routing and constant gamma, whose exact exponent is 1 - gamma. "
        "The model result is also saved to RUN_DIR/eval/probe.json (and RUN_DIR/eval/probe.png).",
    )
    p.add_argument("checkpoint", nargs="?", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--uniform", action="store_true", help="probe the uniform-routing construction instead of a model")
    p.add_argument("--gamma", type=float, default=None, help="--uniform: the constant feedback gain, in (0, 1)")
    p.add_argument("--length", type=int, default=None,
                   help="sequence length T (default: the run's data.seq_len; 2048 with --uniform)")
    p.add_argument("--sources", type=int, default=4, help="source positions 0..J-1 averaged over (default 4)")
    p.add_argument("--sequences", type=int, default=4, help="model: input sequences averaged over (default 4)")
    p.add_argument("--inputs", choices=("random", "val"), default="random",
                   help="model: uniformly random tokens, or windows of the run's validation split (default random)")
    p.add_argument("--layer", type=int, default=None, help="model: probe only this block (0-based)")
    p.add_argument("--fit-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="lags to fit (default: T/16 to T - sources)")
    p.add_argument("--lags", type=int, default=48, help="log-spaced lags measured (default 48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and output directions")
    p.add_argument("--batch-size", type=int, default=16, help="(target, source) rows per backward pass")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="write the log-log plot to this PNG")
    p.add_argument("--name", default="probe", help="result name: RUN_DIR/eval/NAME.json and .png (default probe)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _check(args: argparse.Namespace) -> None:
    if args.uniform == (args.checkpoint is not None):
        raise UserError("probe takes either a RUN_DIR_OR_CHECKPOINT or --uniform --gamma G (not both, not neither)")
    if args.uniform and args.gamma is None:
        raise UserError("--uniform needs --gamma G, the constant feedback gain in (0, 1); e.g. --gamma 0.5")
    if not args.uniform and args.gamma is not None:
        raise UserError("--gamma applies to --uniform only; a model's gains are its own")
    for key in ("sources", "sequences", "lags", "batch_size"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.length is not None and args.length < args.sources + 2:
        raise UserError(f"--length {args.length} leaves no lag to measure from {args.sources} sources; use a longer one")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from sessa_scale.evaluation.plots import plot_influence

    if args.uniform:
        result = _probe_uniform(args)
        label, title = f"uniform routing, gamma={args.gamma}", "Uniform-routing feedback solve"
        out = args.out
    else:
        result, run_dir = _probe_checkpoint(args)
        label, title = f"{result['arch']} ({result['target']})", f"Memory tail: {run_dir.name}"
        out = args.out or run_dir / "eval" / f"{args.name}.png"
    if out is not None:
        print(f"sessa-scale probe: wrote {plot_influence([(label, result)], out, title)}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        lo, hi = result["fit_range"]
        expected = f" (expected 1 - gamma = {result['expected_beta']:.4f})" if "expected_beta" in result else ""
        print(f"beta = {result['beta']:.4f}{expected}, fit over lags [{lo}, {hi}] ({result['fit_points']} points, "
              f"r2 = {result['r2']:.4f}), T = {result['length']}, {result['sources']} sources")
    return 0


def _probe_uniform(args: argparse.Namespace) -> dict:
    from sessa_scale.evaluation.probe import probe_uniform, uniform_closed_form

    length = args.length or 2048
    result = probe_uniform(args.gamma, length, args.sources, args.fit_range, args.lags)
    reference = [
        (sum(uniform_closed_form(args.gamma, j, lag) ** 2 for j in range(args.sources)) / args.sources) ** 0.5
        for lag in result["lags"]
    ]
    result["reference"] = {"label": "closed form (docs/sessa_math.md)", "lags": result["lags"], "influence": reference}
    return result


def _probe_checkpoint(args: argparse.Namespace):
    import torch

    from sessa_scale.checkpoint import read_meta
    from sessa_scale.evaluation.probe import probe_model
    from sessa_scale.evaluation.results import run_dir_of, save_result
    from sessa_scale.checkpoint.merge import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, checkpoint = load_model(args.checkpoint, device)
    length = args.length or cfg.data.seq_len
    if args.inputs == "random":
        gen = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(0, cfg.model.vocab_size, (args.sequences, length), generator=gen)
    else:
        from sessa_scale.data import load_corpus

        val = load_corpus(cfg.data).val
        if val.numel() < args.sequences * length:
            raise UserError(f"the validation split holds {val.numel()} tokens, fewer than --sequences x --length")
        tokens = val[: args.sequences * length].long().view(args.sequences, length)
    result = probe_model(model, tokens, args.sources, args.layer, args.fit_range, args.lags, args.batch_size, args.seed)
    result = {"arch": cfg.model.arch, "checkpoint": str(checkpoint), "step": read_meta(checkpoint)["step"],
              "inputs": args.inputs, **result}
    run_dir = run_dir_of(checkpoint)
    print(f"sessa-scale probe: wrote {save_result(run_dir, args.name, result)}", file=sys.stderr)
    return result, run_dir
