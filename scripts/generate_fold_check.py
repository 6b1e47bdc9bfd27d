"""Unmerged greedy generation of the generate bench's model with and without the model's fold check.

`svdadapt.apply` puts a pre-hook on the model (`svdadapt.layer.FoldCheck`) that checks every adapter
layer's fold once a call, so the layers skip their own check. This runs the same adapted model with the
hook and with it removed, alternately, each call between two merged calls (CPU time, one thread), and
prints the median unmerged / merged ratio of each.

    python scripts/generate_fold_check.py [--method dude] [--reps 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from svdadapt.bench.runtime import GENERATE_PLAN, _moved, generate_model
from svdadapt.layer import AdapterLayer, FoldCheck


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="dude", choices=["dude", "dora", "edora"])
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    unmerged, merged = _moved(generate_model(GENERATE_PLAN), args.method)
    prompt = torch.randint(0, GENERATE_PLAN["vocab"], (1, 16), generator=torch.Generator().manual_seed(2))
    check = FoldCheck([m for m in unmerged.modules() if isinstance(m, AdapterLayer)])

    def generate(model) -> float:
        start = time.process_time()
        model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        return time.process_time() - start

    def use_check(on: bool) -> None:
        FoldCheck.remove(unmerged)
        if on:
            check.install(unmerged)

    generate(merged)
    ratios = {"with the check": [], "without": []}
    for rep in range(args.reps):
        for name in list(ratios)[:: 1 if rep % 2 else -1]:
            use_check(name == "with the check")
            generate(unmerged)  # folds, and warms this configuration
            before, t, after = generate(merged), generate(unmerged), generate(merged)
            ratios[name].append(t / ((before + after) / 2))
    for name, rs in ratios.items():
        print(f"{args.method} {name:15s} unmerged / merged {statistics.median(rs):.3f}  ({', '.join(f'{r:.3f}' for r in rs)})")


if __name__ == "__main__":
    main()
