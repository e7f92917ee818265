"""PNG plots of evaluation results (matplotlib, headless Agg backend).

Each function takes one entry per run or curve as (label, data) and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_influence(curves: list[tuple[str, dict]], path: str | Path, title: str = "Memory tail") -> Path:
    """Log-log influence vs lag; each probe result ({"lags", "influence", "beta", "fit_range",
    "log_prefactor"}) drawn as points with its fitted power law over the fit range (dashed), and a
    result's "reference" curve ({"lags", "influence"}, e.g. a closed form) as a thin line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (label, r) in enumerate(curves):
        color = f"C{i}"
        if "reference" in r:
            ref = r["reference"]
            ax.loglog(ref["lags"], ref["influence"], "-", lw=3, color="0.75", label=ref.get("label", "reference"), zorder=1)
        lags, infl = np.asarray(r["lags"], dtype=float), np.asarray(r["influence"], dtype=float)
        keep = infl > 0
        lo, hi = r["fit_range"]
        ax.loglog(lags[keep], infl[keep], "o", ms=3.5, color=color, zorder=3,
                  label=f"{label}: beta = {r['beta']:.3f} (fit over lags {lo}-{hi})")
        xs = np.geomspace(lo, hi, 20)
        ax.loglog(xs, np.exp(r["log_prefactor"]) * xs ** (-r["beta"]), "--", lw=1.4, color=color, zorder=2)
    ax.set_xlabel("lag l (tokens)")
    ax.set_ylabel(r"influence $\|\partial y_{j+l} / \partial x_j\|_F \,/\, \sqrt{D}$")
    ax.set_title(title + " (dashed: fitted power law)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_vs_tokens(runs: list[tuple[str, list[dict]]], path: str | Path) -> Path:
    """Training loss (light: per step; solid: moving average) and validation loss (markers)
    against tokens seen, from metrics.jsonl records."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (label, records) in enumerate(runs):
        color = f"C{i}"
        tokens = np.array([r["tokens"] for r in records], dtype=float)
        loss = np.array([r["loss"] for r in records], dtype=float)
        if len(loss) == 0:
            continue
        window = max(1, len(loss) // 25)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(tokens, loss, color=color, alpha=0.2, lw=0.8)
        ax.plot(tokens[window - 1 :], smooth, color=color, lw=1.6, label=f"{label} (train)")
        val = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "s", color=color, ms=4, label=f"{label} (val)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss vs tokens", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# marker, line style and size per run, so that runs with equal accuracies stay visible on top of each other
_RUN_STYLES = (("o", "-", 7), ("s", "--", 5.5), ("^", ":", 4.5), ("D", "-.", 3.5), ("v", (0, (1, 3)), 3))


def plot_accuracy_vs_length(tasks: dict[str, list[tuple[str, dict]]], path: str | Path) -> Path:
    """One panel per task: exact-match accuracy vs the records' context length (characters of the
    prompt, as the tasks measure it) for each run, from eval results with "by_length" (and the task's
    chance level, dotted, when known). Each run has its own marker, line style and marker size, so
    equal curves do not hide each other."""
    names = sorted(tasks)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        chance = None
        for i, (label, r) in enumerate(tasks[name]):
            pts = r["by_length"]
            marker, style, size = _RUN_STYLES[i % len(_RUN_STYLES)]
            ax.plot([p["length"] for p in pts], [p["accuracy"] for p in pts], marker=marker, ls=style, ms=size,
                    mfc="none" if i else None, color=f"C{i}", label=label)  # fmt: skip
            chance = r.get("chance", chance)
        if chance is not None:
            ax.axhline(chance, ls=":", color="gray", label=f"chance ({chance:.3g})")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("context length (characters; = tokens for byte-level models)")
        ax.set_ylabel("exact-match accuracy")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
