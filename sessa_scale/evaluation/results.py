"""Where evaluation results live: RUN_DIR/eval/<name>.json, one JSON object per task (`eval`,
`probe`), which `sessa-scale report` reads back. Writes are atomic (write, then rename)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sessa_scale.errors import UserError

RESULTS_DIR = "eval"


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory that holds a checkpoint directory (RUN_DIR/checkpoints/step_N)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def save_result(run_dir: Path, name: str, result: dict) -> Path:
    """Write RUN_DIR/eval/<name>.json and return its path."""
    path = Path(run_dir) / RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_results(run_dir: Path) -> dict[str, dict]:
    """{name: result} for every RUN_DIR/eval/*.json (empty if the run has none)."""
    out = {}
    for path in sorted((Path(run_dir) / RESULTS_DIR).glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except ValueError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); delete it or rerun the evaluation that wrote it") from None
    return out
