"""Where training goes, per parameter group, for lora, pissa, dude and edora (a start, or the whole run).

    python scripts/fragility.py --task rte --rate 2e-3 --steps 10 > fragility_rte.md
    python scripts/fragility.py --task rte --rate 2e-3 --steps 0    # the recipe's whole budget, dev scored

Trains round two's evidence recipe (recipes/evidence/glue_minilm_tuned.yaml: MiniLM, r 8, clipping at
1.0) for a few steps (--steps 0: the whole budget, all 1,024 sampled pairs, 96 steps) at one shared
learning rate, with clipping and without, and prints per method and parameter group (the adapter
factors A, B, R, the magnitude m, and the pooler and head): the gradient norm before clipping (at step 1;
with --steps 0 its median and maximum over all steps), and after the last step the relative change
‖θ − θ₀‖ / ‖θ₀‖ (absolute ‖θ − θ₀‖ where θ₀ = 0, lora's B); plus the median over adapted layers of the
relative change of the layer's effective weight ‖W(t) − W(0)‖ / ‖W(0)‖, the steps clipped, and with
--steps 0 the dev score after training. Needs ../shared/data/glue.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile

import torch
from transformers import TrainerCallback

from svdadapt.model import adapter_layers
from svdadapt.recipe import load_recipe
from svdadapt.train import run

RECIPE = "recipes/evidence/glue_minilm_tuned.yaml"
METHODS = ("lora", "pissa", "dude", "edora")
NO_CLIP = 1e9  # max_grad_norm large enough never to clip


def groups(model) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable tensors by group: the factor names of the adapter layers, and "head" for the rest."""
    out: dict[str, list] = {}
    seen = set()
    for _, layer in adapter_layers(model):
        for name, p in layer.factors().items():
            if p is not None and p.requires_grad:
                out.setdefault(name, []).append(p)
                seen.add(id(p))
    out["head"] = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return out


def _norm(ts) -> float:
    return float(torch.sqrt(sum((t.detach().float() ** 2).sum() for t in ts)))


class Probe(TrainerCallback):
    """Gradient norms per group at each optimiser step (after clipping), and the start values."""

    def __init__(self):
        self.grads: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.groups = groups(model)
        self.start = {g: [p.detach().clone() for p in ps] for g, ps in self.groups.items()}
        self.weights = [layer.merged_weight().clone() for _, layer in adapter_layers(model)]
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({g: _norm([p.grad for p in ps if p.grad is not None]) for g, ps in self.groups.items()})


def measure(method: str, rate: float, task: str, steps: int, clip: float) -> dict:
    sets = [f"adapter.method={method}", f"training.learning_rate={rate}", f"data.glue_task={task}"]
    sets += ["training.logging_steps=1", "training.eval_strategy=no", "training.save_strategy=no"]
    sets += ["data.validation_fraction=0", f"training.max_grad_norm={clip}"]
    if steps:  # a start only: dev is not the point, score 8 examples
        sets += [f"training.max_steps={steps}", "data.max_eval_samples=8"]
    probe = Probe()
    with tempfile.TemporaryDirectory() as out:
        recipe = dataclasses.replace(load_recipe(RECIPE, sets), output_dir=out)
        with contextlib.redirect_stdout(sys.stderr):  # the table alone on stdout
            result = run(recipe, callbacks=[probe])
    pre = [e["grad_norm"] for e in result.metrics["log_history"] if "grad_norm" in e]
    if len(pre) != len(probe.grads):
        raise RuntimeError(f"{len(pre)} logged gradient norms for {len(probe.grads)} optimiser steps")
    # the probe sees clipped gradients: every group is scaled by the same factor, undone per step
    steps_pre = [
        {g: v * p / (_norm([torch.tensor(x) for x in post.values()]) or 1.0) for g, v in post.items()}
        for p, post in zip(pre, probe.grads)
    ]
    moved = {}
    for g, ps in probe.groups.items():
        start = _norm(probe.start[g])
        delta = _norm([p - s for p, s in zip(ps, probe.start[g])])
        moved[g] = (delta / start, "rel") if start > 0 else (delta, "abs")
    after = [layer.merged_weight() for _, layer in adapter_layers(result.model)]
    dw = statistics.median(float((a - b).norm() / b.norm()) for a, b in zip(after, probe.weights))
    final = {k: v for k, v in result.metrics["final"].items() if k != "loss"}
    return {
        "grad": steps_pre[0],
        "grad_median": {g: statistics.median(s[g] for s in steps_pre) for g in steps_pre[0]},
        "grad_max": {g: max(s[g] for s in steps_pre) for g in steps_pre[0]},
        "largest": statistics.mode(max(s, key=s.get) for s in steps_pre),
        "dev": next(iter(final.items()), ("-", float("nan"))),
        "moved": moved,
        "dw": dw,
        "clipped": result.metrics["clipping"],
        "loss": [round(e["loss"], 3) for e in result.metrics["log_history"] if "loss" in e],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="rte")
    p.add_argument("--rate", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=10, help="optimiser steps (0: the recipe's whole budget, dev scored)")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    full = args.steps == 0
    budget = "the recipe's whole budget" if full else f"{args.steps} steps"
    print(f"{args.task}, learning rate {args.rate:g} for every method, {budget} (pooler and head at 1e-3)\n")
    if full:
        print(
            "| method | clipping | grad norm by group, median (max) over steps | largest group on most steps"
            " | ‖Δθ‖/‖θ₀‖ at the end by group | median ‖ΔW‖/‖W‖ | clipped | training loss | dev |"
        )
        print("|---|---|---|---|---|---:|---:|---|---:|")
    else:
        print(
            "| method | clipping | grad norm at step 1 by group | ‖Δθ‖/‖θ₀‖ after the last step by group | median ‖ΔW‖/‖W‖ | clipped | training loss |"
        )
        print("|---|---|---|---|---:|---:|---|")
    for method in args.methods.split(","):
        for clip in (1.0, NO_CLIP):
            m = measure(method, args.rate, args.task, args.steps, clip)
            moved = ", ".join(f"{g} {v:.3g}" + (" (abs)" if kind == "abs" else "") for g, (v, kind) in m["moved"].items())
            c = m["clipped"]
            loss = f"{m['loss'][0]} → {m['loss'][-1]}"
            label = "1.0" if clip == 1.0 else "off"
            if full:
                grad = ", ".join(f"{g} {m['grad_median'][g]:.3g} ({m['grad_max'][g]:.3g})" for g in m["grad"])
                name, score = m["dev"]
                row = f"| {method} | {label} | {grad} | {m['largest']} | {moved} | {m['dw']:.3g} | {c['clipped']}/{c['steps']} | {loss} | {name} {score:.4f} |"
            else:
                grad = ", ".join(f"{g} {v:.3g}" for g, v in m["grad"].items())
                row = f"| {method} | {label} | {grad} | {moved} | {m['dw']:.3g} | {c['clipped']}/{c['steps']} | {loss} |"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
