"""The `model` suite: one training step (forward, backward, AdamW step) of a small Llama per method.

Every linear projection of every decoder layer is wrapped (target "all-linear": the head stays plain).
peft's LoRA and DoRA at the same rank and alpha run in the same process on the same batch; times are
medians of per-repetition ratios to peft LoRA, memory is the peak of live tensor bytes of one
steady-state step (optimizer state already allocated), and `budget_mib` is peft LoRA's peak plus one
(tokens x out) activation per wrapped layer, the most an edora or dude step may use.

A precision (`svdadapt.bench.common.PRECISIONS`) sets the model's dtype (bf16/fp16 weights, float32
adapters) or runs the float32 model under `torch.autocast`; an activation then counts in the dtype
the matmuls run in. Where those are emulated (bf16/fp16 on a CPU without native units) the quick
plan shrinks the model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from svdadapt.bench.common import PRECISIONS, MiB, Precision, interleaved_ratios, peak_bytes, peft_model, probe, synchronized
from svdadapt.bench.layer import METHODS

FULL = {
    "hidden": 1024,
    "intermediate": 2816,
    "layers": 4,
    "heads": 16,
    "kv_heads": 4,
    "batch": 2,
    "seq": 256,
    "ranks": (16, 64),
    "reps": 5,
}
QUICK = {
    "hidden": 256,
    "intermediate": 704,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "batch": 1,
    "seq": 128,
    "ranks": (16,),
    "reps": 3,
}
QUICK_EMULATED = {**QUICK, "hidden": 128, "intermediate": 352, "seq": 64}


def base_model(plan: dict, seed: int = 0, precision: Precision = PRECISIONS["fp32"], device: str = "cpu") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=plan["hidden"],
        intermediate_size=plan["intermediate"],
        num_hidden_layers=plan["layers"],
        num_attention_heads=plan["heads"],
        num_key_value_heads=plan["kv_heads"],
        max_position_embeddings=2 * plan["seq"],
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).to(device, precision.weights)
    model.requires_grad_(False)
    return model


def adapted(model: nn.Module, name: str, r: int) -> nn.Module:
    """A copy of `model` with svdadapt method `name`, or "peft_lora"/"peft_dora", on every linear."""
    model = copy.deepcopy(model)
    if name.startswith("peft_"):
        from peft import LoraConfig

        cfg = LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", use_dora=name == "peft_dora", lora_dropout=0.0)
        return peft_model(model, cfg)
    import svdadapt

    svdadapt.apply(model, svdadapt.AdapterConfig(method=name, r=r, svd_solver="randomized", svd_cache_dir=""))
    return model


def stepper(model: nn.Module, ids: torch.Tensor, precision: Precision = PRECISIONS["fp32"]):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        with precision.context(ids.device.type):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, params, opt


def _wrapped_activation_bytes(model: nn.Module, tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """tokens x out activations in `dtype`, summed over the linears an adapter wraps (every projection, not the head)."""
    head, size = model.get_output_embeddings(), torch.finfo(dtype).bits // 8
    return sum(tokens * m.out_features * size for m in model.modules() if isinstance(m, nn.Linear) and m is not head)


def suite(
    quick: bool, log=print, clock: str = "wall", precisions: tuple[Precision, ...] = (PRECISIONS["fp32"],), device: str = "cpu"
) -> list[dict]:
    rows = []
    for precision in precisions:
        rows += _suite_in(quick, precision, log, clock, device)
    return rows


def _suite_in(quick: bool, precision: Precision, log, clock: str, device: str) -> list[dict]:
    plan = (QUICK_EMULATED if precision.emulated(device) else QUICK) if quick else FULL
    model = base_model(plan, precision=precision, device=device)
    tokens = plan["batch"] * plan["seq"]
    ids = torch.randint(0, 2048, (plan["batch"], plan["seq"]), generator=torch.Generator().manual_seed(1)).to(device)
    allowance = _wrapped_activation_bytes(model, tokens, precision.compute)
    rows = []
    for r in plan["ranks"]:
        names = ["peft_lora", "peft_dora", *METHODS]
        steps, extra = {}, {}
        for name in names:
            step, params, opt = stepper(adapted(model, name, r), ids, precision)
            steps[name] = synchronized(step, device)
            extra[name] = sum(p.numel() for p in params)
        steps, failed = probe(steps, "peft_lora")
        timing = interleaved_ratios(steps, "peft_lora", plan["reps"], warmup=1, clock=clock)
        peaks = {name: peak_bytes(step) for name, step in steps.items()}
        budget = peaks["peft_lora"] + allowance
        for name in names:
            row = {"model": f"llama h{plan['hidden']} x{plan['layers']}", "dtype": precision.label, "device": device,
                   "tokens": tokens, "r": r, "config": name, "trainable": extra[name]}  # fmt: skip
            if name in failed:
                rows.append({**row, "error": failed[name]})
                continue
            rows.append(
                {
                    **row,
                    "ms": timing[name]["ms"],
                    "time_ratio": timing[name]["ratio"],
                    "peak_mib": peaks[name] / MiB,
                    "peak_ratio": peaks[name] / peaks["peft_lora"],
                    "budget_mib": budget / MiB,
                    "within_budget": peaks[name] <= budget,
                    "ratios": timing[name]["ratios"],
                }
            )
        shown = [f"{n}={timing[n]['ratio']:.3f}/{peaks[n] / MiB:.0f}MiB" if n in steps else f"{n}=failed" for n in names]
        log(f"model {precision.label} r={r}: " + " ".join(shown))
        del steps
    return rows
