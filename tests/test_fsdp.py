"""FSDP2 through the library: apply, then `fully_shard`, train on 2 CPU ranks and `save_adapter` on every
rank give the adapter the same steps give in one process; a sharded model is refused by apply, load_adapter
and merge, naming FSDP.

The steps run under torchrun (tests/fsdp_steps.py: 2 ranks over gloo) and report, per method, the
largest differences relative to the one-process run.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
METHODS = ["lora", "dora", "pissa", "dude", "loraxs", "edora"]
ROUND_OFF = 1e-6  # float32: two ranks reduce the gradient in another order than one process sums it


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_fsdp2_ranks_save_the_adapter_one_process_trains(tmp_path):
    out = tmp_path / "fsdp.json"
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port())]
    proc = subprocess.run(
        [*cmd, str(TESTS / "fsdp_steps.py"), str(out), ",".join(METHODS)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    assert set(result) == set(METHODS)
    for method, r in result.items():
        assert "error" not in r, f"{method}: {r.get('error')}"
        assert r["types"] == ["DTensor"], f"{method}: fully_shard left parameters unsharded: {r['types']}"
        assert r["moved"] > 0.05, f"{method}: training barely moved the adapter ({r['moved']:.3g}): nothing compared"
        for what in ("saved full", "saved compact", "reloaded logits", "sharded eval logits"):
            assert r[what] <= ROUND_OFF, f"{method} {what}: {r[what]:.3g} relative to the one-process run"
        for what in ("load_adapter", "merge"):
            assert r[what] and r[what].startswith(f"ValueError: {what}: ") and "FSDP (fully_shard)" in r[what], r[what]
