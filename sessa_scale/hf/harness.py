"""Scoring a model with EleutherAI's lm-evaluation-harness (`sessa-scale eval RUN --task lm-eval`):
the checkpoint is exported (sessa_scale/hf/export.py) to a temporary directory and run under the
harness's own `hf` model type, as `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`
would run it; nothing sessa_scale-specific sits between the harness and the transformers model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from sessa_scale.errors import UserError


def run_lm_eval(
    checkpoint: str | Path,
    tasks: list[str],
    include_path: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
) -> dict:
    """lm-evaluation-harness results of the model at `checkpoint` on `tasks` (task or group names;
    include_path: a directory of extra task YAMLs, e.g. local ones). Returns {"results", "n-samples",
    "versions", "higher_is_better", "lm_eval_version", "table"} (JSON values; "table": the harness's
    Markdown table)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise UserError('--task lm-eval needs lm-evaluation-harness: pip install -e ".[lm-eval]"') from None
    from sessa_scale.hf.export import export_model

    if not tasks:
        raise UserError("--task lm-eval needs --lm-eval-tasks NAME[,NAME...] (lm-evaluation-harness task or group names)")
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--lm-eval-include {include_path} is not a directory of lm-evaluation-harness task YAMLs")
    manager = None
    if include_path is not None:  # indexing the harness's own ~15k task files takes a minute: only when needed
        manager = TaskManager(include_path=include_path, include_defaults=False)
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"lm-evaluation-harness knows no task {', '.join(unknown)}; list them with `lm_eval ls tasks`"
            + ("" if include_path else ", or add a directory of task YAMLs with --lm-eval-include DIR")
        )
    with tempfile.TemporaryDirectory(prefix="sessa-scale-lm-eval-") as tmp:
        model_dir = Path(tmp) / "model"
        export_model(checkpoint, model_dir)
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "trust_remote_code": True, "dtype": "float32", "device": device},
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            log_samples=False,
        )
    keep = {key: out.get(key) for key in ("results", "n-samples", "versions", "higher_is_better")}
    result = json.loads(json.dumps(keep, default=str))  # numpy scalars and the like -> plain JSON
    return {**result, "lm_eval_version": lm_eval.__version__, "table": make_table(out)}
