"""`train.profile_step`: a torch.profiler trace of one real optimizer step of `sessa-scale train`.

The step runs exactly as the others (same engine, loader, precision, optimizer); rank 0 writes
RUN_DIR/profile/step_N.json (a Chrome/Perfetto trace: open it in https://ui.perfetto.dev) and
RUN_DIR/profile/step_N.txt (operators and kernels sorted by device time, and the step's phases:
the trainer's `forward`, `backward`, `clip_gradients` and `optimizer_step` ranges)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


@contextlib.contextmanager
def profile_step(step: int, wanted: int, run_dir: Path, write: bool, device: torch.device):
    """Profile the body of optimizer step `step` (1-based) when it is `wanted`; a no-op otherwise."""
    if step != wanted:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        yield
    if write:
        trace = trace_path(run_dir, step)
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        trace.with_suffix(".txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")


def trace_path(run_dir: Path, step: int) -> Path:
    """Where the trace of profiled step `step` is written: RUN_DIR/profile/step_N.json."""
    return Path(run_dir) / "profile" / f"step_{step}.json"


def phase(name: str):
    """A named range of the training step (visible in traces: forward, backward, ...)."""
    return torch.profiler.record_function(name)
