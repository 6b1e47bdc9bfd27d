"""Where the first steps of training go, per parameter group, for lora, pissa, dude and edora.

    python scripts/fragility.py --task rte --rate 2e-3 --steps 10 > fragility_rte.md

Trains round two's evidence recipe (recipes/evidence/glue_minilm_tuned.yaml: MiniLM, r 8, clipping at
1.0) for a few steps at one shared learning rate, with clipping and without, and prints per method and
parameter group (the adapter factors A, B, R, the magnitude m, and the pooler and head): the gradient
norm at step 1 (before clipping), and after the last step the relative change ‖θ − θ₀‖ / ‖θ₀‖ (absolute
‖θ − θ₀‖ where θ₀ = 0, lora's B); plus the median over adapted layers of the relative change of the
layer's effective weight ‖W(t) − W(0)‖ / ‖W(0)‖, and the steps clipped. Needs ../shared/data/glue.
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
    sets = [f"adapter.method={method}", f"training.learning_rate={rate}", f"training.max_steps={steps}", f"data.glue_task={task}"]
    sets += ["training.logging_steps=1", "training.eval_strategy=no", "training.save_strategy=no"]
    sets += ["data.validation_fraction=0", "data.max_eval_samples=8", f"training.max_grad_norm={clip}"]
    probe = Probe()
    with tempfile.TemporaryDirectory() as out:
        recipe = dataclasses.replace(load_recipe(RECIPE, sets), output_dir=out)
        with contextlib.redirect_stdout(sys.stderr):  # the table alone on stdout
            result = run(recipe, callbacks=[probe])
    pre = [e["grad_norm"] for e in result.metrics["log_history"] if "grad_norm" in e]
    first = probe.grads[0]
    scale = pre[0] / (_norm([torch.tensor(v) for v in first.values()]) or 1.0)  # undo clipping at step 1
    moved = {}
    for g, ps in probe.groups.items():
        start = _norm(probe.start[g])
        delta = _norm([p - s for p, s in zip(ps, probe.start[g])])
        moved[g] = (delta / start, "rel") if start > 0 else (delta, "abs")
    after = [layer.merged_weight() for _, layer in adapter_layers(result.model)]
    dw = statistics.median(float((a - b).norm() / b.norm()) for a, b in zip(after, probe.weights))
    return {
        "grad": {g: v * scale for g, v in first.items()},
        "moved": moved,
        "dw": dw,
        "clipped": result.metrics["clipping"],
        "loss": [round(e["loss"], 3) for e in result.metrics["log_history"] if "loss" in e],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="rte")
    p.add_argument("--rate", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    print(f"{args.task}, learning rate {args.rate:g} for every method, {args.steps} steps (pooler and head at 1e-3)\n")
    print(
        "| method | clipping | grad norm at step 1 by group | ‖Δθ‖/‖θ₀‖ after the last step by group | median ‖ΔW‖/‖W‖ | clipped | training loss |"
    )
    print("|---|---|---|---|---:|---:|---|")
    for method in args.methods.split(","):
        for clip in (1.0, NO_CLIP):
            m = measure(method, args.rate, args.task, args.steps, clip)
            grad = ", ".join(f"{g} {v:.3g}" for g, v in m["grad"].items())
            moved = ", ".join(f"{g} {v:.3g}" + (" (abs)" if kind == "abs" else "") for g, (v, kind) in m["moved"].items())
            c = m["clipped"]
            loss = f"{m['loss'][0]} → {m['loss'][-1]}"
            label = "1.0" if clip == 1.0 else "off"
            print(f"| {method} | {label} | {grad} | {moved} | {m['dw']:.3g} | {c['clipped']}/{c['steps']} | {loss} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
