"""sessa_scale.bench.trace_gaps on a hand-built Chrome trace whose idle intervals are known."""

import json

import pytest

from sessa_scale.bench import trace_gaps


def _event(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}


@pytest.fixture
def trace(tmp_path):
    events = [
        _event("user_annotation", "forward", 0, 1000), _event("user_annotation", "backward", 1000, 2000),
        _event("cpu_op", "Outer", 0, 900), _event("cpu_op", "aten::mm", 100, 100),
        _event("cpu_op", "aten::item", 400, 300),
        _event("kernel", "k1", 150, 250), _event("kernel", "k2", 380, 40),  # overlapping: busy 150-420
        _event("kernel", "k3", 700, 200), _event("gpu_memcpy", "copy", 1500, 1400),
        _event("cuda_runtime", "cudaLaunchKernel", 140, 10),
        _event("cuda_runtime", "cudaStreamSynchronize", 420, 270),
        {"ph": "i", "name": "instant", "ts": 5},  # not a complete event: ignored
    ]
    path = tmp_path / "step_3.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_gaps_busy_time_and_attribution(trace):
    gaps, busy, first, last = trace_gaps.find_gaps(trace_gaps.load_trace(trace), min_us=20)
    assert (first, last) == (0, 2900)
    assert busy == pytest.approx(270 + 200 + 1400)  # the overlapping kernels count once
    assert [(g.start, g.end) for g in gaps] == [(900, 1500), (420, 700), (0, 150)]  # longest first
    sync = gaps[1]
    assert sync.phase == "forward"
    assert sync.host_ops == ("aten::item", "Outer")  # innermost first; phases are not operators
    assert sync.runtime_calls == (("cudaStreamSynchronize", 1, 270.0),)
    assert gaps[0].phase == "forward" and gaps[0].host_ops == ()


def test_min_us_drops_short_gaps_and_report_prints(trace, capsys):
    gaps, *_ = trace_gaps.find_gaps(trace_gaps.load_trace(trace), min_us=200)
    assert [g.length for g in gaps] == [600, 280]
    trace_gaps.main([str(trace), "--top", "2"])
    out = capsys.readouterr().out
    assert "device busy 1.9 ms, idle 1.0 ms" in out
    assert "cudaStreamSynchronize (1, 0.27)" in out


def test_a_trace_without_device_events_is_refused(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps([_event("cpu_op", "aten::mm", 0, 10)]))
    with pytest.raises(ValueError, match="no device events"):
        trace_gaps.find_gaps(trace_gaps.load_trace(path))
