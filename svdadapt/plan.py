"""`svdadapt plan RECIPE.yaml --gpus 8`: what a run costs per GPU, before it starts.

    svdadapt plan recipes/mistral_dude.yaml --gpus 8
    svdadapt plan recipes/mistral_dude.yaml --gpus 8 --model-config mistral/config.json --gpu-memory 40

Everything comes from the model config on the meta device (no weight is allocated or downloaded), in
seconds. Per GPU, under no ZeRO (one process per GPU, or torch DDP), ZeRO-2 and ZeRO-3:

- frozen weights, and the adapter, its gradients and its AdamW state (DeepSpeed casts every
  parameter to 16 bits and keeps float32 masters of the trained ones in the optimizer; the split
  sums to DeepSpeed's own `estimate_zero2/3_model_states_mem_needs`; the ZeRO-3 working set is the
  largest block accelerate's `calculate_maximum_sizes` finds, gathered in 16 bits);
- activations at the recipe's micro-batch and `data.max_length`, with and without gradient
  checkpointing: one training step's forward and backward is run on the meta device while every
  tensor it creates is counted as long as it lives (the peak; attention as flash attention keeps
  it: q, k, v, output and log-sum-exp, no (length x length) matrix);
- the checkpoint size, and the SVD initialisation's arithmetic and hashing as a time on this machine's
  CPU (measured rates) and on a GPU at `--tflops`.

The start factors residual methods keep (pissa/dude init_A, init_B) live off the accelerator and
are not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from svdadapt.bench.common import PeakTensorBytes, peft_model
from svdadapt.model import adapter_layers, apply
from svdadapt.recipe import Recipe, load_recipe
from svdadapt.svd import solver_for

GB = 1e9
STAGES = ("none", "zero2", "zero3")
STAGE_NAMES = {"none": "no ZeRO", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
ATTENTION = "svdadapt_plan"


def _flash_like(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Attention that keeps for backward what flash attention keeps: (batch, heads, length, dim) in and out."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout, causal, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def meta_base(recipe: Recipe, config_path: str | None = None) -> torch.nn.Module:
    """The recipe's base model on the meta device, in the recipe's dtype, with flash-like attention."""
    from transformers import AttentionInterface

    from svdadapt.count import meta_model as config_model
    from svdadapt.data.glue import glue_task

    m = recipe.model
    labels = m.num_labels or (glue_task(recipe.data.glue_task).num_labels if m.task == "sequence_classification" else None)
    where, option = (config_path, "--model-config") if config_path else (m.name_or_path, "model.name_or_path")
    model = config_model(where, task=m.task, num_labels=labels, option=option).to(getattr(torch, m.dtype))
    AttentionInterface.register(ATTENTION, _flash_like)
    model.set_attn_implementation(ATTENTION)
    return model


def meta_model(recipe: Recipe, config_path: str | None = None) -> torch.nn.Module:
    """The recipe's model with its adapter applied (uninitialised) on the meta device."""
    model = apply(meta_base(recipe, config_path), recipe.adapter, progress=False, initialize=False)
    for _, layer in adapter_layers(model):
        layer.refresh()  # the cached norm terms a step reads: shapes only, on meta
    activation_bytes(model, 1, 1, False, recipe.model.task != "sequence_classification")  # terms cached at first use
    return model


def activation_bytes(model: torch.nn.Module, batch: int, length: int, checkpointing: bool, causal: bool = True) -> int:
    """Peak bytes one training step's forward and backward allocate beyond the model (gradients of the
    trained tensors are counted with the model states, so they are dropped as soon as they are made)."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    dev = next(model.parameters()).device
    ids = torch.zeros(batch, length, dtype=torch.long, device=dev)
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool, device=dev)  # 4-D: used as is, no data-dependent checks
    labels = ids if causal else torch.zeros(batch, dtype=torch.long, device=dev)
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in model.parameters() if p.requires_grad
    ]
    try:
        with PeakTensorBytes() as live:
            model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return live.peak


@dataclass(frozen=True)
class Sizes:
    """What the memory of a run is made of, from the meta model."""

    trainable: int  # trained tensors' elements
    frozen: int  # frozen parameters' elements
    frozen_bytes: int  # in their own dtypes (no DeepSpeed)
    buffer_bytes: int  # the adapter's cached norm terms and the model's buffers
    largest_block: int  # parameters of the largest block ZeRO-3 gathers at once


def _buffer_bytes(model: torch.nn.Module) -> int:
    """Bytes of the buffers on the accelerator: residual methods' start factors (init_A, init_B) are not."""
    skip = {"init_A", "init_B"}
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] not in skip)


