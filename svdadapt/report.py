"""`svdadapt report`: compare training runs in a Markdown table and PNG plots.

    svdadapt report runs/rte_edora_s0 runs/rte_edora_s1 runs/rte_lora_s0 --output reports/rte

Each RUN_DIR holds the `metrics.json` the training module writes. Runs that share task, method and
rank (e.g. several seeds) are one row: the median, with (min-max) when there are several. Writes
OUTPUT/report.md and, per task, `<task>_<metric>_vs_params.png` (metric against trainable
parameters, log x axis), `<task>_loss.png` and `<task>_grad_norm.png` (training curves per method).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REQUIRED = ("method", "r", "trainable_params", "final")


def load_run(directory: str | Path) -> dict:
    """A run's `metrics.json`, checked for the fields the report uses; raises `ValueError` naming the file."""
    path = Path(directory) / "metrics.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass run directories written by `svdadapt train`")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if missing := [k for k in REQUIRED if k not in run]:
        raise ValueError(f"{path} lacks {missing}; it was not written by `svdadapt train`")
    if not isinstance(run["final"], dict):
        raise ValueError(f"{path}: 'final' must be an object of metric -> value, got {type(run['final']).__name__}")
    run["_dir"] = str(directory)
    return run


def group_runs(runs: list[dict]) -> dict[str, dict[tuple, list[dict]]]:
    """`{task: {(method, r): [runs]}}`; runs in a group differ only by seed."""
    groups: dict[str, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[str(run.get("task") or "task")][(run["method"], run["r"])].append(run)
    return {t: dict(g) for t, g in groups.items()}


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of `values`."""
    return statistics.median(values), min(values), max(values)


def _metrics(runs: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for run in runs:
        for k, v in run["final"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                names.setdefault(k)
    return list(names)


def _cell(values: list[float], digits: int = 4) -> str:
    if not values:
        return "–"
    med, lo, hi = spread(values)
    return f"{med:.{digits}f}" if len(values) == 1 else f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def markdown_table(task: str, groups: dict[tuple, list[dict]]) -> str:
    """One Markdown table row per (method, r), sorted by trainable parameters."""
    runs = [r for g in groups.values() for r in g]
    metrics = _metrics(runs)
    head = ["method", "r", "trainable params", "% of total", *metrics, "train time (s)", "runs"]
    lines = [f"### {task}", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for (method, r), rs in sorted(groups.items(), key=lambda kv: (kv[1][0]["trainable_params"], kv[0][0])):
        params = rs[0]["trainable_params"]
        total = rs[0].get("total_params")
        share = f"{100 * params / total:.3f}" if total else "–"
        cells = [_cell([x["final"][m] for x in rs if isinstance(x["final"].get(m), (int, float))]) for m in metrics]
        times = [x["train_time_s"] for x in rs if isinstance(x.get("train_time_s"), (int, float))]
        lines.append("| " + " | ".join([method, str(r), f"{params:,}", share, *cells, _cell(times, 1), str(len(rs))]) + " |")
    lines.append("")
    lines.append("Values are the median over runs, with (min–max) when a row has several runs (seeds).")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "metric"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_params(task: str, groups: dict[tuple, list[dict]], metric: str, path: Path) -> Path:
    """`metric` against trainable parameters (log x), one line per method over its ranks, min-max error bars."""
    plt = _plt()
    by_method: dict[str, list[tuple[int, int, list[float]]]] = defaultdict(list)
    for (method, r), rs in groups.items():
        vals = [x["final"][metric] for x in rs if isinstance(x["final"].get(metric), (int, float))]
        if vals:
            by_method[method].append((rs[0]["trainable_params"], r, vals))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, points in sorted(by_method.items()):
        points.sort()
        xs = [p[0] for p in points]
        med = [spread(p[2])[0] for p in points]
        err = [[m - spread(p[2])[1] for m, p in zip(med, points)], [spread(p[2])[2] - m for m, p in zip(med, points)]]
        ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=method)
        for x, y, p in zip(xs, med, points):
            ax.annotate(f"r={p[1]}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: {metric} vs trainable parameters (median, min–max)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curve(rs: list[dict], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Steps and the median, min and max of `key` over the runs at each logged step."""
    at: dict[float, list[float]] = defaultdict(list)
    for run in rs:
        for entry in run.get("log_history") or ():
            v = entry.get(key)
            if isinstance(v, (int, float)) and "step" in entry and math.isfinite(v):
                at[entry["step"]].append(v)
    steps = sorted(at)
    return steps, [statistics.median(at[s]) for s in steps], [min(at[s]) for s in steps], [max(at[s]) for s in steps]


def plot_curves(task: str, groups: dict[tuple, list[dict]], key: str, ylabel: str, path: Path) -> Path | None:
    """Training curves of `key` (e.g. loss) per method and rank: median line, min-max band. None if never logged."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    for (method, r), rs in sorted(groups.items()):
        steps, med, lo, hi = _curve(rs, key)
        if not steps:
            continue
        label = f"{method} r={r}" + (f" (n={len(rs)})" if len(rs) > 1 else "")
        (line,) = ax.plot(steps, med, label=label)
        if len(rs) > 1:
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{task}: {ylabel} per method")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dirs: list[str], output: str | Path) -> Path:
    """Read the runs and write `report.md` and the plots into `output`; returns the report's path."""
    if not run_dirs:
        raise ValueError("no run directories given; pass one or more RUN_DIRs holding metrics.json")
    runs = [load_run(d) for d in run_dirs]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# svdadapt report", "", "Runs: " + ", ".join(f"`{r['_dir']}`" for r in runs), ""]
    for task, groups in group_runs(runs).items():
        parts += [markdown_table(task, groups), ""]
        task_runs = [r for g in groups.values() for r in g]
        figures = [
            plot_metric_vs_params(task, groups, m, out / f"{_slug(task)}_{_slug(m)}_vs_params.png") for m in _metrics(task_runs)
        ]
        figures += [plot_curves(task, groups, "loss", "training loss", out / f"{_slug(task)}_loss.png")]
        figures += [plot_curves(task, groups, "grad_norm", "gradient norm", out / f"{_slug(task)}_grad_norm.png")]
        parts += [f"![{p.stem}]({p.name})" for p in figures if p is not None] + [""]
    report = out / "report.md"
    report.write_text("\n".join(parts))
    return report


def cli(argv: list[str]) -> int:
    """Entry point of `svdadapt report`; returns the exit code (2 for bad input)."""
    p = argparse.ArgumentParser(prog="svdadapt report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, each with a metrics.json")
    p.add_argument("--output", default="report", help="directory for report.md and the PNG plots (default: ./report)")
    args = p.parse_args(argv)
    try:
        report = write_report(args.runs, args.output)
    except ValueError as e:
        print(f"svdadapt report: error: {e}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"wrote {report} and plots in {report.parent}")
    return 0
