"""The communication share of a profiled step, from its Chrome trace (sessa_scale/bench/communication.py)."""

import random

import pytest

from sessa_scale.bench.communication import communication_summary, length, subtract, union


def _cells(intervals, window) -> set[int]:
    """Unit cells [k, k+1) covered by integer intervals, inside `window`: an independent measure."""
    return {k for s, e in intervals for k in range(max(s, window[0]), min(e, window[1]))}


def test_interval_union_and_subtract_match_a_cell_count():
    rng = random.Random(0)
    for _ in range(300):
        a = [(s, s + rng.randint(0, 12)) for s in (rng.randint(0, 50) for _ in range(rng.randint(0, 6)))]
        b = [(s, s + rng.randint(0, 12)) for s in (rng.randint(0, 50) for _ in range(rng.randint(0, 6)))]
        lo = rng.randint(0, 30)
        window = (lo, lo + rng.randint(1, 40))
        ua, ub = union(a, window), union(b, window)
        assert length(ua) == len(_cells(a, window))
        assert all(s < e for s, e in ua) and all(e1 < s2 for (_, e1), (s2, _) in zip(ua, ua[1:]))  # disjoint, sorted
        assert length(subtract(ua, ub)) == len(_cells(a, window) - _cells(b, window))


def _event(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_gpu_trace_communication_and_exposed_share():
    events = [
        _event("PyTorch Profiler (0)", 1000, 1000, "Trace"),  # the profiled step: 1000-2000 us
        _event("backward", 1050, 700, "user_annotation"),
        _event("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 1100, 200),
        _event("ncclDevKernel_AllGather_RING_LL", 1250, 100),  # overlaps the all-reduce: counted once
        _event("sm90_xmma_gemm_bf16bf16_bf16f32", 1000, 200),  # compute hiding 1100-1200
        _event("Memcpy DtoD (Device -> Device)", 1300, 20, "gpu_memcpy"),  # device work hiding 1300-1320
        _event("ncclKernel_ReduceScatter", 1900, 100),
        _event("c10d::allreduce_", 1090, 5, "cpu_op"),  # the host-side launch: not device time
    ]
    summary = communication_summary(events)
    # communication: 1100-1350 and 1900-2000 = 350 us; exposed: 1200-1300, 1320-1350, 1900-2000 = 230 us
    assert summary["step_s"] == pytest.approx(1e-3)
    assert summary["communication_s"] == pytest.approx(350e-6) and summary["communication_share"] == pytest.approx(0.35)
    assert summary["exposed_communication_s"] == pytest.approx(230e-6) and summary["exposed_share"] == pytest.approx(0.23)
    assert summary["collectives"] == 3


def test_cpu_trace_counts_gloo_spans_and_has_no_exposed_share():
    events = [
        _event("aten::mm", 0, 100, "cpu_op"),
        _event("c10d::allreduce_", 10, 1, "cpu_op"),
        _event("gloo:all_reduce", 10, 30, "user_annotation"),
    ]
    summary = communication_summary(events)
    assert summary["communication_share"] == pytest.approx(0.3) and summary["collectives"] == 1
    assert summary["exposed_share"] is None
    with pytest.raises(ValueError, match="no events"):
        communication_summary([])