def sizes(model: torch.nn.Module) -> Sizes:
    from accelerate.utils import calculate_maximum_sizes

    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    _, (largest, _) = calculate_maximum_sizes(model)
    bytes_per = next(p.element_size() for p in frozen) if frozen else 2
    return Sizes(
        sum(p.numel() for p in trained),
        sum(p.numel() for p in frozen),
        sum(p.numel() * p.element_size() for p in frozen),
        _buffer_bytes(model),
        largest // bytes_per,
    )


def _tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer on the accelerator."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) + _buffer_bytes(model)


def adapter_footprint(recipe: Recipe, config_path: str | None = None, batch: int | None = None) -> list[dict]:
    """What the recipe's adapter adds per GPU without ZeRO, next to peft's LoRA at the same rank and targets.

    Adapter bytes: every tensor the adapter adds to the model (trained, frozen factors, cached norm terms)
    plus float32 gradients and AdamW moments of the trained ones; activations from the meta step above
    (gradient checkpointing as the recipe sets it).
    """
    import peft

    base = _tensor_bytes(meta_base(recipe, config_path))
    ck, length = recipe.model.gradient_checkpointing, recipe.data.max_length
    batch = batch or recipe.training.per_device_train_batch_size
    causal = recipe.model.task != "sequence_classification"
    a = recipe.adapter
    lora = peft.LoraConfig(r=a.r, lora_alpha=16, target_modules=list(a.target_modules), lora_dropout=0.0)
    with torch.device("meta"):
        theirs = peft_model(meta_base(recipe, config_path), lora)
    rows = []
    for label, model in ((f"svdadapt {a.method} r={a.r}", meta_model(recipe, config_path)), (f"peft LoRA r={a.r}", theirs)):
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({
            "adapter": label, "trained": trained, "bytes": _tensor_bytes(model) - base + 12 * trained,
            "activations": activation_bytes(model, batch, length, ck, causal),
        })  # fmt: skip
    return rows


def model_states(s: Sizes, stage: str, gpus: int, half: bool) -> dict[str, float]:
    """Bytes per GPU: frozen weights, adapter, its gradients, its AdamW state (with float32 masters).

    Under DeepSpeed the split follows its estimators: every parameter in 16 bits (ZeRO-3: partitioned, plus
    the largest block gathered), gradients reduced into partitions, float32 masters and moments partitioned.
    Without ZeRO, torch DDP (more than one GPU) keeps a second copy of the gradients in its buckets.
    """
    if stage == "none":  # float32 adapter, gradients and moments next to the base in its own dtype
        return {"frozen": s.frozen_bytes + s.buffer_bytes, "adapter": 4 * s.trainable,
                "grads": (4 if gpus == 1 else 8) * s.trainable, "adamw": 8 * s.trainable}  # fmt: skip
    p = 2 if half else 4  # DeepSpeed casts every parameter to the training precision
    if stage == "zero2":
        return {"frozen": p * s.frozen + s.buffer_bytes, "adapter": p * s.trainable,
                "grads": (p + 4) * s.trainable / gpus, "adamw": 12 * s.trainable / gpus}  # fmt: skip
    return {"frozen": p * s.frozen / gpus + p * s.largest_block + s.buffer_bytes, "adapter": p * s.trainable / gpus,
            "grads": 4 * s.trainable / gpus, "adamw": 12 * s.trainable / gpus}  # fmt: skip


def deepspeed_estimate(s: Sizes, stage: str, gpus: int) -> float | None:
    """DeepSpeed's own estimate of the trained tensors' model states per GPU (16-bit training, no offload)."""
    if stage == "zero2":
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(s.trainable, gpus, 1, cpu_offload=False)[1]
    if stage == "zero3":
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(s.trainable, 0, gpus, 1, cpu_offload=False, cpu_offload_params=False)[1]
    return None


def checkpoint_bytes(s: Sizes, deepspeed: bool, half: bool) -> int:
    """One checkpoint: the trained tensors (a 16-bit module copy under DeepSpeed) and their AdamW state."""
    if not deepspeed:
        return 12 * s.trainable  # float32 tensors and two moments
    return (2 if half else 4) * s.trainable + 12 * s.trainable  # module copy, float32 master and moments


