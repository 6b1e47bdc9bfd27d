"""`svdadapt report`: table values against independent medians, plots are real PNGs, bad input refused."""

from __future__ import annotations

import json
import math
import statistics
import struct
from pathlib import Path

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


def test_heldout_loss_curve(tmp_path):
    """Held-out losses (`eval_history`) get their own curve, with the same median and band as training logs."""
    dirs = []
    for seed, losses in enumerate([(1.4, 0.9, 0.8), (1.4, 1.0, 0.7), (1.4, 0.95, 0.9)]):
        d = _run(tmp_path, f"dude_s{seed}", "dude", 8, 2_000, 0.6, seed)
        m = json.loads((d / "metrics.json").read_text())
        m["eval_history"] = [{"step": s, "loss": v} for s, v in zip((0, 10, 20), losses)]
        (d / "metrics.json").write_text(json.dumps(m))
        dirs.append(d)
    groups = report.group_runs([report.load_run(d) for d in dirs])["rte"]
    steps, med, lo, hi = report._curve(groups[("dude", 8)], "loss", "eval_history")
    assert steps == [0, 10, 20]
    assert (
        med == pytest.approx([1.4, 0.95, 0.8]) and lo == pytest.approx([1.4, 0.9, 0.7]) and hi == pytest.approx([1.4, 1.0, 0.9])
    )
    out = tmp_path / "report"
    assert report.cli([str(d) for d in dirs] + ["--output", str(out)]) == 0
    width, height, size = _png_size(out / "rte_heldout_loss.png")
    assert width >= 600 and height >= 400 and size > 15_000
    assert "](rte_heldout_loss.png)" in (out / "report.md").read_text()


def test_no_heldout_loss_no_curve(tmp_path, runs):
    out = tmp_path / "report"
    assert report.cli([str(r) for r in runs] + ["--output", str(out)]) == 0  # eval_history has accuracy only
    assert not (out / "rte_heldout_loss.png").exists() and "(rte_heldout_loss.png)" not in (out / "report.md").read_text()


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
        for line in text.split("what to run")[0].splitlines()  # the tuned table, not the tables after it
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


def _claim_rows(text: str) -> dict[str, list[str]]:
    block = text.split(": the claims")[1].split("###")[0]
    return {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
        for line in block.splitlines()
        if line.startswith("| ")
    }


def _with(run: dict, **fields) -> dict:
    """Rewrite a run's metrics.json with extra fields and reload it."""
    path = Path(run["_dir"]) / "metrics.json"
    metrics = {**json.loads(path.read_text()), **fields}
    path.write_text(json.dumps(metrics))
    return report.load_run(run["_dir"])


