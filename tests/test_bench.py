"""`svdadapt bench`: the CLI runs its --quick plan end to end and writes the JSON it documents.

The plans are shrunk to toy sizes here so the test is fast; what is checked is structure, the memory
meter against hand-counted allocations, and the bank hook, never a timing.
"""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from svdadapt import bench  # noqa: E402
from svdadapt.bench import common  # noqa: E402
from svdadapt.bench import init as init_suite  # noqa: E402
from svdadapt.bench import layer as layer_suite  # noqa: E402
from svdadapt.bench import model as model_suite  # noqa: E402

CONFIGS = {"base", "lora", "dora", "pissa", "dude", "loraxs", "edora", "peft_lora", "peft_dora"}


@pytest.fixture
def tiny_plans(monkeypatch):
    monkeypatch.setattr(layer_suite, "QUICK", ((((48, 64),), (8,), (4,), 2),))
    monkeypatch.setattr(layer_suite, "QUICK_EMULATED", ((((40, 56),), (8,), (4,), 2),))
    tiny = {
        "hidden": 64,
        "intermediate": 96,
        "layers": 1,
        "heads": 2,
        "kv_heads": 1,
        "batch": 1,
        "seq": 8,
        "ranks": (4,),
        "reps": 2,
    }
    monkeypatch.setattr(model_suite, "QUICK", tiny)
    monkeypatch.setattr(model_suite, "QUICK_EMULATED", {**tiny, "seq": 6})
    monkeypatch.setattr(init_suite, "QUICK", {"layers": 32, "timed_layers": 1, "scale": 64, "full_scale": 64, "r": 4})
    monkeypatch.setattr(init_suite, "ACCURACY_SHAPES_QUICK", ((96, 160),))
    monkeypatch.setattr(init_suite, "FINGERPRINT_SHAPES", ((64, 32),))
    real = init_suite.minilm_weights
    monkeypatch.setattr(init_suite, "minilm_weights", lambda: real()[:2])


