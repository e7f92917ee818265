"""Side-by-side reports of runs: a Markdown table and PNG plots.

Per run it reads RUN_DIR/config.yaml (architecture, parameter counts), RUN_DIR/metrics.jsonl
(losses, tokens, throughput) and RUN_DIR/eval/*.json (what `sessa-scale eval` and `probe` wrote).
Writes OUT/report.md, OUT/report.json (the table's rows) and, where the runs hold the data,
OUT/loss_vs_tokens.png, OUT/accuracy_vs_length.png and OUT/influence_vs_lag.png.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from sessa_scale.errors import UserError
from sessa_scale.evaluation.results import load_results
from sessa_scale.filesystem import writable_dir


@dataclass
class Run:
    name: str
    path: Path
    config: object  # sessa_scale.config.Config
    metrics: list[dict]
    results: dict[str, dict]


def load_run(path: str | Path) -> Run:
    from sessa_scale.config import load_config

    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is not a run directory: it has no config.yaml (pass directories made by `sessa-scale train`)")
    metrics_file = path / "metrics.jsonl"
    metrics = []
    if metrics_file.is_file():
        for n, line in enumerate(metrics_file.read_text().splitlines(), 1):
            if line.strip():
                try:
                    metrics.append(json.loads(line))
                except ValueError:
                    raise UserError(f"{metrics_file}:{n} is not valid JSON") from None
    return Run(path.name, path, load_config(path / "config.yaml"), metrics, load_results(path))


def _row(run: Run) -> dict:
    """The table row of one run: name, model, training and evaluation figures (None when absent)."""
    from sessa_scale.models.registry import count_parameters

    cfg, m = run.config, run.metrics
    params = count_parameters(cfg.model)
    val = [r["val_loss"] for r in m if r.get("val_loss") is not None]
    speeds = [r["tokens_per_s"] for r in (m[1:] or m) if "tokens_per_s" in r]  # the first step includes warm-up
    row = {
        "run": run.name,
        "arch": cfg.model.arch,
        "params": params.total,
        "non_embedding_params": params.non_embedding,
        "steps": m[-1]["step"] if m else None,
        "tokens": m[-1]["tokens"] if m else None,
        "final_loss": m[-1]["loss"] if m else None,
        "final_val_loss": val[-1] if val else None,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
    }
    for name, r in sorted(run.results.items()):
        if "accuracy" in r:
            row[f"{name} acc"] = r["accuracy"]
        elif r.get("task") == "ppl":
            for x in r["lengths"]:
                row[f"{name} loss@{x['context_length']}"] = x["loss"]
        elif "beta" in r:
            row[f"{name} beta"] = r["beta"]
        elif r.get("task") == "lm-eval":  # the harness's "metric,filter" keys, stderrs left out
            for task, metrics in sorted(r["results"].items()):
                for key, value in metrics.items():
                    if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
                        row[f"{task} {key.replace(',none', '')}"] = value
    return row


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(run_dirs: list[str | Path], out: str | Path) -> dict:
    """Write the report for run_dirs into out; returns {"rows", "plots", "markdown"}."""
    from sessa_scale.evaluation.plots import plot_accuracy_vs_length, plot_influence, plot_loss_vs_tokens

    runs = [load_run(p) for p in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # same directory names under different parents: use the paths
        for r in runs:
            r.name = str(r.path)
    out = writable_dir(out, f"--out {out}")
    rows = [_row(r) for r in runs]
    plots = []
    if any(r.metrics for r in runs):
        plots.append(plot_loss_vs_tokens([(r.name, r.metrics) for r in runs], out / "loss_vs_tokens.png"))
    tasks: dict[str, list] = {}
    for r in runs:
        for name, result in r.results.items():
            if result.get("by_length"):
                tasks.setdefault(name, []).append((r.name, result))
    if tasks:
        plots.append(plot_accuracy_vs_length(tasks, out / "accuracy_vs_length.png"))
    probes = [(f"{r.name} ({res['target']})", res) for r in runs for res in r.results.values() if "beta" in res]
    if probes:
        plots.append(plot_influence(probes, out / "influence_vs_lag.png", "Influence vs lag"))
    text = "\n".join(
        [
            "# Run comparison",
            "",
            "Runs: " + ", ".join(f"`{r.path}`" for r in runs) + ".",
            "losses in nats/token; tokens/s: median over logged steps (first step excluded); `acc`: exact match; "
            "`beta`: fitted memory-tail exponent (influence ~ lag^-beta).",
            "",
            markdown_table(rows),
            "",
            *[f"![{p.stem}]({p.name})" for p in plots],
            "",
        ]
    )
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(rows, indent=1) + "\n")
    return {"rows": rows, "plots": [str(p) for p in plots], "markdown": text}