def test_claims_verdicts_follow_the_intervals(tmp_path):
    gold = np.random.default_rng(0).integers(0, 2, 2000)

    def preds(share, seed):
        right = np.random.default_rng(seed).random(len(gold)) < share
        return np.where(right, gold, 1 - gold)

    def loss_curve(offset):
        return [{"step": s, "loss": 0.7 - 0.01 * s + offset, "epoch": s / 8} for s in range(1, 17)]

    runs = []
    for seed in range(3):
        same = preds(0.8, seed)
        runs.append(
            _with(_tuned(tmp_path, "lora", 1e-3, seed, 0.7, same, gold), adapter_params=20_000, log_history=loss_curve(0.0))
        )
        # edora answers exactly as lora: the difference and its interval are 0, inside the 1-point margin
        runs.append(
            _with(_tuned(tmp_path, "edora", 1e-2, seed, 0.7, same, gold), adapter_params=1_000, log_history=loss_curve(0.0))
        )
        # dude fits faster by 0.05 at every first-epoch step (steps 1-8), and slower afterwards
        curve = [{**e, "loss": e["loss"] - 0.05 if e["epoch"] <= 1 else e["loss"] + 1} for e in loss_curve(0.0)]
        runs.append(
            _with(
                _tuned(tmp_path, "dude", 1e-3, seed, 0.7, preds(0.8, 100 + seed), gold), adapter_params=21_000, log_history=curve
            )
        )
        runs.append(_with(_tuned(tmp_path, "edora_random", 1e-2, seed, 0.7, preds(0.5, 200 + seed), gold), adapter_params=1_000))
    out = tmp_path / "out"
    report.write_report([r["_dir"] for r in runs], out)
    rows = _claim_rows((out / "report.md").read_text())
    within = rows["EDoRA within 1 point of LoRA with ≥ 15× fewer parameters"]
    assert within[1].endswith("20.0× fewer adapter params") and within[2].startswith("+0.000 [+0.000, +0.000]")
    assert within[3] == "holds"
    assert rows["SVD frozen factors beat random ones (EDoRA Table 3)"][3] == "holds"  # 0.8 against 0.5 on 2,000 examples
    faster = rows["DuDe converges faster than LoRA"]
    assert faster[2].startswith("-0.050 [-0.050, -0.050]") and faster[3] == "holds"
    # equal rates: only where both arms ran at the search seed (dude and lora share 1e-3; edora and lora share none)
    assert faster[4] == "0.001: -0.050" and within[4] == "–"
    seed0 = {r["label"]: r["test"]["accuracy"] for r in runs if r["seed"] == 0}
    assert (
        rows["SVD frozen factors beat random ones (EDoRA Table 3)"][4] == f"0.01: {seed0['edora'] - seed0['edora_random']:+.3f}"
    )
    assert "PiSSA converges faster than LoRA" not in rows  # no pissa arm: the claim is not listed

    one_seed = [r for r in runs if r["seed"] == 0]
    report.write_report([r["_dir"] for r in one_seed], out)
    assert (
        _claim_rows((out / "report.md").read_text())["SVD frozen factors beat random ones (EDoRA Table 3)"][3]
        == "cannot tell (1 seed)"
    )


def test_verdicts():
    three = 3
    assert report.verdict("better", (0.02, 0.01, 0.03, three)) == "holds"
    assert report.verdict("better", (-0.02, -0.03, -0.01, three)) == "does not hold"
    assert report.verdict("better", (0.0, -0.01, 0.01, three)) == "cannot tell"
    assert report.verdict("within", (-0.005, -0.009, 0.0, three), ratio=20) == "holds"
    assert report.verdict("within", (-0.02, -0.04, -0.011, three), ratio=20) == "does not hold"
    assert report.verdict("within", (-0.01, -0.03, 0.01, three), ratio=20) == "cannot tell"
    assert report.verdict("within", (0.0, 0.0, 0.0, three), ratio=2.2) == "does not hold (parameter ratio)"
    assert report.verdict("faster", (-0.1, -0.2, -0.05, three)) == "holds"
    assert report.verdict("faster", (0.1, 0.05, 0.2, three)) == "does not hold"
    assert report.verdict("better", (0.1, 0.05, 0.2, 2)) == "cannot tell (2 seeds)"
    assert report.verdict("better", None) == "not run"


def test_sensitivity_rows(tmp_path):
    gold = [0, 1] * 50

    def right(k):  # predictions with k errors
        return [1 - g if i < k else g for i, g in enumerate(gold)]

    runs = [
        _tuned(tmp_path, "lora", 5e-4, 0, 0.60, right(30), gold),
        _tuned(tmp_path, "lora", 1e-3, 0, 0.70, right(20), gold),  # selected
        _tuned(tmp_path, "lora", 2e-3, 0, 0.65, right(10), gold),
        _tuned(tmp_path, "lora", 1e-3, 1, 0.99, right(50), gold),  # another seed: not part of the search
    ]
    text = report.sensitivity("rte", runs)
    row = next(line for line in text.splitlines() if line.startswith("| lora"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1:] == ["0.001", "0.700", "0.700 (0.0005) · 0.800 (0.001) · 0.900 (0.002)", "+0.100"]
