"""`svdadapt bench`: speed and memory of the adapter layer, a model step and SVD init, against peft.

    svdadapt bench --quick                                   # one small setting of each suite
    svdadapt bench --suite layer,model,init --output bench.json
    svdadapt bench --suite layer,model --dtype bf16,autocast-bf16   # low precision (on a GPU when present)

Suites: `layer` (one wrapped linear per method vs the frozen base layer and peft LoRA/DoRA), `model`
(a training step of a small Llama), `init` (SVD initialisation of a Mistral-7B-shaped model, and the
randomized solver's error), `bank` (serving many adapters, from `svdadapt.serve` when present),
`compile` (a `torch.compile`d training step against eager; `--compile` adds it to the chosen suites)
and `generate` (unmerged generation against merged; `svdadapt.bench.runtime`).
Every figure is a ratio to a reference measured in the same process; see `svdadapt.bench.common`.
`--dtype` (layer and model suites) picks the precisions: fp32, bf16, fp16 (base and model in that
dtype; svdadapt's factors stay float32) and autocast-bf16, autocast-fp16 (a float32 model under
`torch.autocast`); `--device` defaults to cuda when a GPU is visible.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from svdadapt.bench.common import PRECISIONS, default_device, emulation_note

SUITES = ("layer", "model", "init", "bank", "compile", "generate")
DEFAULT = ("layer", "model", "init")


def bank_suite(quick: bool) -> dict:
    """`svdadapt.serve.benchmark_bank(quick)`: many edora adapters served in one batch."""
    from svdadapt.serve import benchmark_bank

    return {"available": True, "result": benchmark_bank(quick)}


QUICK_NOT_JUDGED = "not judged: --quick times small shapes; run without --quick"


def targets(result: dict) -> list[dict]:
    """The project's speed and memory targets, each with the measured figure and whether it is met.

    A --quick run times small shapes, so its speed figures say nothing about the targets (set on
    Mistral-7B shapes): those are marked not judged; memory and accuracy targets are judged as usual.
    """
    out = []

    def add(name, value, met, timing=True):
        judged = not (timing and result.get("quick"))
        out.append({"target": name, "value": value, "met": bool(met) if judged else QUICK_NOT_JUDGED})

    rows_all = [r for r in result.get("layer", []) if "error" not in r]
    for label in sorted({r["dtype"] for r in rows_all}, key=lambda d: d != "float32"):
        layer = [r for r in rows_all if r["dtype"] == label]
        slack = 1.25 if label == "float32" else 1.20  # dude/dora: a trained A adds C = W Aᵀ per step
        emulated = " (emulated matmuls)" if label in result.get("emulated", []) else ""
        for method, limit in (("edora", 1.05), ("loraxs", 1.05), ("dude", slack), ("dora", slack)):
            rows = [r for r in layer if r["config"] == method]
            if rows:
                worst = max(rows, key=lambda r: r["time_ratio"])
                where = f"{worst['shape']} T={worst['tokens']} r={worst['r']}"
                if worst.get("flop_floor"):
                    where += f"; its arithmetic floor {worst['flop_floor']:.3f}"
                name = f"layer {label}{emulated} {method} <= {limit}x base (worst: {where})"
                add(name, round(worst["time_ratio"], 3), worst["time_ratio"] <= limit)
    layer = [r for r in rows_all if r["dtype"] == "float32"]
    dude = [r for r in layer if r["config"] == "dude" and "peft_dora_over" in r]
    if dude:
        worst = min(dude, key=lambda r: r["peft_dora_over"])
        add(
            f"peft DoRA / dude >= 1.3 (worst: {worst['shape']} T={worst['tokens']} r={worst['r']})",
            round(worst["peft_dora_over"], 2),
            worst["peft_dora_over"] >= 1.3,
        )
        small = [r for r in dude if r["tokens"] == 256 and r["r"] == 16]
        if small:
            low = min(r["peft_dora_over"] for r in small)
            add("peft DoRA / dude >= 2.5 at 256 tokens, r=16", round(low, 2), low >= 2.5)
    for row in result.get("model", []):
        if row["config"] in ("edora", "dude") and "error" not in row:
            add(
                f"model {row.get('dtype', 'float32')} {row['config']} r={row['r']} peak <= peft LoRA + one (tokens x out) per layer",
                round(row["peak_mib"], 1),
                row["within_budget"],
                timing=False,
            )
    for row in (r for r in result.get("generate", []) if not r["config"].startswith("peft_")):
        add(f"generate {row['config']}: unmerged <= 1.15x merged", round(row["ratio"], 3), row["ratio"] <= 1.15)
        add(f"generate {row['config']}: first call <= 1.10x merged's", round(row["first_ratio"], 3), row["first_ratio"] <= 1.10)
        if "first_vs_merge" in row:
            add(
                f"generate {row['config']}: first call <= merging then a merged call",
                round(row["first_vs_merge"], 3),
                row["first_vs_merge"] <= 1.0,
            )
    init = result.get("init")
    if init:
        t = init["timing"]["svdadapt_randomized"]
        add(
            "randomized init of Mistral-7B shapes, r=16, <= 60 s" + (" (extrapolated)" if t["extrapolated"] else ""),
            round(t["seconds"], 1),
            t["seconds"] <= 60,
        )
        for row in init.get("fingerprint", []):
            speed = row["new_cpu_gb_s"]  # per second of the hashing thread's CPU time: wall clock counts other jobs' turns
            add(f"fingerprint of a {row['shape']} bf16 weight >= 5 GB/s per CPU second", round(speed, 2), speed >= 5)
        decay = [r for r in init["accuracy"]["rows"] if r["matrix"].startswith("power law")]
        for row in decay:
            add(
                f"randomized rel. error <= 1%: {row['matrix']}",
                round(row["rel_error"], 5),
                row["rel_error"] <= 0.01,
                timing=False,
            )
    return out


def render(result: dict) -> str:
    """Markdown tables of a result (what `docs/benchmarks.md` shows)."""
    from svdadapt.bench.common import table

    parts = [f"note: {n}\n" for n in result.get("notes", [])]
    if result.get("layer"):
        parts.append("### layer: forward + backward of one wrapped linear, ratio to the frozen base layer\n")
        cols = [("shape", "out x in", ""), ("tokens", "tokens", ""), ("r", "r", ""), ("dtype", "dtype", ""), ("config", "config", ""),
                ("ms", "ms", ".1f"), ("time_ratio", "time / base", ".3f"), ("flop_floor", "floor", ".3f"), ("peak_mib", "peak MiB", ".1f"),
                ("peak_ratio", "peak / base", ".2f"), ("peft_dora_over", "peft DoRA / dude", ".2f")]  # fmt: skip
        parts.append(_table_with_errors(result["layer"], cols))
    if result.get("model"):
        parts.append("\n### model: one training step (forward, backward, AdamW), ratio to peft LoRA\n")
        cols = [("model", "model", ""), ("tokens", "tokens", ""), ("r", "r", ""), ("dtype", "dtype", ""), ("config", "config", ""),
                ("trainable", "trainable", ","), ("ms", "ms", ".0f"), ("time_ratio", "time / peft LoRA", ".3f"), ("peak_mib", "peak MiB", ".1f"),
                ("peak_ratio", "peak / peft LoRA", ".3f"), ("budget_mib", "budget MiB", ".1f"), ("within_budget", "within budget", "")]  # fmt: skip
        parts.append(_table_with_errors(result["model"], cols))
    if result.get("init"):
        t = result["init"]["timing"]
        rows = [{"solver": k, **v} for k, v in t.items() if isinstance(v, dict)]
        parts.append(f"\n### init: SVD initialisation of every linear of a Mistral-7B-shaped model, r={t['r']}\n")
        cols = [("solver", "solver", ""), ("seconds", "seconds (32 layers)", ".1f"), ("per_layer_s", "s / layer", ".2f"),
                ("timed_layers", "layers timed", ""), ("extrapolated", "extrapolated", "")]  # fmt: skip
        parts.append(table(rows, cols))
        acc = result["init"]["accuracy"]
        parts.append(f"\nrandomized solver (oversample={acc['oversample']}, niter={acc['niter']}), r={acc['r']}:\n")
        cols = [
            ("matrix", "matrix", ""),
            ("rel_error", "rel. error of top-r reconstruction", ".5f"),
            ("excess_residual", "excess residual", ".5f"),
            ("peft_rel_error", "rel. error, peft pissa_niter_4 (svd_lowrank q=r, 4 iterations)", ".5f"),
        ]
        parts.append(table(acc["rows"], cols))
        if result["init"].get("fingerprint"):
            parts.append(
                "\nbase-weight fingerprint, GB/s (median of interleaved repetitions; CPU: per second of the thread's CPU time):\n"
            )
            cols = [("shape", "out x in", ""), ("dtype", "dtype", ""), ("mb", "MB", ".0f"), ("new_gb_s", "xxh3-128 (v2)", ".2f"),
                    ("new_cpu_gb_s", "xxh3-128, CPU", ".2f"), ("old_gb_s", "sha256 (v1)", ".2f"), ("old_cpu_gb_s", "sha256, CPU", ".2f"),
                    ("speedup", "speed-up", ".1f")]  # fmt: skip
            parts.append(table(result["init"]["fingerprint"], cols))
    if result.get("compile"):
        parts.append("\n### compile: forward + backward of the model suite's Llama, torch.compile (inductor) against eager\n")
        cols = [("dtype", "dtype", ""), ("tokens", "tokens", ""), ("config", "config", ""), ("eager_ms", "eager ms", ".1f"),
                ("compiled_ms", "compiled ms", ".1f"), ("ratio", "compiled / eager", ".3f"), ("compile_s", "first call s", ".1f")]  # fmt: skip
        parts.append(table(result["compile"], cols))
    if result.get("generate"):
        parts.append("\n### generate: greedy generation, SmolLM2-135M-shaped Llama, adapter applied (eval mode) against merged\n")
        cols = [("config", "config", ""), ("layers", "layers", ""), ("new_tokens", "new tokens", ""), ("merged_ms", "merged ms", ".0f"),
                ("unmerged_ms", "unmerged ms", ".0f"), ("ratio", "unmerged / merged", ".3f"), ("ratio_iqr", "quartiles", ""),
                ("first_ms", "first call ms", ".0f"), ("first_ratio", "first call / merged", ".3f"),
                ("merge_ms", "merge ms", ".0f"), ("first_vs_merge", "first call / (merge + merged)", ".3f")]  # fmt: skip
        parts.append(table(result["generate"], cols))
    if "bank" in result:
        bank = result["bank"]
        parts.append("\n### bank\n")
        parts.append(
            "```\n" + json.dumps(bank, indent=1, default=str)[:4000] + "\n```"
            if bank.get("available")
            else f"unavailable: {bank['reason']}"
        )
    if result.get("targets"):
        parts.append("\n### targets\n")
        cols = [("target", "target", ""), ("value", "measured", ""), ("met", "met", "")]
        parts.append(table(result["targets"], cols))
    return "\n".join(parts) + "\n"


def _table_with_errors(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """`table`, plus an "error" column (first line, shortened) when a configuration could not run."""
    from svdadapt.bench.common import table

    if not any("error" in r for r in rows):
        return table(rows, cols)
    shown = [{**r, "error": r["error"].splitlines()[0][:100]} if "error" in r else r for r in rows]
    return table(shown, cols + [("error", "error", "")])


def _load() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="svdadapt bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--suite", default=",".join(DEFAULT), help=f"comma-separated suites from {list(SUITES)}, or 'all' (default: %(default)s)"
    )
    p.add_argument("--quick", action="store_true", help="a small subset of every suite")
    p.add_argument("--compile", action="store_true", help="also run the compile suite: torch.compile against eager")
    p.add_argument("--output", help="write the full result as JSON to this file")
    p.add_argument("--markdown", help="write the tables as Markdown to this file")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, the core count)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="layer/model timing clock: cpu = the process's CPU time (use with --threads 1 on a shared machine)",
    )
    p.add_argument(
        "--dtype",
        default="fp32",
        help="comma-separated precisions for the layer and model suites, from "
        f"{list(PRECISIONS)}: bf16/fp16 = base weights in that dtype, autocast-* = a float32 model "
        "under torch.autocast (default: %(default)s)",
    )
    p.add_argument("--device", default=None, help="where the layer and model suites run (default: cuda if available, else cpu)")
    return p


def cli(argv: list[str]) -> int:
    """Run the chosen suites, print their tables, and write JSON/Markdown if asked."""
    args = _parser().parse_args(argv)
    suites = SUITES if args.suite == "all" else tuple(s.strip() for s in args.suite.split(",") if s.strip())
    bad = [s for s in suites if s not in SUITES]
    if args.compile and "compile" not in suites:
        suites = (*suites, "compile")
    if bad or not suites:
        print(
            f"svdadapt bench: --suite {args.suite!r} names unknown suites {bad}; choose from {list(SUITES)} or 'all'",
            file=sys.stderr,
        )
        return 2
    names = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not names or any(d not in PRECISIONS for d in names):
        print(f"svdadapt bench: --dtype {args.dtype!r}: choose from {list(PRECISIONS)}, comma-separated", file=sys.stderr)
        return 2
    device = args.device or default_device()
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        print(f"svdadapt bench: --device {device!r} cannot be used here ({e}); pass --device cpu", file=sys.stderr)
        return 2
    if args.clock == "cpu" and torch.device(device).type != "cpu":
        print("svdadapt bench: --clock cpu counts host CPU time only; use --clock wall on a GPU", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"svdadapt bench: --threads {args.threads} must be a positive integer", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    from svdadapt.bench import common

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # progress to stderr, tables to stdout
    result: dict = {
        "command": "svdadapt bench " + " ".join(argv),
        "quick": args.quick,
        "clock": args.clock,
        "machine": common.machine(),
    }
    result["machine"]["load_average"] = _load()
    precisions = [PRECISIONS[d] for d in names]
    result["device"], result["dtypes"] = device, names
    if {"layer", "model"} & set(suites):
        result["emulated"] = [p.label for p in precisions if p.emulated(device)]
        result["notes"] = [emulation_note(p) for p in precisions if p.emulated(device)]
        for note in result["notes"]:
            log(f"note: {note}")
    start = time.perf_counter()
    if "layer" in suites:
        from svdadapt.bench import layer

        result["layer"] = layer.suite(args.quick, precisions, log, args.clock, device)
    if "model" in suites:
        from svdadapt.bench import model

        result["model"] = model.suite(args.quick, log, args.clock, precisions, device)
    if "init" in suites:
        from svdadapt.bench import init

        result["init"] = init.suite(args.quick, log)
    if "bank" in suites:
        result["bank"] = bank_suite(args.quick)
    if "compile" in suites:
        from svdadapt.bench import runtime

        result["compile"] = runtime.compile_suite(args.quick, log, args.clock, precisions, device)
    if "generate" in suites:
        from svdadapt.bench import runtime

        result["generate"] = runtime.generate_suite(args.quick, log, args.clock, device)
    result["targets"] = targets(result)
    result["seconds"] = time.perf_counter() - start
    text = render(result)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0