def init_cost(model: torch.nn.Module, recipe: Recipe) -> tuple[float, int]:
    """The adapter initialisation's arithmetic (FLOP) and the weight bytes it hashes (the SVD cache key and
    the adapter's base fingerprints). Zero for methods that start from random factors."""
    from svdadapt.methods import get_method

    cfg = recipe.adapter
    method = get_method(cfg.method)
    if method.name in ("lora", "dora") or (method.has_R and cfg.frozen_factors == "random"):
        return 0.0, 0
    flops, hashed = 0.0, 0
    for _, layer in adapter_layers(model):
        o, i = layer.out_features, layer.in_features
        big, small = max(o, i), min(o, i)
        if solver_for(cfg.svd_solver, (o, i)) == "full":
            flops += 4 * big * small**2 + 8 * small**3  # a thin SVD (LAPACK gesdd)
        else:  # sketch, power iterations, Qᵀ W; the QRs of every basis
            p = min(cfg.r + cfg.svd_oversample, small)
            flops += 2 * o * i * p * (2 + 2 * cfg.svd_niter) + 4 * (o + i) * p * p * (1 + cfg.svd_niter)
        flops += 2 * o * i * cfg.r * (2 if method.residual else 1)  # W Aᵀ for the row norm; B A for the residual
        hashed += o * i * layer.weight.element_size()
    return flops, hashed


def hash_rate(size: int = 1 << 24) -> float:
    """This machine's sha256 throughput in bytes/s (best of three)."""
    import hashlib
    import time

    data, best = bytes(size), float("inf")
    for _ in range(3):
        start = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        best = min(best, time.perf_counter() - start)
    return size / best


def cpu_matmul_rate(dtype: torch.dtype, size: int = 2048, cols: int = 176) -> float:
    """This machine's FLOP/s for the randomized solver's skinny products (best of three)."""
    import time

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, cols).to(dtype)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size * size * cols / best


def _deepspeed_stage(recipe: Recipe) -> str:
    path = recipe.training.deepspeed
    if not path:
        return "none"
    try:
        stage = json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0)
    except (OSError, ValueError) as e:
        raise ValueError(f"training.deepspeed {path!r}: cannot read it ({e}); run from the repository root") from None
    return {2: "zero2", 3: "zero3"}.get(stage, "none")


def _gb(x: float) -> str:
    return f"{x / GB:.3g}" if x < GB else f"{x / GB:.2f}"


def footprint_table(recipe: Recipe, config_path: str | None = None) -> str:
    """`adapter_footprint` as a Markdown table."""
    rows = adapter_footprint(recipe, config_path)
    ck = "with" if recipe.model.gradient_checkpointing else "no"
    head = (
        f"| adapter | trained parameters | adapter GB per GPU (tensors, gradients, AdamW) | activations GB ({ck} checkpointing) |"
    )
    lines = [head, "|---|---|---|---|"]
    lines += [f"| {r['adapter']} | {r['trained']:,} | {_gb(r['bytes'])} | {_gb(r['activations'])} |" for r in rows]
    return "\n".join(lines)


