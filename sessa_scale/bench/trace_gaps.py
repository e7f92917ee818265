"""Where a profiled training step leaves the GPU idle (a diagnostic).

Reads the Chrome trace that `train.profile_step=N` writes (RUN_DIR/profile/step_N.json) and prints,
as Markdown: the step's span, the device's busy and idle time, idle time per trainer phase
(`forward`, `backward`, `clip_gradients`, `optimizer_step`), and the longest idle intervals, each with
the host operators running when it began and the CUDA runtime calls made during it (a
`cudaStreamSynchronize` or `cudaMemcpy` there means the host waited on the device; a stream of
`cudaLaunchKernel` means the host was too slow to keep it fed).

    python3 -m sessa_scale.bench.trace_gaps RUN_DIR/profile/step_10.json [--top 12] [--min-us 20]

Times in the trace are microseconds; the tables print milliseconds.
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"cpu_op", "user_annotation"}
RUNTIME_CATEGORIES = {"cuda_runtime", "cuda_driver"}
PHASES = ("forward", "backward", "clip_gradients", "optimizer_step")


@dataclass(frozen=True)
class Span:
    """One trace event: name, start and end in microseconds."""

    name: str
    start: float
    end: float


@dataclass(frozen=True)
class Gap:
    """An interval with no device activity, and what the host did then."""

    start: float
    end: float
    phase: str
    host_ops: tuple[str, ...]  # innermost first
    runtime_calls: tuple[tuple[str, int, float], ...]  # (name, calls, microseconds), most time first

    @property
    def length(self) -> float:
        return self.end - self.start


def load_trace(path: Path) -> dict[str, list[Span]]:
    """The trace's complete events by kind: "device", "host", "runtime" (each sorted by start)."""
    events = json.loads(Path(path).read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    kinds: dict[str, list[Span]] = {"device": [], "host": [], "runtime": []}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        cat = e.get("cat", "")
        kind = ("device" if cat in DEVICE_CATEGORIES else "host" if cat in HOST_CATEGORIES
                else "runtime" if cat in RUNTIME_CATEGORIES else None)
        if kind:
            start = float(e["ts"])
            kinds[kind].append(Span(e.get("name", "?"), start, start + float(e["dur"])))
    for spans in kinds.values():
        spans.sort(key=lambda s: s.start)
    return kinds


def busy_intervals(device: list[Span]) -> list[tuple[float, float]]:
    """The union of the device events' intervals, sorted and disjoint."""
    merged: list[list[float]] = []
    for s in device:
        if merged and s.start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s.end)
        else:
            merged.append([s.start, s.end])
    return [(a, b) for a, b in merged]


def _innermost(host: list[Span], starts: list[float], t: float, n: int = 3, lookback: int = 5000) -> tuple[str, ...]:
    """Names of up to n host operators that contain time t, innermost (shortest) first; operators
    are searched among the `lookback` last ones started before t."""
    i = bisect.bisect_right(starts, t)
    covering = [s for s in host[max(0, i - lookback):i] if s.end > t and s.name not in PHASES]
    return tuple(s.name for s in sorted(covering, key=lambda s: s.end - s.start)[:n])


def _runtime_calls(runtime: list[Span], starts: list[float], a: float, b: float) -> tuple[tuple[str, int, float], ...]:
    """The 3 CUDA runtime calls that took most host time in [a, b): (name, calls, microseconds)."""
    calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for s in runtime[bisect.bisect_left(starts, a):bisect.bisect_left(starts, b)]:
        calls[s.name][0] += 1
        calls[s.name][1] += min(s.end, b) - s.start
    return tuple(sorted(((n, int(c), t) for n, (c, t) in calls.items()), key=lambda x: -x[2])[:3])


def find_gaps(kinds: dict[str, list[Span]], min_us: float = 20.0, detailed: int = 12) -> tuple[list[Gap], float, float, float]:
    """-> (idle intervals of at least min_us, longest first, busy us, span start, span end). The span
    runs from the first host operator (or device event) to the last device event; the `detailed`
    longest gaps carry their host operators and runtime calls."""
    busy = busy_intervals(kinds["device"])
    if not busy:
        raise ValueError("the trace has no device events (kernels, copies): was it a CUDA run?")
    host, runtime = kinds["host"], kinds["runtime"]
    first = min([busy[0][0]] + [s.start for s in host[:1]])
    edges = [(first, busy[0][0])] + [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)]
    edges = sorted((e for e in edges if e[1] - e[0] >= min_us), key=lambda e: e[0] - e[1])
    phases = sorted((s for s in host if s.name in PHASES), key=lambda p: p.end - p.start)  # innermost first
    host_starts, runtime_starts = [s.start for s in host], [s.start for s in runtime]
    gaps = []
    for k, (a, b) in enumerate(edges):
        phase = next((p.name for p in phases if p.start <= a < p.end), "-")
        detail = k < detailed
        gaps.append(Gap(a, b, phase, _innermost(host, host_starts, a) if detail else (),
                        _runtime_calls(runtime, runtime_starts, a, b) if detail else ()))
    return gaps, sum(b - a for a, b in busy), first, busy[-1][1]


def report(path: Path, top: int = 12, min_us: float = 20.0) -> str:
    """The Markdown report of one trace."""
    gaps, busy_us, first, last = find_gaps(load_trace(path), min_us, top)
    span_us = last - first
    idle_us = span_us - busy_us
    per_phase: Counter = Counter()
    for g in gaps:
        per_phase[g.phase] += g.length
    lines = [f"### {path}", "",
             f"step span {span_us / 1e3:.1f} ms: device busy {busy_us / 1e3:.1f} ms, idle {idle_us / 1e3:.1f} ms "
             f"({100 * idle_us / span_us:.1f}%); idle in {len(gaps)} gaps >= {min_us:g} us by phase: "
             + ", ".join(f"{p} {t / 1e3:.1f} ms" for p, t in per_phase.most_common()), "",
             "| at ms | idle ms | phase | host operators (innermost first) | runtime calls in the gap (calls, ms) |",
             "|---|---|---|---|---|"]
    for g in gaps[:top]:
        calls = "; ".join(f"{n} ({c}, {t / 1e3:.2f})" for n, c, t in g.runtime_calls) or "-"
        lines.append(f"| {(g.start - first) / 1e3:.1f} | {g.length / 1e3:.2f} | {g.phase} | "
                     f"{' < '.join(g.host_ops) or '-'} | {calls} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+", type=Path, help="Chrome traces written by train.profile_step")
    ap.add_argument("--top", type=int, default=12, help="longest idle intervals listed per trace")
    ap.add_argument("--min-us", type=float, default=20.0, help="shortest idle interval counted, microseconds")
    args = ap.parse_args(argv)
    for path in args.traces:
        print(report(path, args.top, args.min_us))


if __name__ == "__main__":
    main()
