"""sessa_scale.bench.host_overhead runs end to end (on CPU: a check of the script, not a measurement)."""

from sessa_scale.bench import host_overhead


def test_report_on_cpu(tmp_path, capsys):
    out = tmp_path / "host.md"
    host_overhead.main(["--archs", "sessa", "--size", "tiny", "--seq-len", "8", "--calls", "2", "--device", "cpu",
                        "--gpu-busy-ms", "sessa=12.5", "--profile", "sessa", "--out", str(out)])
    report = out.read_text()
    row = next(line for line in report.splitlines() if line.startswith("| sessa |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[5] == "12.5"
    assert "host operators of one layer" in report
