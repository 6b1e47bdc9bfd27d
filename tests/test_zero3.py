"""ZeRO-3 through the library, without `svdadapt train`: apply, a DeepSpeed training step, save, load
onto a fresh partitioned model, and merge give what the same steps give without DeepSpeed.

The steps run in a subprocess (tests/zero3_steps.py: one CPU rank over gloo, a process group this
process should not inherit) and report, per step, the largest difference relative to the plain run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
TESTS = Path(__file__).parent
METHODS = ["lora", "dora", "pissa", "dude", "loraxs", "edora"]
ROUND_OFF = 1e-6  # float32: the closed-form and autograd paths differ in the last bits only


@pytest.mark.slow
def test_library_steps_on_a_zero3_model_equal_the_plain_run(tmp_path):
    out = tmp_path / "zero3.json"
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(TESTS / "zero3_steps.py"), str(out), ",".join(METHODS)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    assert set(result) == set(METHODS)
    bad = []
    for method, steps in result.items():
        assert steps["partitioned"] is True, f"{method}: the model was not built partitioned"
        for name, value in steps.items():
            values = value.items() if isinstance(value, dict) else [(name, value)]
            for what, v in values:
                ok = v is None or v is True or (isinstance(v, float) and v <= ROUND_OFF)
                if not ok:
                    bad.append(f"{method} {what}: {v}")
    assert not bad, "\n".join(bad)
