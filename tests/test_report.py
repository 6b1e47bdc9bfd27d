"""`svdadapt report`: table values against independent medians, plots are real PNGs, bad input refused."""

from __future__ import annotations

import json
import math
import struct

import pytest

from svdadapt import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path, name, method, r, params, acc, seed, time_s=100.0, steps=20):
    """A synthetic run directory in the training module's metrics.json format."""
    d = tmp_path / name
    d.mkdir()
    log = [
        {
            "step": s,
            "loss": 2.0 * math.exp(-s / (8 + seed)) + 0.1,
            "grad_norm": 1.0 / (1 + s) + 0.01 * seed,
            "learning_rate": 1e-4,
            "epoch": s / steps,
        }
        for s in range(1, steps + 1)
    ]
    metrics = {
        "method": method,
        "r": r,
        "alpha": 16,
        "task": "rte",
        "model": "tiny-roberta",
        "trainable_params": params,
        "total_params": 1_000_000,
        "train_time_s": time_s,
        "train_steps": steps,
        "log_history": log,
        "eval_history": [{"step": steps, "accuracy": acc}],
        "final": {"accuracy": acc, "f1": acc - 0.05},
        "before": {"accuracy": 0.5},
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


@pytest.fixture
def runs(tmp_path):
    return [
        _run(tmp_path, "edora_s0", "edora", 16, 1_200, 0.70, 0, time_s=90.0),
        _run(tmp_path, "edora_s1", "edora", 16, 1_200, 0.74, 1, time_s=110.0),
        _run(tmp_path, "edora_s2", "edora", 16, 1_200, 0.71, 2, time_s=100.0),
        _run(tmp_path, "lora_s0", "lora", 8, 150_000, 0.66, 0),
    ]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR chunk
    return width, height, len(data)


def test_report_writes_table_and_plots(tmp_path, runs):
    out = tmp_path / "report"
    assert report.cli([str(r) for r in runs] + ["--output", str(out)]) == 0
    text = (out / "report.md").read_text()
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
        for line in text.splitlines()
        if line.startswith("| edora") or line.startswith("| lora")
    }
    # edora: three seeds -> median 0.71 of (0.70, 0.74, 0.71), spread min-max; time median 100
    assert rows["edora"][4] == "0.7100 (0.7000–0.7400)"
    assert rows["edora"][6] == "100.0 (90.0–110.0)"
    assert rows["edora"][7] == "3"
    assert rows["edora"][2] == "1,200" and rows["edora"][3] == f"{100 * 1200 / 1e6:.3f}"
    assert rows["lora"][4] == "0.6600" and rows["lora"][7] == "1"
    assert text.index("| edora") < text.index("| lora")  # sorted by trainable parameters
    for name in ("rte_accuracy_vs_params.png", "rte_f1_vs_params.png", "rte_loss.png", "rte_grad_norm.png"):
        width, height, size = _png_size(out / name)
        assert width >= 600 and height >= 400 and size > 15_000, (name, width, height, size)
        assert f"]({name})" in text


def test_curve_median_and_band(runs):
    loaded = [report.load_run(r) for r in runs]
    groups = report.group_runs(loaded)["rte"]
    steps, med, lo, hi = report._curve(groups[("edora", 16)], "loss")
    assert steps == list(range(1, 21))
    at5 = sorted(2.0 * math.exp(-5 / (8 + s)) + 0.1 for s in range(3))
    assert med[4] == pytest.approx(at5[1]) and lo[4] == pytest.approx(at5[0]) and hi[4] == pytest.approx(at5[2])


def test_bad_run_dirs(tmp_path, capsys):
    assert report.cli([str(tmp_path / "nope")]) == 2
    assert "metrics.json does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text(json.dumps({"method": "lora"}))
    with pytest.raises(ValueError, match=r"lacks \['r', 'trainable_params', 'final'\]"):
        report.load_run(bad)
