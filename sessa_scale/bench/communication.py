"""The share of a profiled training step spent in communication, from the Chrome trace that
`train.profile_step=N` writes on rank 0 (RUN_DIR/profile/step_N.json, sessa_scale/training/profiling.py).

    step_s                 wall time of the step: the extent of the trace, which covers one whole
                           optimizer step (forward, backward, optimizer step, the final device sync)
    communication_s        time during which at least one collective runs (intervals merged): on GPUs
                           the NCCL kernels' device time, on CPUs gloo's collective spans (from enqueue to
                           completion, on gloo's threads)
    communication_share    communication_s / step_s
    exposed_communication_s, exposed_share
                           the part of communication_s during which no other device work (compute
                           kernels, copies) runs: communication that overlap does not hide. GPUs only
                           (a CPU trace has no device timeline): None on CPUs
    collectives            number of collective events
"""

from __future__ import annotations

import json
from pathlib import Path

_DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def read_trace(path: Path) -> list[dict]:
    """The complete ("X") events of a Chrome trace written by torch.profiler."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def is_collective(event: dict) -> bool:
    """An NCCL kernel on a GPU, or a gloo collective's span on a CPU."""
    name = event.get("name", "")
    if event.get("cat") == "kernel":
        return "nccl" in name.lower()
    return name.startswith("gloo:")


def communication_summary(events: list[dict]) -> dict:
    """Communication time of the one profiled step in `events` (read_trace's list); see the module
    docstring for the fields. Times in seconds."""
    if not events:
        raise ValueError("the trace holds no events")
    spans = [_span(e) for e in events]
    window = (min(s for s, _ in spans), max(e for _, e in spans))
    comm = [_span(e) for e in events if is_collective(e)]
    comm_time = union(comm, window)
    exposed = None
    if any(e.get("cat") in _DEVICE_CATEGORIES for e in events):
        device_work = [_span(e) for e in events if e.get("cat") in _DEVICE_CATEGORIES and not is_collective(e)]
        exposed = length(subtract(comm_time, union(device_work, window)))
    step_us, comm_us = window[1] - window[0], length(comm_time)
    return {
        "step_s": step_us / 1e6,
        "communication_s": comm_us / 1e6,
        "communication_share": comm_us / step_us,
        "exposed_communication_s": None if exposed is None else exposed / 1e6,
        "exposed_share": None if exposed is None else exposed / step_us,
        "collectives": len(comm),
    }


def _span(event: dict) -> tuple[float, float]:
    return float(event["ts"]), float(event["ts"]) + float(event["dur"])


def union(intervals: list[tuple[float, float]], window: tuple[float, float]) -> list[tuple[float, float]]:
    """Sorted disjoint intervals covering the parts of `intervals` inside `window`."""
    merged: list[list[float]] = []
    for start, end in sorted((max(s, window[0]), min(e, window[1])) for s, e in intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def subtract(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of disjoint sorted intervals `a` not covered by disjoint sorted intervals `b`."""
    out, j = [], 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k, cursor = j, start
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                out.append((cursor, b[k][0]))
            cursor = b[k][1]
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)
