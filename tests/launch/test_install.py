"""Installation as the README describes it: the README opens with the train command and the test
command, CI (.ci/run) runs the README's test command verbatim, and triton is not a dependency of
CPU installs (only of the test and GPU extras)."""

import re

import pytest

from tests.helpers import REPO_ROOT as REPO

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_command_verbatim():
    opening = re.match(r"# sessa_scale\n\n```bash\n(.*?)\n```\n", (REPO / "README.md").read_text(), re.S)
    assert opening, "README.md must open with a bash block of the install/train and install/test commands"
    train, test = opening.group(1).splitlines()
    assert train.startswith("python3 -m pip install -e . && ") and train.endswith("sessa-scale train")
    assert test.startswith('python3 -m pip install -e ".[dev]" && ') and "pytest" in test
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == test


def test_triton_comes_with_the_test_and_gpu_extras_not_with_the_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = lambda requirement: re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()  # noqa: E731
    assert "triton" not in map(name, project["dependencies"])
    for extra in ("dev", "gpu"):
        assert "triton" in map(name, project["optional-dependencies"][extra]), extra
