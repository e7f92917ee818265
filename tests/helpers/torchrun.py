"""Shared by the multi-process tests: run a worker script of tests/distributed/ under torchrun on CPU."""

import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run tests/distributed/<script> under torchrun on CPU (gloo); fail with its output if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO_ROOT))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}",
           str(REPO_ROOT / "tests" / "distributed" / script), *args]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{script} failed (rc {result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result
