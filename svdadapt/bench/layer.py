"""The `layer` suite: one wrapped linear's forward + backward against the frozen base layer and peft.

For each (shape, tokens, r, precision) every configuration runs in the same process on the same input
and output gradient: the base layer alone (x requires grad, weight frozen: what the adapter cannot
avoid), svdadapt's methods, and peft's LoRA and DoRA at the same rank. Times are medians of
per-repetition ratios to the base layer; memory is the peak of live tensor bytes of one step.

A precision (`svdadapt.bench.common.PRECISIONS`) sets the base weight's dtype (the adapter follows its
own rule: float32 factors on a low-precision base, as in training) or runs a float32 layer under
`torch.autocast`. Where the matmuls are emulated (bf16/fp16 on a CPU without native units) the plans
use smaller shapes, so a run finishes; those times say nothing about hardware with such units.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from svdadapt.bench.common import PRECISIONS, MiB, Precision, interleaved_ratios, peak_bytes, probe, synchronized

METHODS = ("lora", "dora", "pissa", "dude", "loraxs", "edora")
PEFT = ("peft_lora", "peft_dora")
# Mistral-7B's projections (out, in): q/o, k/v, gate/up, down
SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
# (shapes, tokens, ranks, reps): every shape at 256 tokens; 2048 tokens on the smallest shape only, since
# one 2048-token step of a 14336-wide projection takes seconds per configuration on 2 shared cores
FULL = (
    (SHAPES, (256,), (16, 64), 5),
    ((SHAPES[1],), (2048,), (16, 64), 3),
)
QUICK = (((SHAPES[1],), (256,), (16,), 5),)
# emulated low precision (bf16/fp16 on a CPU without native units): 3-10x slower than float32 here
FULL_EMULATED = (((SHAPES[1],), (256,), (16,), 3),)
QUICK_EMULATED = ((((1024, 1024),), (128,), (16,), 3),)


def _svdadapt_layer(base: nn.Linear, method: str, r: int, norm: str) -> nn.Module:
    import svdadapt

    model = nn.Sequential(base)
    cfg = svdadapt.AdapterConfig(method=method, r=r, target_modules=["0"], svd_solver="randomized", svd_cache_dir="", norm=norm)
    svdadapt.apply(model, cfg)
    return model


def _peft_layer(base: nn.Linear, r: int, dora: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=16, target_modules=["0"], use_dora=dora, lora_dropout=0.0)
    return get_peft_model(nn.Sequential(base), cfg)


def build(
    out_f: int,
    in_f: int,
    tokens: int,
    r: int,
    precision: Precision = PRECISIONS["fp32"],
    norm: str = "detached",
    seed: int = 0,
    device: str = "cpu",
):
    """Every configuration's module on one shared frozen weight; returns (modules, x, grad_y)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = precision.weights
    weight = nn.Parameter((torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(device, dtype), requires_grad=False)

    def linear(own: bool) -> nn.Linear:
        lin = nn.Linear(in_f, out_f, bias=False, device="meta")
        lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False) if own else weight
        return lin

    modules: dict[str, nn.Module] = {"base": linear(False)}
    for method in METHODS:
        own = method in ("pissa", "dude")  # residual methods rewrite their base weight
        modules[method] = _svdadapt_layer(linear(own), method, r, norm)
    modules["peft_lora"] = _peft_layer(linear(False), r, dora=False)
    modules["peft_dora"] = _peft_layer(linear(False), r, dora=True)
    x = torch.randn(tokens, in_f, generator=gen).to(device, dtype).requires_grad_(True)
    grad_y = torch.randn(tokens, out_f, generator=gen).to(device, precision.compute)  # the output's dtype
    return modules, x, grad_y


