"""How often a learning-rate selection made early in training picks the rate the full budget picks.

    python scripts/short_budget.py docs/results/glue_minilm_tuned/runs

Reads the committed round-two search runs (seed 0, several rates per task and arm), applies the project's
fixed rule (`svdadapt.report.select_rate`: best validation metric, ties to the lower validation loss) to
the validation evaluations logged at each epoch end (1/3 and 2/3 of the 78 steps, and the end), and prints,
per budget, how many (task, arm) selections agree with the full budget's, and the dev accuracy the
disagreeing ones lose (dev at the early pick minus dev at the full pick, seed 0; dev is only described).
The early evaluations are of runs whose schedule spans the full budget (not of shorter runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from svdadapt.report import load_run, primary_metric, select_rate


def searches(folder: Path) -> dict[tuple[str, str], list[dict]]:
    """`{(task, arm): [seed-0 runs]}` for the arms searched at 2 or more rates."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for d in sorted(p.parent for p in folder.glob("*/metrics.json")):
        run = load_run(d)
        if run.get("seed", 0) == 0 and run.get("eval_history"):
            groups[(run["task"], run.get("label") or run["method"])].append(run)
    return {k: rs for k, rs in groups.items() if len({r["learning_rate"] for r in rs}) >= 2}


def at_step(run: dict, step: int) -> dict:
    """The run with `final` replaced by its validation evaluation at `step`."""
    entry = next(e for e in run["eval_history"] if e["step"] == step)
    return {**run, "final": entry}


def measure(groups: dict[tuple[str, str], list[dict]], share: float) -> dict[str, dict]:
    """Per task (and "all"): searches compared, how many agree, and dev at the full pick minus dev at the early pick."""
    out: dict[str, dict] = defaultdict(lambda: {"n": 0, "agree": 0, "losses": []})
    for (task, _), rs in sorted(groups.items()):
        metric = primary_metric(task)
        step = round(share * rs[0]["train_steps"])
        if not all(any(e["step"] == step for e in r["eval_history"]) for r in rs):
            continue
        full, _ = select_rate(rs, metric)
        early, _ = select_rate([at_step(r, step) for r in rs], metric)
        dev = {r["learning_rate"]: r["test"][metric] for r in rs}
        for key in (task, "all"):
            out[key]["n"] += 1
            out[key]["agree"] += early == full
            if early != full:
                out[key]["losses"].append(dev[full] - dev[early])
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="a folder of run directories, e.g. docs/results/glue_minilm_tuned/runs")
    args = p.parse_args(argv)
    groups = searches(args.runs)
    if not groups:
        print(f"{args.runs}: no seed-0 searches with eval_history and 2 or more rates", file=sys.stderr)
        return 2
    print(f"{len(groups)} searches (task x arm): {', '.join(f'{t}/{a}' for t, a in sorted(groups))}\n")
    print(
        "| budget | task | same rate as the full budget | dev at the full pick minus at the early pick, where they differ: median (min, max) |"
    )
    print("|---|---|---:|---:|")
    for share in (1 / 3, 2 / 3):
        for task, row in sorted(measure(groups, share).items(), key=lambda kv: (kv[0] == "all", kv[0])):
            lost = row["losses"]
            cost = f"{statistics.median(lost):+.3f} ({min(lost):+.3f}, {max(lost):+.3f})" if lost else "–"
            print(f"| {share:.2f} of the steps | {task} | {row['agree']}/{row['n']} | {cost} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
