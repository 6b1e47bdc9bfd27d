"""The `compile` and `generate` suites: a compiled training step against eager, and unmerged generation
against merged, each a ratio to its reference measured in the same process (`svdadapt.bench.common`).

- compile: one forward + backward of the model suite's Llama per method, `torch.compile(model)`
  (inductor) against the same model eager; the first compiled call (compilation) is reported apart.
- generate: greedy `generate` of a small Llama with an applied adapter in eval mode, against the same
  adapter merged into plain layers: the first call (which computes g = m / n once) and the steady state.
"""

from __future__ import annotations

import copy
import time

import torch

from svdadapt.bench.common import PRECISIONS, Precision, interleaved_ratios, synchronized
from svdadapt.bench.model import QUICK, QUICK_EMULATED, adapted, base_model

COMPILE_METHODS = ("lora", "dude", "edora")
GENERATE_METHODS = ("dude", "edora", "dora")


def compile_suite(
    quick: bool, log=print, clock: str = "wall", precisions=(PRECISIONS["fp32"],), device: str = "cpu"
) -> list[dict]:
    rows = []
    for precision in precisions:
        plan = QUICK_EMULATED if precision.emulated(device) else QUICK
        plan = {**plan, "seq": plan["seq"] if quick else 2 * plan["seq"]}
        model = base_model(plan, precision=precision, device=device)
        ids = torch.randint(0, 2048, (plan["batch"], plan["seq"]), generator=torch.Generator().manual_seed(1)).to(device)
        for name in COMPILE_METHODS:
            eager = adapted(model, name, 16)
            compiled = torch.compile(eager)
            steps = {
                "eager": _train_step(eager, ids, precision, device),
                "compiled": _train_step(compiled, ids, precision, device),
            }
            torch._dynamo.reset()
            t0 = time.perf_counter()
            steps["compiled"]()
            first = time.perf_counter() - t0
            timing = interleaved_ratios(steps, "eager", 3 if quick else 7, warmup=1, clock=clock)
            row = {"dtype": precision.label, "device": device, "tokens": ids.numel(), "config": name, "eager_ms": timing["eager"]["ms"],
                   "compiled_ms": timing["compiled"]["ms"], "ratio": timing["compiled"]["ratio"], "compile_s": first}  # fmt: skip
            rows.append(row)
            log(f"compile {precision.label} {name}: compiled / eager = {row['ratio']:.3f} (first call {first:.1f} s)")
    return rows


def _train_step(model, ids, precision: Precision, device: str):
    def step() -> None:
        with precision.context(ids.device.type):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return synchronized(step, device)


def generate_suite(quick: bool, log=print, clock: str = "wall", device: str = "cpu") -> list[dict]:
    import svdadapt

    plan = {**QUICK, "layers": 2 if quick else 4}
    model = base_model(plan, device=device).eval()
    prompt = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(2)).to(device)
    new_tokens = 16 if quick else 32

    def generator(m):
        return synchronized(
            lambda: m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False), device
        )

    generator(model)()  # warm the base model's kernels, so neither side's first call pays for them
    rows = []
    for name in GENERATE_METHODS:
        unmerged = adapted(model, name, 16).eval()
        with torch.no_grad():  # move every factor off its start: g = m / n then differs from 1
            for p in unmerged.parameters():
                if p.requires_grad:
                    p.mul_(1.01)
        merged = svdadapt.merge(copy.deepcopy(unmerged)).eval()
        steps = {"merged": generator(merged), "unmerged": generator(unmerged)}
        first = {}
        for key in ("merged", "unmerged"):
            t0 = time.perf_counter()
            steps[key]()
            first[key] = time.perf_counter() - t0
        timing = interleaved_ratios(steps, "merged", 3 if quick else 7, warmup=0, clock=clock)
        row = {"config": name, "new_tokens": new_tokens, "merged_ms": timing["merged"]["ms"], "unmerged_ms": timing["unmerged"]["ms"],
               "ratio": timing["unmerged"]["ratio"], "first_merged_s": first["merged"], "first_unmerged_s": first["unmerged"],
               "first_ratio": first["unmerged"] / first["merged"]}  # fmt: skip
        rows.append(row)
        log(f"generate {name}: unmerged / merged = {row['ratio']:.3f}, first call {row['first_ratio']:.3f}")
    return rows
