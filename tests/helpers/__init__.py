"""Shared by tests of several folders (imported as tests.helpers.*; never collected)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_first_pythonpath() -> str:
    """PYTHONPATH for a subprocess that must import this checkout: REPO_ROOT, then the caller's entries."""
    return os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
