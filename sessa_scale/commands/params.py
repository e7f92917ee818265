"""`sessa-scale params CONFIG [CONFIG ...] [--json] [key=value ...]`: exact parameter counts."""

from __future__ import annotations

import argparse
import json

from sessa_scale.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "params",
        help="count the parameters of model configs",
        usage="sessa-scale params [--json] [CONFIG ...] [key=value ...]",
        description="Print the exact parameter counts (total, and without the embedding / untied LM head) "
        "of each CONFIG side by side, with each non-embedding count relative to the first CONFIG's (a "
        "matched trio: sessa, transformer, mamba2 of one size); overrides such as model.n_layers=24 apply to every config. No CONFIG: the defaults.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    # REMAINDER so that --json may also follow the configs; run() picks it out.
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="CONFIG|key=value", help="YAML configs and dotted overrides")


def human(n: int) -> str:
    """123604992 -> '123.6M' (K, M, B; four significant digits at most)."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return str(n)


def count_rows(paths: list[str | None], overrides: list[str]) -> list[dict]:
    """One {config, arch, params, non_embedding_params, vs_first} per config (None: the defaults);
    vs_first is the non-embedding count over the first config's, to check that a trio is matched."""
    from sessa_scale.config import load_config
    from sessa_scale.models.registry import count_parameters

    rows = []
    for path in paths:
        cfg = load_config(path, overrides)
        count = count_parameters(cfg.model)
        rows.append(
            {
                "config": path if path is not None else "(defaults)",
                "arch": cfg.model.arch,
                "params": count.total,
                "non_embedding_params": count.non_embedding,
            }
        )
    for row in rows:
        row["vs_first"] = round(row["non_embedding_params"] / rows[0]["non_embedding_params"], 6)
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("config", "arch", "params", "exact", "non-embedding", "exact", "vs-first")
    lines = [header] + [
        (
            r["config"],
            r["arch"],
            human(r["params"]),
            f"{r['params']:,}",
            human(r["non_embedding_params"]),
            f"{r['non_embedding_params']:,}",
            f"{r['vs_first']:.2%}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
        for line in lines
    )


def run(args: argparse.Namespace) -> int:
    as_json = args.json or "--json" in args.args
    items = [a for a in args.args if a != "--json"]
    options = [a for a in items if a.startswith("-")]
    if options:
        raise UserError(f"unknown option {options[0]}; `sessa-scale params` takes CONFIG files, key=value overrides and --json")
    overrides = [a for a in items if "=" in a]
    paths = [a for a in items if "=" not in a] or [None]
    rows = count_rows(paths, overrides)
    print(json.dumps(rows, indent=2) if as_json else format_table(rows))
    return 0
