"""`svdadapt count`: trainable parameters per method and rank, from a model config alone.

    svdadapt count --model mistralai/Mistral-7B-v0.1 --method edora --r 16 --targets q_proj,v_proj
    svdadapt count --model path/to/config.json --r 8,16,64 --targets all-linear

The model is built on the meta device (no weights are allocated or downloaded), so a 7B config
counts in seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from svdadapt.config import AdapterConfig
from svdadapt.methods import methods
from svdadapt.model import count_plan


def model_config(model: str, trust_remote_code: bool = False, what: str = "--model"):
    """The transformers config of a hub id, model directory, or config.json (`what` names it in errors)."""
    from transformers import AutoConfig

    from svdadapt.paths import resolve_path

    path = Path(resolve_path(model))
    source = str(path.parent if path.is_file() else path if path.exists() else model)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{what} {model!r}: cannot read a model config there ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from None


def meta_model(model: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model a config describes (hub id, model directory, or config.json), on the meta device."""
    import transformers
    from transformers import AutoModel

    cfg = model_config(model, trust_remote_code)
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        return cls(cfg) if cls is not None else AutoModel.from_config(cfg)


def table(model: torch.nn.Module, names: list[str], ranks: list[int], targets, modules_to_save=()) -> str:
    """Markdown table: one row per method, one column per rank, trainable parameters (and % of total)."""
    head = "| method | " + " | ".join(f"r={r}" for r in ranks) + " |"
    rows = [head, "|" + "---|" * (len(ranks) + 1)]
    for name in names:
        cells = []
        for r in ranks:
            plan = count_plan(model, AdapterConfig(method=name, r=r, target_modules=targets, modules_to_save=modules_to_save))
            cells.append(f"{plan.trainable:,} ({plan.percent:.3f}%)")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="svdadapt count", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id, model directory, or config.json")
    p.add_argument("--method", default=",".join(methods()), help="comma-separated methods (default: all registered)")
    p.add_argument("--r", type=_ints, default=[8, 16, 32, 64], help="comma-separated ranks (default: 8,16,32,64)")
    p.add_argument("--targets", default="all-linear", help='comma-separated module-name suffixes, or "all-linear"')
    p.add_argument("--modules-to-save", default="", help="comma-separated modules trained in full (e.g. classifier)")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    targets = args.targets if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    keep = [t for t in args.modules_to_save.split(",") if t]
    try:
        model = meta_model(args.model, args.trust_remote_code)
        out = table(model, [m for m in args.method.split(",") if m], args.r, targets, keep)
    except ValueError as e:
        print(f"svdadapt count: {e}", file=sys.stderr)
        return 2
    total = sum(q.numel() for q in model.parameters())
    print(f"{type(model).__name__}: {total:,} parameters; targets {targets}\n")
    print(out)
    return 0
