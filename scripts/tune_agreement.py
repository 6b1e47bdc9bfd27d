"""Whether the rate `svdadapt tune` picks scores on dev within the bootstrap interval of the best rate.

    python scripts/tune_agreement.py docs/results/glue_minilm_tuned/runs

Reads seed-0 searches (round two's committed runs, or the candidates of a `tune` output folder) and,
per task and arm, applies tune's own selection (`svdadapt.tune.select`: best validation metric on the split held out of
training, ties to the lower validation loss). Round two's runs are those tune would run for that recipe
at that grid (`--rates`), so its pick is the search's. Prints the rate picked on validation, the rate
with the best dev score, the best rate's 95% percentile bootstrap interval over dev examples, the dev
difference best − pick with its paired interval, and whether the pick's dev lies inside the interval.

    python scripts/tune_agreement.py docs/results/glue_minilm_tuned/runs --across

instead asks whether one rate serves every task: per arm and rate searched on every task, the dev score
on each, marked where it falls below the lower end of that task's best rate's interval.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from svdadapt.data.glue import glue_metrics
from svdadapt.report import BOOTSTRAP, _scores, load_run, paired_difference, primary_metric
from svdadapt.tune import select

ARMS = ("dude", "dora", "lora")


def searches(folder: Path, arms: tuple[str, ...]) -> dict[tuple[str, str], list[dict]]:
    """`{(task, arm): seed-0 runs}` for `arms` searched at 2 or more rates."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for d in sorted(p.parent for p in folder.glob("*/metrics.json")):
        run = load_run(d)
        arm = run.get("label") or run["method"]
        if arm in arms and run.get("seed", 0) == 0:
            groups[(run["task"], arm)].append(run)
    return {k: rs for k, rs in groups.items() if len({r["learning_rate"] for r in rs}) >= 2}


def interval(task: str, run: dict, metric: str, n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of `run`'s dev `metric`, resampling dev examples."""
    pred, gold = _scores(run)
    rng, n = np.random.default_rng(seed), len(gold)
    boots = [glue_metrics(task, pred[i], gold[i])[metric] for i in (rng.integers(0, n, n) for _ in range(n_boot))]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(lo), float(hi)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="a folder of run directories, e.g. docs/results/glue_minilm_tuned/runs")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms (default {','.join(ARMS)})")
    p.add_argument("--across", action="store_true", help="one rate for every task: dev per task at each rate")
    args = p.parse_args(argv)
    groups = searches(args.runs, tuple(a.strip() for a in args.arms.split(",")))
    if not groups:
        print(f"{args.runs}: no seed-0 searches of {args.arms} at 2 or more rates", file=sys.stderr)
        return 2
    if args.across:
        return across(groups)
    print(
        "| task | arm | rates searched | tune's pick (validation) | dev at the pick | best rate on dev | dev there "
        "[95% interval] | best − pick [paired 95% interval] | pick inside |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    inside = 0
    for (task, arm), rs in sorted(groups.items()):
        metric = primary_metric(task)
        by_rate = {r["learning_rate"]: r for r in rs}
        pick = select(rs)
        best = max(by_rate, key=lambda lr: by_rate[lr]["test"][metric])
        dev_pick, dev_best = by_rate[pick]["test"][metric], by_rate[best]["test"][metric]
        lo, hi = interval(task, by_rate[best], metric)
        diff = paired_difference(task, {0: by_rate[best]}, {0: by_rate[pick]}, metric)
        ok = lo <= dev_pick
        inside += ok
        grid = ", ".join(f"{lr:g}" for lr in sorted(by_rate))
        print(
            f"| {task} | {arm} | {grid} | {pick:g} | {dev_pick:.4f} | {best:g} | {dev_best:.4f} [{lo:.4f}, {hi:.4f}] | "
            f"{diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}] | {'yes' if ok else 'no'} |"
        )
    print(f"\n{inside} of {len(groups)} picks score on dev within the best rate's interval")
    return 0


def across(groups: dict[tuple[str, str], list[dict]]) -> int:
    """Per arm, the rates searched on every task: dev on each, * where below the task's best rate's interval."""
    tasks = sorted({t for t, _ in groups})
    print(f"| arm | rate | {' | '.join(tasks)} | tasks inside |")
    print(f"|---|---:|{'---:|' * len(tasks)}---:|")
    floor = {}
    for (task, arm), rs in groups.items():
        metric = primary_metric(task)
        best = max(rs, key=lambda r: r["test"][metric])
        floor[task, arm] = interval(task, best, metric)[0]
    for arm in sorted({a for _, a in groups}):
        by_task = {t: {r["learning_rate"]: r for r in groups[t, arm]} for t in tasks if (t, arm) in groups}
        if len(by_task) < len(tasks):
            continue
        shared = sorted(set.intersection(*(set(rates) for rates in by_task.values())))
        for lr in shared:
            cells, n = [], 0
            for t in tasks:
                dev = by_task[t][lr]["test"][primary_metric(t)]
                n += dev >= floor[t, arm]
                cells.append(f"{dev:.4f}" + ("" if dev >= floor[t, arm] else " *"))
            print(f"| {arm} | {lr:g} | {' | '.join(cells)} | {n} of {len(tasks)} |")
    print("\n* below the lower end of the 95% bootstrap interval of that task's best rate on dev")
    return 0


if __name__ == "__main__":
    sys.exit(main())
