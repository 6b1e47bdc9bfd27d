"""scripts/gpu_check.sh: its argument checks, its refusal without a GPU, and its step accounting (with a
stand-in python that reports a GPU, so the script's own logic runs here)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def run(*args, env=None):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize("args", [[], ["a", "b"], ["--help"], [""]])
def test_wrong_arguments_print_the_usage_and_exit_2(args):
    res = run(*args)
    assert res.returncode == 2 and "usage: bash scripts/gpu_check.sh OUTDIR" in res.stderr


def test_an_outdir_that_is_a_file_or_not_empty_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    res = run(str(tmp_path / "f"))
    assert res.returncode == 2 and "not a directory" in res.stderr
    res = run(str(tmp_path))
    assert res.returncode == 2 and "is not empty" in res.stderr and (tmp_path / "f").read_text() == "x"


def test_a_bad_time_budget_is_refused(tmp_path):
    res = run(str(tmp_path / "out"), env={"GPU_CHECK_SECONDS": "9m"})
    assert res.returncode == 2 and "GPU_CHECK_SECONDS=9m" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_exits_3_and_says_so(tmp_path):
    res = run(str(tmp_path / "out"))
    assert res.returncode == 3 and "no usable CUDA GPU" in res.stderr


def _stand_in(tmp_path, failing: str) -> str:
    """A 'python' that claims a GPU and fails the step whose arguments contain `failing`."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\ncase "$*" in *"{failing}"*) echo failed; exit 1;; esac\necho "ran: $*"\n')
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.parametrize(("failing", "code"), [("no-such-step", 0), ("-m pytest", 1)])
def test_steps_are_logged_and_a_failed_step_makes_the_exit_1(tmp_path, failing, code):
    out = tmp_path / "out"
    res = run(str(out), env={"PYTHON": _stand_in(tmp_path, failing)})
    assert res.returncode == code, res.stdout + res.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["machine", "tests", "bench"]
    assert "-m pytest -q -m cuda" in (out / "tests.log").read_text() or failing == "-m pytest"
    assert "bench --quick" in (out / "bench.log").read_text()
