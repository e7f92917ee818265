"""`sessa-scale bench parallel`: the report's arithmetic (loss agreement, bf16 noise bound, scaling,
resumes), its argument checks, and a real run on CPU (gloo, 2 processes, tiny model): dp=2 at ZeRO-1,
2 and 3 against one process, and a dp=2 checkpoint resumed on one process through the universal
checkpoint."""

import json
import os
from pathlib import Path

import pytest

from sessa_scale.bench.parallel import LAYOUTS, selected_layouts, summarize
from sessa_scale.cli import main
from sessa_scale.bench.communication import read_trace
from sessa_scale.training.profiling import trace_path
from tests.helpers import REPO_ROOT as ROOT


def _records(tok, loss_shift, mfu, steps=range(1, 11)):
    return [{"step": s, "loss": 5.0 - s / 10 + loss_shift, "tokens_per_s_per_gpu": tok, "tflops_per_gpu": tok / 1000,
             "mfu": mfu, "peak_mem_gib": 10.0 + s} for s in steps]  # fmt: skip


def _rows(report: str) -> dict[str, list[str]]:
    """Markdown table rows of `report` by their first cell."""
    rows = [line.strip("|").split("|") for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


def test_report_loss_agreement_bound_scaling_and_resumes():
    metrics = {
        "1 GPU": _records(1000.0, 0, 0.4),
        "1 GPU fp32": _records(500.0, 2e-3, 0.2),  # bf16 noise: delta 2e-3, bound 4e-3
        "dp=2 ZeRO-1": _records(950.0, 1e-3, 0.38),
        "tp=2+SP": _records(600.0, -5e-3, None),
        "dp=2 -> 1 GPU": _records(990.0, 1e-3, 0.4, steps=range(6, 11)),
    }
    communication = {"dp=2 ZeRO-1": {"communication_share": 0.125, "exposed_share": 0.02}, "tp=2+SP": None}
    report = summarize(metrics, communication, warmup=3, profile_step=4)
    rows = _rows(report)
    assert rows["dp=2 ZeRO-1"] == ["dp=2 ZeRO-1", "2", "1.00e-03", "yes", "950", "95.0%", "0.9", "38.0%", "20.0", "12.5%", "2.0%"]
    assert rows["tp=2+SP"][2:6] == ["5.00e-03", "NO", "600", "60.0%"] and rows["tp=2+SP"][7:] == [
        "n/a (unknown GPU)", "20.0", "n/a", "n/a"]  # fmt: skip
    assert rows["1 GPU fp32"][2:4] == ["2.00e-03", "(reference)"]
    assert "bf16 noise bound (2 x max |1-GPU bf16 loss - 1-GPU fp32 loss|): 4.00e-03" in report
    # continued steps 6-10: 1e-3 from the 1-GPU curve, 0 from the dp=2 run it resumed
    assert rows["dp=2 -> 1 GPU"] == ["dp=2 -> 1 GPU", "6-10", "1.00e-03", "yes", "0.00e+00"]
    without_fp32 = _rows(summarize({k: v for k, v in metrics.items() if k != "1 GPU fp32"}, {}, 3, 4))
    assert without_fp32["dp=2 ZeRO-1"][3] == "n/a" and without_fp32["dp=2 -> 1 GPU"][3] == "n/a"


def test_layout_selection_adds_the_reference_and_resume_sources():
    assert selected_layouts(["dp=2 -> 1 GPU"], "bf16") == ["1 GPU", "dp=2 ZeRO-1", "dp=2 -> 1 GPU"]
    assert selected_layouts(list(LAYOUTS), "bf16") == list(LAYOUTS)
    assert "1 GPU fp32" not in selected_layouts(list(LAYOUTS), "fp32")
    assert selected_layouts(["tp=2+SP -> 1 GPU", "dp=2 ZeRO-3"], "fp32") == ["1 GPU", "dp=2 ZeRO-3", "tp=2+SP", "tp=2+SP -> 1 GPU"]
    assert all(LAYOUTS[n].gpus == 1 for n in LAYOUTS if LAYOUTS[n].resumes)


def test_existing_run_directories_are_not_overwritten(tmp_path, capsys):
    (tmp_path / "gpu1").mkdir()
    assert main(["bench", "parallel", "--out", str(tmp_path), "--layouts", "1 GPU", "--steps", "4", "--resume-at", "4"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'gpu1'} already exist" in err and "pass a new --out" in err and "Traceback" not in err
    assert main(["bench", "parallel", "--out", str(tmp_path / "new"), "--layouts", "dp=2 -> 1 GPU", "--steps", "4",
                 "--resume-at", "4"]) == 2  # fmt: skip
    assert "--resume-at 4: must be a step in 1..3" in capsys.readouterr().err


SMALL = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=258", "data.corpus_bytes=200000",
    "data.num_workers=0", "optim.warmup_steps=2", "optim.decay_steps=10",
]  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow  # five training runs (three on 2 processes): ~2 minutes on 2 cores
def test_bench_parallel_on_cpu_zero_stages_and_a_dp2_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out, report_file = tmp_path / "bench", tmp_path / "report.md"
    rc = main([
        "bench", "parallel", "--config", str(ROOT / "configs" / "sessa" / "tiny.yaml"), "--steps", "4", "--warmup", "2",
        "--resume-at", "2", "--seq-len", "32", "--micro-batch-size", "4", "--precision", "fp32", "--out", str(out),
        "--report", str(report_file), "--layouts", "dp=2 ZeRO-2", "dp=2 ZeRO-3", "dp=2 -> 1 GPU",
        # 3000-element buckets: ZeRO-1 reduces several buckets of this small model while the backward pass runs
        "--set", *SMALL, "zero.reduce_bucket_size=3000",
    ])  # fmt: skip
    assert rc == 0
    rows = _rows(report_file.read_text())
    losses = {name: _losses(out / LAYOUTS[name].slug) for name in ("1 GPU", "dp=2 ZeRO-1", "dp=2 ZeRO-2", "dp=2 ZeRO-3", "dp=2 -> 1 GPU")}
    ref = losses["1 GPU"]
    assert sorted(ref) == [1, 2, 3, 4] and ref[4] < ref[1]
    for name in ("dp=2 ZeRO-1", "dp=2 ZeRO-2", "dp=2 ZeRO-3"):
        diff = max(abs(losses[name][s] - ref[s]) for s in ref)
        assert diff < 1e-5 and rows[name][2] == f"{diff:.2e}", name
        assert float(rows[name][9].rstrip("%")) > 0 and rows[name][10] == "n/a", name  # gloo collectives; no GPU timeline
    resumed = losses["dp=2 -> 1 GPU"]
    assert sorted(resumed) == [3, 4] and rows["dp=2 -> 1 GPU"][1] == "3-4"
    assert max(abs(resumed[s] - ref[s]) for s in resumed) < 1e-5
    assert (out / "dp2_zero1" / "checkpoints" / "step_00000002" / "universal").is_dir()
    # zero.overlap_comm: ZeRO-1's gradient reductions are issued while autograd runs, not after it
    # (the autograd pass: its node evaluations; the trainer's "backward" phase also holds DeepSpeed's post-backward
    # reduction, and with zero.overlap_comm=false all 15 collectives of this step come after the last node)
    events = read_trace(trace_path(out / "dp2_zero1", 3))
    nodes = [e for e in events if e["name"].startswith("autograd::engine::evaluate_function")]
    first, last = min(e["ts"] for e in nodes), max(e["ts"] + e["dur"] for e in nodes)
    assert any(first < e["ts"] < last for e in events if e["name"].startswith("c10d::"))
