"""The `compile` and `generate` suites: a compiled training step against eager, and unmerged generation
against merged, each a ratio to its reference measured in the same process (`svdadapt.bench.common`).

- compile: one forward + backward of the model suite's Llama per method, `torch.compile(model)`
  (inductor) against the same model eager; the first compiled call (compilation) is reported apart.
- generate: greedy `generate` of a SmolLM2-135M-shaped Llama with an applied adapter in eval mode,
  against the same adapter merged into plain layers: the steady state, and the first call after the
  adapter's kept values are dropped (it computes g = m / n and the folded factors once), and that
  first call against merging then generating (the merge timed alone, the faster of two). peft LoRA's
  unmerged against merged is printed beside, as the reference an unmerged adapter is judged by.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from svdadapt.bench.common import CLOCKS, PRECISIONS, Precision, interleaved_ratios, synchronized
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


# SmolLM2-135M's shape (the README's model): the per-token work of unmerged generation is that of a
# real small model, not of a toy whose layers are all dispatch overhead
GENERATE_PLAN = {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49152}
GENERATE_QUICK = {**GENERATE_PLAN, "layers": 4}


def generate_model(plan: dict, device: str = "cpu") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=plan["vocab"], hidden_size=plan["hidden"], intermediate_size=plan["intermediate"],
        num_hidden_layers=plan["layers"], num_attention_heads=plan["heads"], num_key_value_heads=plan["kv_heads"],
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(device).eval()


def _moved(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(unmerged, merged) copies of `model` with method `name` (or "peft_lora"), every factor moved off its start."""
    import svdadapt

    unmerged = adapted(model, name, 16).eval()
    with torch.no_grad():  # g = m / n then differs from 1, and LoRA's B from 0
        for p in unmerged.parameters():
            if p.requires_grad:
                p.mul_(1.01).add_(1e-3)
    merged = copy.deepcopy(unmerged).merge_and_unload() if name.startswith("peft_") else svdadapt.merge(copy.deepcopy(unmerged))
    return unmerged, merged.eval()


def _merge_ms(unmerged: torch.nn.Module, name: str, clock: str, device: str) -> float:
    """The time of merging `unmerged` (a copy of it, once): what a user pays before a merged model's first call."""
    import svdadapt

    copies = [copy.deepcopy(unmerged) for _ in range(2)]
    times = []
    for m in copies:  # the faster of two, as a warm-up costs the first
        merge = m.merge_and_unload if name.startswith("peft_") else lambda m=m: svdadapt.merge(m)
        start = CLOCKS[clock]()
        synchronized(merge, device)()
        times.append((CLOCKS[clock]() - start) * 1e3)
    return min(times)


def generate_suite(quick: bool, log=print, clock: str = "wall", device: str = "cpu") -> list[dict]:
    """Steady state: median over repetitions of unmerged / merged generation. First call: the adapter's
    kept values dropped (`model.train().eval()`, as after training), so the call folds them again; its
    ratio is to a merged call next to it. peft LoRA unmerged against merged is the reference row."""
    plan = GENERATE_QUICK if quick else GENERATE_PLAN
    model = generate_model(plan, device)
    prompt = torch.randint(0, plan["vocab"], (1, 16), generator=torch.Generator().manual_seed(2)).to(device)
    new_tokens = 16 if quick else 32
    reps = 3 if quick else 9  # the median of 9 interleaved ratios: one slow phase of a shared host moves it little

    def generator(m):
        return synchronized(
            lambda: m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False), device
        )

    generator(model)()  # warm the base model's kernels, so neither side's first call pays for them
    rows = []
    for name in (*GENERATE_METHODS, "peft_lora"):
        unmerged, merged = _moved(model, name)
        steps = {"merged": generator(merged), "unmerged": generator(unmerged)}

        def first_call(unmerged=unmerged, step=steps["unmerged"]):
            unmerged.train().eval()  # drops what the layers keep: the next call pays for folding it
            step()

        steps["first"] = synchronized(first_call, device)
        timing = interleaved_ratios(steps, "merged", reps, warmup=1, clock=clock)
        merge_ms = _merge_ms(unmerged, name, clock, device)
        row = {"config": name, "new_tokens": new_tokens, "layers": plan["layers"], "merged_ms": timing["merged"]["ms"],
               "unmerged_ms": timing["unmerged"]["ms"], "ratio": timing["unmerged"]["ratio"],
               "ratio_iqr": _quartiles(timing["unmerged"]["ratios"]), "reps": reps,
               "first_ms": timing["first"]["ms"], "first_ratio": timing["first"]["ratio"], "merge_ms": merge_ms,
               "first_vs_merge": timing["first"]["ms"] / (merge_ms + timing["merged"]["ms"])}  # fmt: skip
        rows.append(row)
        log(
            f"generate {name}: unmerged / merged = {row['ratio']:.3f} (quartiles {row['ratio_iqr']}), first call {row['first_ratio']:.3f} "
            f"({row['first_vs_merge']:.3f} of merging, {merge_ms:.0f} ms, and then generating)"
        )
    return rows


def _quartiles(values: list[float]) -> str:
    """The middle half of the per-repetition ratios, as "q1-q3"."""
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return f"{q1:.3f}-{q3:.3f}"