def stepper(
    module: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, precision: Precision = PRECISIONS["fp32"]
) -> Callable[[], None]:
    """Forward (under the precision's autocast, if any) + backward of `module` on x; clears every gradient it made."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        with precision.context(x.device.type):
            y = module(x)
        y.backward(grad_y.to(y.dtype))
        x.grad = None
        for p in params:
            p.grad = None

    return step


def flop_floor(config: str, out_f: int, in_f: int, tokens: int, r: int, norm: str = "detached") -> float | None:
    """The least time ratio to the base layer that arithmetic allows for an svdadapt method.

    The base step is 2·T·in·out multiply-adds (forward and input gradient). A method adds the
    low-rank path forward and the input gradient through it, 2·T·r·(in+out); the gradients of the
    factors that train, T·r·in for A and T·r·out for B (R's are T·r², negligible); and, when A trains
    under a magnitude, C = W Aᵀ afresh every step, out·in·r (twice with the exact norm's gradient).
    Elementwise work is left out, so a measured ratio sits above this floor.
    """
    if config not in METHODS:
        return None
    from svdadapt.methods import get_method

    m, t = get_method(config), tokens
    extra = 2 * t * r * (in_f + out_f)
    extra += t * r * in_f * ("A" in m.trainable) + t * r * out_f * ("B" in m.trainable)
    if m.magnitude and "A" in m.trainable:
        extra += out_f * in_f * r * (2 if norm == "exact" else 1)
    return 1 + extra / (2 * t * in_f * out_f)


def run_one(
    out_f: int,
    in_f: int,
    tokens: int,
    r: int,
    precision: Precision,
    reps: int,
    warmup: int,
    norm: str = "detached",
    clock: str = "wall",
    device: str = "cpu",
) -> list[dict]:
    """Rows of one setting: every configuration's time and peak-memory ratio to the base layer.

    A configuration whose step raises (e.g. a dtype a library cannot run) gets a row with the error
    instead of figures; the others are timed without it."""
    modules, x, grad_y = build(out_f, in_f, tokens, r, precision, norm, device=device)
    steps, failed = probe({name: synchronized(stepper(m, x, grad_y, precision), device) for name, m in modules.items()}, "base")
    timing = interleaved_ratios(steps, "base", reps, warmup, clock)
    peaks = {name: peak_bytes(step) for name, step in steps.items()}
    common = {"shape": f"{out_f}x{in_f}", "tokens": tokens, "r": r, "dtype": precision.label, "norm": norm, "device": device}
    rows = []
    for name in modules:
        row = {**common, "config": name, "flop_floor": flop_floor(name, out_f, in_f, tokens, r, norm)}
        if name in failed:
            rows.append({**row, "error": failed[name]})
            continue
        rows.append(
            {
                **row,
                "ms": timing[name]["ms"],
                "time_ratio": timing[name]["ratio"],
                "peak_mib": peaks[name] / MiB,
                "peak_ratio": peaks[name] / max(peaks["base"], 1),
                "ratios": timing[name]["ratios"],
            }
        )
    return rows


def add_peft_dora_over_dude(rows: list[dict]) -> None:
    """Add, to each setting's dude row, peft DoRA's time over svdadapt dude's (median of ratios)."""
    import statistics

    by = {}
    for row in rows:
        by.setdefault((row["shape"], row["tokens"], row["r"], row["dtype"], row["norm"]), {})[row["config"]] = row
    for group in by.values():
        if "ratios" in group.get("dude", {}) and "ratios" in group.get("peft_dora", {}):
            ratios = [p / d for p, d in zip(group["peft_dora"]["ratios"], group["dude"]["ratios"])]
            group["dude"]["peft_dora_over"] = statistics.median(ratios)


def plan_for(quick: bool, precision: Precision, device: str) -> tuple:
    """The settings to time: smaller ones where the precision's matmuls are emulated."""
    if precision.emulated(device):
        return QUICK_EMULATED if quick else FULL_EMULATED
    return QUICK if quick else FULL


def suite(quick: bool, precisions: list[Precision], log=print, clock: str = "wall", device: str = "cpu") -> list[dict]:
    rows: list[dict] = []
    for precision in precisions:
        for shapes, token_counts, ranks, reps in plan_for(quick, precision, device):
            for out_f, in_f in shapes:
                for tokens in token_counts:
                    for r in ranks:
                        got = run_one(out_f, in_f, tokens, r, precision, reps, warmup=1, clock=clock, device=device)
                        add_peft_dora_over_dude(got)
                        rows += got
                        log(_line(got))
    return rows


def _line(rows: list[dict]) -> str:
    head = rows[0]
    parts = " ".join(f"{r['config']}={r['time_ratio']:.3f}" if "error" not in r else f"{r['config']}=failed" for r in rows[1:])
    return f"layer {head['shape']} T={head['tokens']} r={head['r']} {head['dtype']}: base {head['ms']:.1f} ms; {parts}"
