"""Shared by tests of several folders (imported as tests.helpers.*; never collected)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
