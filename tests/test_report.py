"""`svdadapt report`: table values against independent medians, plots are real PNGs, bad input refused."""

from __future__ import annotations

import json
import math
import statistics
import struct

import numpy as np
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


# --- the tuned comparison --------------------------------------------------------------------


def _tuned(tmp_path, label, lr, seed, val_acc, pred, gold, val_loss=0.6, params=1_000):
    """A run with a held-out validation split: `final` is validation, `test` is dev with its predictions."""
    d = tmp_path / f"{label}-{lr:g}-{seed}"
    d.mkdir()
    pred, gold = list(pred), list(gold)
    metrics = {
        "label": label,
        "method": label,
        "r": 8,
        "task": "rte",
        "trainable_params": params,
        "learning_rate": lr,
        "seed": seed,
        "final": {"loss": val_loss, "accuracy": val_acc},
        "test": {"loss": 0.7, "accuracy": sum(p == g for p, g in zip(pred, gold)) / len(gold)},
        "test_predictions": {"predictions": "".join(map(str, pred)), "labels": "".join(map(str, gold))},
        "clipping": {"steps": 10, "clipped": seed, "max_grad_norm": 1.0},
        "train_cpu_s": 100.0,
        "log_history": [{"step": 1, "loss": 0.7}],
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    return report.load_run(d)


def test_selection_uses_the_search_seed_and_breaks_ties_by_loss(tmp_path):
    gold = [0, 1] * 5
    runs = [
        _tuned(tmp_path, "lora", 2e-4, 0, 0.60, gold, gold),
        _tuned(tmp_path, "lora", 1e-3, 0, 0.70, gold, gold, val_loss=0.65),
        _tuned(tmp_path, "lora", 2e-3, 0, 0.70, gold, gold, val_loss=0.55),
        _tuned(tmp_path, "lora", 2e-4, 1, 0.99, gold, gold),  # another seed: not part of the search
    ]
    rate, search = report.select_rate(runs, "accuracy")
    assert rate == 2e-3 and list(search) == [2e-4, 1e-3, 2e-3]


def test_paired_interval_matches_the_normal_approximation(tmp_path):
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 2, 3000)
    right_a, right_b = rng.random(3000) < 0.72, rng.random(3000) < 0.65
    pred_a, pred_b = np.where(right_a, gold, 1 - gold), np.where(right_b, gold, 1 - gold)
    a = {0: _tuned(tmp_path, "dude", 1e-3, 0, 0.7, pred_a, gold)}
    b = {0: _tuned(tmp_path, "lora", 1e-3, 0, 0.7, pred_b, gold)}
    d, lo, hi, seeds = report.paired_difference("rte", a, b, "accuracy", n_boot=1000)
    per_example = right_a.astype(float) - right_b.astype(float)
    se = per_example.std(ddof=1) / np.sqrt(len(gold))
    assert d == pytest.approx(per_example.mean()) and seeds == 1
    assert lo == pytest.approx(d - 1.96 * se, abs=0.15 * se * 1.96) and hi == pytest.approx(d + 1.96 * se, abs=0.15 * se * 1.96)
    assert report.paired_difference("rte", a, a, "accuracy", n_boot=50)[:3] == (0.0, 0.0, 0.0)
    other = {0: _tuned(tmp_path, "pissa", 1e-3, 0, 0.7, pred_b[:10], gold[:10])}
    with pytest.raises(ValueError, match="dev labels differ"):
        report.paired_difference("rte", a, other, "accuracy", n_boot=10)


def test_tuned_report_rows(tmp_path):
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 200)

    def preds(share, seed):
        right = np.random.default_rng(seed).random(200) < share
        return np.where(right, gold, 1 - gold)

    runs = [_tuned(tmp_path, "lora", lr, 0, v, preds(0.6, 9), gold) for lr, v in ((5e-4, 0.60), (1e-3, 0.62))]
    runs += [_tuned(tmp_path, "lora", 1e-3, s, 0.6, preds(0.6, 10 + s), gold) for s in (1, 2)]
    runs += [_tuned(tmp_path, "edora", lr, 0, v, preds(0.9, 20), gold) for lr, v in ((1e-3, 0.55), (3e-3, 0.58), (1e-2, 0.50))]
    runs += [_tuned(tmp_path, "edora", 3e-3, s, 0.6, preds(0.9, 20 + s), gold) for s in (1, 2)]
    out = tmp_path / "out"
    report.write_report([r["_dir"] for r in runs], out)
    text = (out / "report.md").read_text()
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
        for line in text.split("every run")[0].splitlines()  # the tuned table, not the list of runs
        if line.startswith("| ")
    }
    dev = {
        name: [r["test"]["accuracy"] for r in runs if r["label"] == name and r["learning_rate"] == lr]
        for name, lr in (("lora", 1e-3), ("edora", 3e-3))
    }
    assert rows["lora"][3] == "0.001 (edge)" and rows["edora"][3] == "0.003"
    assert (
        rows["edora"][4] == "3"
        and rows["edora"][5] == f"{statistics.mean(dev['edora']):.3f} ± {statistics.stdev(dev['edora']):.3f}"
    )
    diff = statistics.mean(dev["edora"]) - statistics.mean(dev["lora"])
    assert rows["edora"][6].startswith(f"{diff:+.3f} [") and rows["edora"][6].endswith("* (n=3)")  # 0.9 vs 0.6: significant
    assert rows["lora"][6] == "–" and rows["lora"][7] == "10%"  # clipped 0 + 1 + 2 of 3 x 10 steps
    assert "1e-03" not in text and "0.001: 0.620" in rows["lora"][2]
    assert (out / "rte_val_vs_lr.png").read_bytes()[:8] == PNG_MAGIC
