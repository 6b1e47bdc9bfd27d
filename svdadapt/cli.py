"""The `svdadapt` command: `svdadapt SUBCOMMAND --help` for each.

svdadapt train recipes/quickstart.yaml
svdadapt eval --model PATH --adapter DIR --tasks gsm8k,mmlu --data-dir ../shared/data
svdadapt count --model config.json --method edora --r 16 --targets q_proj,v_proj
svdadapt plan recipes/mistral_dude.yaml --gpus 8
svdadapt tune recipes/quickstart.yaml --set data.validation_fraction=0.2
svdadapt report runs/a runs/b
svdadapt bench --quick
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help); modules import lazily so `--help` is instant
COMMANDS = {
    "train": ("svdadapt.train", "cli", "fine-tune a model from a YAML recipe (HF Trainer, optionally DeepSpeed)"),
    "eval": ("svdadapt.evaluate", "cli", "evaluate a base model or adapter with lm-eval tasks or GLUE"),
    "count": ("svdadapt.count", "cli", "count trainable parameters per method and rank from a model config"),
    "plan": ("svdadapt.plan", "cli", "per-GPU memory, checkpoint size and init time of a recipe, before running it"),
    "sweep": ("svdadapt.sweep", "cli", "run a grid of recipe variants, resumably, in time-boxed chunks"),
    "tune": ("svdadapt.tune", "cli", "choose a recipe's learning rate on a held-out validation split, resumably"),
    "report": ("svdadapt.report", "cli", "a Markdown table and plots comparing training runs"),
    "bench": ("svdadapt.bench", "cli", "speed and memory benchmarks against the base layer and peft"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher inserts --local_rank=N before the subcommand; LOCAL_RANK in the env says the same
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: svdadapt {" + ",".join(COMMANDS) + "} ...\n")
        for name, (_, _, text) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        return 0
    if argv[0] in ("-V", "--version"):
        from svdadapt.version import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"svdadapt: unknown command {name!r}; choose from {sorted(COMMANDS)}.{hint}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
