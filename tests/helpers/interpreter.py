"""Shared by the Triton kernel tests: run a test file's CPU-interpreter worker (the file itself with
``--interp-worker ARGS``) in a fresh Python process with TRITON_INTERPRET=1, which must be set before
any kernel is decorated, so that the checks do not depend on what this pytest session imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import repo_first_pythonpath


def run_interpreter_worker(test_file: str, *args: str, timeout: int = 900) -> str:
    """The worker's stdout; fails the calling test with the worker's output when it exits non-zero."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": repo_first_pythonpath()}
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve()), "--interp-worker", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout
