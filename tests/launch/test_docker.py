"""docker/Dockerfile and docker/run.sh, checked without a Docker engine: the image starts from a pinned
NVIDIA PyTorch base and installs exactly the dependencies pyproject.toml declares (with every extra but the
test-only ones, so the GPU extras; nothing undeclared; NVIDIA's own builds kept); run.sh mounts the run directory where run.dir points
inside the image and starts one torchrun worker per GPU."""

import ast
import os
import re
import shlex
import subprocess
from fnmatch import fnmatch

import pytest

from tests.helpers import REPO_ROOT as REPO

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
DOCKERFILE = REPO / "docker" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TEST_ONLY_EXTRAS = {"dev"}
# pip options that take a value; -r/--requirement would install an undeclared list and is rejected.
PIP_VALUE_OPTIONS = {"-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-t", "--target"}


def _name(requirement: str) -> str:
    """Normalized project name of a PEP 508 requirement (PEP 503: lower case, runs of -_. -> -)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def _args() -> dict[str, str]:
    """Default values of the Dockerfile's ARGs."""
    return dict(shlex.split(rest)[0].split("=", 1) for i, rest in _instructions() if i == "ARG" and "=" in rest)


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def _pip_installs() -> list[tuple[int, list[str]]]:
    """(instruction index, argv after `pip install`) of every pip install in a RUN."""
    args, found = _args(), []
    for index, (instruction, rest) in enumerate(_instructions()):
        if instruction != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", _expand(rest, args)):
            words = shlex.split(command)
            for start in range(len(words) - 1):
                if words[start : start + 2] == ["pip", "install"]:
                    found.append((index, words[start + 2 :]))
    return found


def _targets(argv: list[str]) -> list[str]:
    targets, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in PIP_VALUE_OPTIONS:
            skip = True
        else:
            assert word not in ("-r", "--requirement", "-e", "--editable"), f"pip install {word} in the Dockerfile"
            if not word.startswith("-"):
                targets.append(word)
    return targets


def test_base_image_is_a_pinned_nvidia_pytorch_release():
    (base,) = [_expand(rest, _args()) for i, rest in _instructions() if i == "FROM"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", base), base


def test_image_installs_exactly_the_declared_dependencies_with_the_gpu_extras():
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    image_extras = set(extras) - TEST_ONLY_EXTRAS
    assert {"flash", "gpu"} <= image_extras
    declared |= {_name(r) for extra in image_extras for r in extras[extra]}

    installs = _pip_installs()
    assert installs, "the Dockerfile installs nothing with pip"
    for _, argv in installs:  # only the project itself: its dependencies come from its metadata
        assert all(re.fullmatch(r"\.(\[[\w,-]+\])?", t) for t in _targets(argv)), argv
    with_deps = [(i, argv) for i, argv in installs if "--no-deps" not in argv]
    assert len(with_deps) == 1, "exactly one pip install may resolve dependencies"
    index, argv = with_deps[0]
    (target,) = _targets(argv)
    assert set(re.findall(r"[\w-]+", target[1:])) == image_extras, f"{target}: expected {sorted(image_extras)}"
    assert "--no-build-isolation" in argv  # builds against the base image's torch, never a downloaded one

    # That install sees the metadata: pyproject.toml, setup.py and the files they reference are copied before it.
    copied = {w for i, rest in _instructions()[:index] if i == "COPY" for w in rest.split()[:-1]}
    assert {"pyproject.toml", "setup.py", PYPROJECT["project"]["readme"]} <= copied
    assert not PYPROJECT["project"].get("dynamic"), "dynamic metadata would need more files in that layer"

    base_packages = set(map(_name, _args()["BASE_PACKAGES"].split()))
    assert "torch" in base_packages and base_packages <= declared, base_packages
    assert any(i == "ENV" and "PIP_CONSTRAINT=" in rest for i, rest in _instructions())


def _package_folders() -> list[str]:
    """The folders setup.py installs as packages (its PACKAGE_DIRS literal)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    (value,) = [node.value for node in tree.body if isinstance(node, ast.Assign) and node.targets[0].id == "PACKAGE_DIRS"]
    return list(ast.literal_eval(value).values())


def test_dockerignore_keeps_what_the_package_and_configs_need():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"], "configs/sessa/tiny.yaml", "sessa_scale/cli.py"]
    needed += ["setup.py", *(f"{folder}/__init__.py" for folder in _package_folders())]
    for path in needed:
        assert not any(fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns), path


def test_run_script_mounts_the_run_directory_and_starts_torchrun(tmp_path):
    stub = tmp_path / "bin" / "docker"  # the engine is absent here: record the command line instead
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$DOCKER_ARGV"\n')
    stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{stub.parent}:{os.environ['PATH']}",
        "DOCKER_ARGV": str(tmp_path / "argv"),
        "RUNS": str(tmp_path / "runs"),
        "DATA": str(tmp_path),
    }
    config = "configs/sessa/125m.yaml"
    subprocess.run([str(REPO / "docker" / "run.sh"), config, "run.name=exp1"], env=env, check=True, cwd=tmp_path)
    argv = (tmp_path / "argv").read_text().splitlines()

    workdir = [rest for i, rest in _instructions() if i == "WORKDIR"][-1]
    assert f"{tmp_path / 'runs'}:{workdir}/runs" in argv and f"{tmp_path}:/data:ro" in argv
    assert (tmp_path / "runs").is_dir() and (REPO / config).is_file()  # the config ships in the image
    assert argv[argv.index("sessa-scale") + 1 :] == [
        "torchrun", "--standalone", "--nproc-per-node=gpu", "-m", "sessa_scale", "train", config, "run.name=exp1"
    ]
    assert {"--init", "--rm", "--ipc=host"} <= set(argv)