def test_quick_run_writes_json_with_every_suite(tiny_plans, tmp_path, capsys, monkeypatch):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert (
        bench.cli(
            [
                "--quick",
                "--suite",
                "all",
                "--dtype",
                "fp32",
                "--device",
                "cpu",
                "--clock",
                "cpu",
                "--output",
                str(out),
                "--markdown",
                str(md),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert {"command", "quick", "machine", "layer", "model", "init", "bank", "targets", "seconds"} <= set(result)
    assert result["quick"] is True and result["machine"]["nproc"] >= 1

    layer = result["layer"]
    assert {r["config"] for r in layer} == CONFIGS
    for row in layer:
        assert {"shape", "tokens", "r", "dtype", "ms", "time_ratio", "peak_mib", "peak_ratio"} <= set(row)
        assert row["ms"] > 0 and row["peak_mib"] > 0
    base = next(r for r in layer if r["config"] == "base")
    assert base["time_ratio"] == 1.0 and base["peak_ratio"] == 1.0
    assert "peft_dora_over" in next(r for r in layer if r["config"] == "dude")

    model = result["model"]
    assert {r["config"] for r in model} == CONFIGS - {"base"}
    assert all(isinstance(r["within_budget"], bool) for r in model)
    counts = {r["config"]: r["trainable"] for r in model}
    assert counts["lora"] == counts["peft_lora"] and counts["dora"] == counts["peft_dora"]  # same rank, same targets

    init = result["init"]
    assert {"svdadapt_randomized", "peft_pissa_niter_4", "svdadapt_full"} <= set(init["timing"])
    errors = init["accuracy"]["rows"]
    assert any(r["matrix"].startswith("power law") for r in errors)
    assert all(0 <= r["rel_error"] < 2 for r in errors)
    (speed,) = init["fingerprint"]
    assert speed["shape"] == "64x32" and speed["mb"] == 64 * 32 * 2 / 1e6
    assert all(speed[k] > 0 for k in ("new_gb_s", "old_gb_s", "new_cpu_gb_s", "old_cpu_gb_s"))

    bank = result["bank"]["result"]
    assert bank["distinct_adapters_in_batch"] == bank["batch"] and bank["throughput_ratio"] > 0
    assert bank["bytes_per_adapter"] == bank["expected_bytes_per_adapter"] < bank["lora_bytes_per_adapter"]
    assert all({"target", "value", "met"} <= set(t) for t in result["targets"])
    # quick mode times small shapes: speed targets are labelled, memory and accuracy ones judged
    met = {t["target"]: t["met"] for t in result["targets"]}
    speed = [k for k in met if k.startswith(("layer ", "peft DoRA", "randomized init", "fingerprint", "generate "))]
    judged = [k for k in met if k.startswith(("model ", "randomized rel. error"))]
    assert speed and judged and len(speed) + len(judged) == len(met)
    assert all(met[k] == bench.QUICK_NOT_JUDGED for k in speed) and all(isinstance(met[k], bool) for k in judged)
    printed = capsys.readouterr().out
    assert "| out x in |" in printed and "| xxh3-128 (v2) |" in printed and md.read_text() == printed.rstrip("\n") + "\n"


def test_low_precision_run_has_rows_per_dtype_floors_and_the_emulation_note(tiny_plans, tmp_path, capsys):
    """bf16 weights and a float32 model under bf16 autocast next to float32 in one run; on a CPU
    without bf16 units the output says the matmuls are emulated and the emulated plan's (smaller)
    shape is used."""
    out = tmp_path / "bench.json"
    dtypes = "fp32,bf16,autocast-bf16"
    argv = ["--quick", "--suite", "layer,model", "--dtype", dtypes, "--device", "cpu", "--clock", "cpu", "--output", str(out)]
    assert bench.cli(argv) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["dtypes"] == dtypes.split(",")
    emulated = not common.native_cpu_dtype(torch.bfloat16)
    low = "40x56" if emulated else "48x64"
    layer = result["layer"]
    for label, shape in (("float32", "48x64"), ("bfloat16", low), ("autocast-bfloat16", low)):
        rows = [r for r in layer if r["dtype"] == label]
        assert {r["config"] for r in rows} == CONFIGS and {r["shape"] for r in rows} == {shape}
        assert all("error" not in r and r["ms"] > 0 for r in rows)
        for r in rows:  # every svdadapt row keeps its arithmetic floor, whatever the dtype
            assert (r["flop_floor"] is not None) == (r["config"] in layer_suite.METHODS)
    model = result["model"]
    labels = ("float32", "bfloat16", "autocast-bfloat16")
    assert {(r["dtype"], r["config"]) for r in model} == {(d, c) for d in labels for c in CONFIGS - {"base"}}
    assert all("error" not in r for r in model)
    printed = capsys.readouterr().out
    assert ("note: bf16: this CPU has no native bfloat16 arithmetic" in printed) == emulated
    assert ("note: autocast-bf16: this CPU has no native bfloat16 arithmetic" in printed) == emulated
    assert result["emulated"] == (list(labels[1:]) if emulated else [])
    assert any(t["target"].startswith("layer bfloat16") for t in result["targets"])


def test_autocast_runs_the_float32_layer_in_the_autocast_dtype():
    precision = common.PRECISIONS["autocast-bf16"]
    modules, x, grad_y = layer_suite.build(24, 32, 8, 4, precision)
    assert x.dtype == torch.float32 and grad_y.dtype == torch.bfloat16
    with precision.context("cpu"):
        assert modules["base"](x).dtype == torch.bfloat16 and modules["peft_lora"](x).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_a_configuration_that_raises_is_reported_and_the_rest_still_run():
    def broken():
        raise RuntimeError("self and mat2 must have the same dtype")

    ran, failed = common.probe({"ref": lambda: None, "ok": lambda: None, "bad": broken}, "ref")
    assert set(ran) == {"ref", "ok"} and failed == {"bad": "RuntimeError: self and mat2 must have the same dtype"}
    with pytest.raises(RuntimeError):
        common.probe({"ref": broken}, "ref")
    rows = [
        {"shape": "8x8", "config": "base", "ms": 1.0},
        {"shape": "8x8", "config": "lora", "error": "RuntimeError: bad\ntrace"},
    ]
    text = bench.render({"layer": rows})
    assert "| error |" in text and "| lora |" in text and text.rstrip().endswith("| RuntimeError: bad |")
    assert rows[1]["error"] == "RuntimeError: bad\ntrace"  # the result itself keeps the whole message


@pytest.mark.parametrize("argv", [["--suite", "layers"], ["--suite", ""], ["--threads", "0"], ["--dtype", "fp8"], ["--dtype", ""],
                                  ["--device", "nosuchdevice"]])  # fmt: skip
def test_bad_arguments_exit_2_and_say_why(argv, capsys):
    assert bench.cli(argv) == 2
    assert "svdadapt bench:" in capsys.readouterr().err


def test_peak_meter_counts_live_storages_not_views():
    def step():
        a = torch.empty(1000)  # 4000 bytes
        b = a * 2  # + 4000: 8000 live
        v = b[:10].view(2, 5)  # a view: nothing new
        del a
        c = b + v.sum()  # a's bytes are free again: 8000 live, plus a 4-byte scalar from sum
        return c

    assert common.peak_bytes(step) == 8004


def test_interleaved_ratios_reference_is_one():
    got = common.interleaved_ratios({"ref": lambda: None, "other": lambda: sum(range(100))}, "ref", reps=3, warmup=0)
    assert got["ref"]["ratio"] == 1.0 and len(got["other"]["ratios"]) == 3


def test_flop_floor_of_lora_is_what_peft_lora_executes():
    """The floor's count, checked against torch's flop counter on peft's LoRA (plain out-of-place
    matmuls: forward, input gradient, A and B gradients) and the base layer, at an odd shape."""
    from torch.utils.flop_counter import FlopCounterMode

    out_f, in_f, tokens, r = 40, 72, 24, 4
    modules, x, grad_y = layer_suite.build(out_f, in_f, tokens, r)
    flops = {}
    for name in ("base", "peft_lora"):
        with FlopCounterMode(display=False) as counter:
            layer_suite.stepper(modules[name], x, grad_y)()
        flops[name] = counter.get_total_flops()
    assert layer_suite.flop_floor("lora", out_f, in_f, tokens, r) == pytest.approx(flops["peft_lora"] / flops["base"], rel=1e-12)
    assert layer_suite.flop_floor("peft_lora", out_f, in_f, tokens, r) is None
    # a magnitude over a trained A adds C = W Aᵀ each step; frozen A, B (edora) add only the low-rank path
    assert layer_suite.flop_floor("dude", out_f, in_f, tokens, r) > layer_suite.flop_floor("pissa", out_f, in_f, tokens, r)
    low_rank = 2 * tokens * r * (in_f + out_f) / (2 * tokens * in_f * out_f)
    assert layer_suite.flop_floor("edora", out_f, in_f, tokens, r) == pytest.approx(1 + low_rank, rel=1e-12)