def report(recipe: Recipe, gpus: int, gpu_memory: float, tflops: float, config_path: str | None = None) -> tuple[str, bool]:
    """The plan as text, and whether the recipe's own setting fits in `gpu_memory` GB per GPU."""
    model = meta_model(recipe, config_path)
    s = sizes(model)
    t = recipe.training
    half = t.bf16 or t.fp16
    batch, length = t.per_device_train_batch_size, recipe.data.max_length
    causal = recipe.model.task != "sequence_classification"
    acts = {ck: activation_bytes(model, batch, length, ck, causal) for ck in (False, True)}
    ours, ck = _deepspeed_stage(recipe), recipe.model.gradient_checkpointing
    lines = [
        f"{recipe.name or 'recipe'}: {type(model).__name__}, {recipe.adapter.method} r={recipe.adapter.r}, "
        f"{s.trainable:,} trained of {s.trainable + s.frozen:,} parameters; {gpus} GPU(s) of {gpu_memory:g} GB; "
        f"micro-batch {batch} x {length} tokens",
        "",
        "| per GPU, GB | " + " | ".join(STAGE_NAMES[st] for st in STAGES) + " |",
        "|---|" + "---|" * len(STAGES),
    ]
    states = {st: model_states(s, st, gpus, half) for st in STAGES}
    for key, label in (("frozen", "frozen weights (+ buffers; ZeRO-3: + largest block gathered)"), ("adapter", "adapter"),
                       ("grads", "adapter gradients"), ("adamw", "AdamW state (+ float32 masters)")):  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(_gb(states[st][key]) for st in STAGES) + " |")
    ds = {st: deepspeed_estimate(s, st, gpus) for st in STAGES}
    lines.append("| DeepSpeed's estimate, adapter + gradients + AdamW | " + " | ".join(
        _gb(ds[st]) if ds[st] is not None else "-" for st in STAGES) + " |")  # fmt: skip
    for c in (False, True):
        lines.append(
            f"| activations, {'with' if c else 'no'} gradient checkpointing | " + " | ".join(_gb(acts[c]) for _ in STAGES) + " |"
        )
    for c in (False, True):
        totals = [sum(states[st].values()) + acts[c] for st in STAGES]
        lines.append(f"| **total, {'with' if c else 'no'} checkpointing** | " + " | ".join(_gb(x) for x in totals) + " |")
    need = sum(states[ours].values()) + acts[ck]
    fits = need <= gpu_memory * GB
    ckpt = checkpoint_bytes(s, ours != "none", half)
    flops, hashed = init_cost(model, recipe)
    rate = cpu_matmul_rate(getattr(torch, recipe.model.dtype)) if flops else 1.0
    hashing = hashed / hash_rate() if hashed else 0.0
    lines += [
        "",
        f"checkpoint: {_gb(ckpt)} GB each (trained tensors and AdamW state, nothing frozen); "
        f"save_total_limit {t.save_total_limit} keeps {_gb(ckpt * (t.save_total_limit or 1))} GB",
        f"SVD initialisation: {flops / 1e12:.3g} TFLOP and {_gb(hashed)} GB hashed; on this machine's CPU "
        f"({rate / 1e9:.0f} GFLOP/s measured) about {flops / rate + hashing:.0f} s, on a GPU at {tflops:g} TFLOP/s "
        f"about {flops / (tflops * 1e12) + hashing:.0f} s "
        f"(it runs where the weights are loaded: the CPU without ZeRO-3, every rank's GPU under ZeRO-3)",
        "",
    ]
    setting = f"{STAGE_NAMES[ours]}, {'with' if ck else 'no'} gradient checkpointing"
    if fits:
        lines.append(f"The recipe's setting ({setting}) needs {_gb(need)} GB per GPU: fits in {gpu_memory:g} GB.")
    else:
        parts = dict(states[ours], activations=acts[ck])
        worst = max(parts, key=parts.get)
        lines.append(
            f"Does not fit: the recipe's setting ({setting}) needs {_gb(need)} GB per GPU, {_gb(need - gpu_memory * GB)} GB "
            f"more than {gpu_memory:g} GB; the largest part is {worst} ({_gb(parts[worst])} GB)."
        )
        better = [(st, c) for st in STAGES for c in (False, True) if sum(states[st].values()) + acts[c] <= gpu_memory * GB]
        if better:
            st, c = better[0]
            lines.append(f"It fits with {STAGE_NAMES[st]}, {'with' if c else 'no'} gradient checkpointing.")
        else:
            lines.append("No ZeRO stage fits at this micro-batch: lower training.per_device_train_batch_size or data.max_length.")
    return "\n".join(lines), fits


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="svdadapt plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a YAML recipe, e.g. recipes/mistral_dude.yaml")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (ranks) the run uses (default 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU in GB (default 80)")
    p.add_argument("--tflops", type=float, default=50.0, help="matmul rate for the SVD-init estimate (default 50 TFLOP/s)")
    p.add_argument("--model-config", help="a config.json to use instead of the recipe's model (e.g. offline)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--compare-peft", action="store_true", help="also print what the adapter adds next to peft's LoRA")
    args = p.parse_args(argv)
    try:
        if args.gpus < 1:
            raise ValueError(f"--gpus {args.gpus}: must be at least 1")
        recipe = load_recipe(args.recipe, args.set)
        text, fits = report(recipe, args.gpus, args.gpu_memory, args.tflops, args.model_config)
        if args.compare_peft:
            text += "\n\nWhat the adapter adds per GPU (no ZeRO), next to peft's LoRA:\n\n" + footprint_table(
                recipe, args.model_config
            )
    except ValueError as e:
        print(f"svdadapt plan: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0 if fits else 1
