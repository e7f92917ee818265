"""Shared by the Triton kernels' CPU tests: run a test file's interpreter worker in a subprocess with
TRITON_INTERPRET=1 (kernels run on the CPU, fp32/fp64) and this checkout first on PYTHONPATH."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreter_worker(test_file: str, dtype: str) -> str:
    """Run `python TEST_FILE --interp-worker DTYPE`; returns its stdout, asserting it exited 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve()), "--interp-worker", dtype],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout
