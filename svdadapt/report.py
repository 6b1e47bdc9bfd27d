"""`svdadapt report`: compare training runs in a Markdown table and PNG plots.

    svdadapt report runs/rte_edora_s0 runs/rte_edora_s1 runs/rte_lora_s0 --output reports/rte

Each RUN_DIR holds the `metrics.json` the training module writes. Runs that share task, method and
rank (e.g. several seeds) are one row: the median, with (min-max) when there are several. Writes
OUTPUT/report.md and, per task, `<task>_<metric>_vs_params.png` (metric against trainable
parameters, log x axis), `<task>_loss.png` and `<task>_grad_norm.png` (training curves per method).

Runs with a held-out validation split (`data.validation_fraction`; their metrics.json has `test`,
the dev set scored once after training) get the tuned comparison instead: per task and arm (the
run's label) the selected learning rate (best validation metric at the search seed), dev mean ± sd
over the seeds at that rate, and the paired difference from lora with a 95% bootstrap interval over
dev examples and seeds; plus every run of the search and `<task>_val_vs_lr.png`.
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

import numpy as np

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
        groups[str(run.get("task") or "task")][(run.get("label") or run["method"], run["r"])].append(run)
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
    moved = any(isinstance(r.get("magnitude_change"), dict) for r in runs)
    head = [
        "method",
        "r",
        "trainable params",
        "% of total",
        *metrics,
        *(["‖Δm‖/‖m₀‖"] if moved else []),
        "train time (s)",
        "runs",
    ]
    lines = [f"### {task}", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for (method, r), rs in sorted(groups.items(), key=lambda kv: (kv[1][0]["trainable_params"], kv[0][0])):
        params = rs[0]["trainable_params"]
        total = rs[0].get("total_params")
        share = f"{100 * params / total:.3f}" if total else "–"
        cells = [_cell([x["final"][m] for x in rs if isinstance(x["final"].get(m), (int, float))]) for m in metrics]
        times = [x["train_time_s"] for x in rs if isinstance(x.get("train_time_s"), (int, float))]
        if moved:  # the median over layers of each run's relative magnitude change
            cells.append(_cell([x["magnitude_change"]["median"] for x in rs if isinstance(x.get("magnitude_change"), dict)], 6))
        lines.append("| " + " | ".join([method, str(r), f"{params:,}", share, *cells, _cell(times, 1), str(len(rs))]) + " |")
    lines.append("")
    lines.append("Values are the median over runs, with (min–max) when a row has several runs (seeds).")
    if moved:
        lines.append("‖Δm‖/‖m₀‖: how far the magnitude vectors moved from their start (median over layers).")
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


# --- the tuned comparison: selection on validation, dev as a test set ---------------------------

BASELINE = "lora"  # the arm every other is compared with
BOOTSTRAP = 2000  # resamples for the paired intervals


def primary_metric(task: str) -> str:
    """The metric selection and comparisons use: the GLUE task's first (accuracy, Matthews, Pearson)."""
    from svdadapt.data.glue import glue_task

    return glue_task(task).metrics[0]


def _arm(run: dict) -> str:
    return run.get("label") or run["method"]


def select_rate(runs: list[dict], metric: str) -> tuple[float, dict[float, dict]]:
    """The selected learning rate of one arm, and the search: `{rate: validation metrics}`.

    The search uses the arm's lowest seed (the sweep files search at seed 0); the selected rate has the
    best validation `metric`, ties broken by the lower validation loss.
    """
    seed = min(r.get("seed", 0) for r in runs)
    search = {r["learning_rate"]: r["final"] for r in runs if r.get("seed", 0) == seed}
    best = max(search, key=lambda lr: (search[lr].get(metric, -math.inf), -search[lr].get("loss", math.inf)))
    return best, dict(sorted(search.items()))


def _scores(run: dict) -> tuple[np.ndarray, np.ndarray]:
    """A run's per-example dev predictions and labels, as arrays."""
    saved = run.get("test_predictions") or {}
    pred, gold = saved.get("predictions"), saved.get("labels")
    if pred is None or gold is None or len(pred) != len(gold):
        raise ValueError(f"{run['_dir']}/metrics.json: test_predictions lacks per-example predictions and labels")
    as_array = (lambda x: np.array([int(c) for c in x])) if isinstance(pred, str) else np.asarray
    return as_array(pred), as_array(gold)


def paired_difference(
    task: str, arm: dict[int, dict], base: dict[int, dict], metric: str, n_boot: int = BOOTSTRAP, seed: int = 0
):
    """Mean over shared seeds of arm − base on dev `metric`, and its 95% percentile bootstrap interval.

    Each resample draws seeds with replacement and, shared by both arms (paired), dev examples with
    replacement. Returns (difference, low, high, seeds used) or None without a shared seed.
    """
    from svdadapt.data.glue import glue_metrics

    seeds = sorted(set(arm) & set(base))
    if not seeds:
        return None
    a = {s: _scores(arm[s]) for s in seeds}
    b = {s: _scores(base[s]) for s in seeds}
    gold = a[seeds[0]][1]
    if any(not np.array_equal(x[1], gold) for x in (*a.values(), *b.values())):
        raise ValueError(f"{task}: the runs' dev labels differ in order or content; they were not scored on the same dev set")

    def diff(ss, idx) -> float:
        return float(
            np.mean(
                [
                    glue_metrics(task, a[s][0][idx], gold[idx])[metric] - glue_metrics(task, b[s][0][idx], gold[idx])[metric]
                    for s in ss
                ]
            )
        )

    n, rng = len(gold), np.random.default_rng(seed)
    boots = [diff(rng.choice(seeds, len(seeds)), rng.integers(0, n, n)) for _ in range(n_boot)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return diff(seeds, np.arange(n)), float(lo), float(hi), len(seeds)


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _clip_share(runs: list[dict]) -> str:
    counts = [r["clipping"] for r in runs if isinstance(r.get("clipping"), dict) and r["clipping"].get("steps")]
    if not counts:
        return "–"
    return f"{100 * sum(c['clipped'] for c in counts) / sum(c['steps'] for c in counts):.0f}%"


def tuned_comparison(task: str, runs: list[dict]) -> tuple[dict, str]:
    """The selection and the comparison for one task: (`{arm: selected rate}`, Markdown)."""
    metric = primary_metric(task)
    arms: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        arms[_arm(run)].append(run)
    chosen = {name: select_rate(rs, metric) for name, rs in arms.items()}
    at = {name: {r.get("seed", 0): r for r in rs if r["learning_rate"] == chosen[name][0]} for name, rs in arms.items()}
    head = [
        "arm",
        "params",
        "rates searched: validation " + metric,
        "selected",
        "seeds",
        f"dev {metric}, mean ± sd",
        f"Δ vs {BASELINE} [95% interval]",
        "clipped steps",
    ]
    lines = [f"### {task}: tuned", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 5) + "|"]
    for name in sorted(arms, key=lambda n: (arms[n][0]["trainable_params"], n)):
        rate, search = chosen[name]
        rates = sorted(search)
        edge = " (edge)" if len(rates) > 1 and rate in (rates[0], rates[-1]) else " (only rate run)" if len(rates) == 1 else ""
        shown = ", ".join(f"{lr:g}: {v.get(metric, math.nan):.3f}" for lr, v in search.items())
        dev = [r["test"][metric] for r in at[name].values() if metric in r.get("test", {})]
        mean, sd = mean_sd(dev) if dev else (math.nan, None)
        cell = f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
        delta = "–"
        if name != BASELINE and BASELINE in at:
            found = paired_difference(task, at[name], at[BASELINE], metric)
            if found:
                d, lo, hi, k = found
                mark = " *" if lo > 0 or hi < 0 else ""
                delta = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark} (n={k})"
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    f"{arms[name][0]['trainable_params']:,}",
                    shown,
                    f"{rate:g}{edge}",
                    str(len(dev)),
                    cell,
                    delta,
                    _clip_share(list(at[name].values())),
                ]
            )
            + " |"
        )
    lines += [
        "",
        f"Selected: the rate with the best {metric} on the held-out validation split (carved from the training "
        "examples) at the search seed, ties to the lower validation loss; (edge): the best rate is at the grid's edge; (only rate run): no search yet. "
        f"Dev is scored once per run, after training. Δ: mean over shared seeds of the arm's dev {metric} minus "
        f"{BASELINE}'s, each at its selected rate, with a 95% percentile bootstrap interval over dev examples (paired) and "
        f"seeds ({BOOTSTRAP} resamples); * the interval excludes 0. Clipped steps: optimiser steps whose gradient "
        "norm exceeded max_grad_norm, over the runs at the selected rate.",
    ]
    return {name: chosen[name][0] for name in arms}, "\n".join(lines)


def search_table(task: str, runs: list[dict]) -> str:
    """Every run of the search and the seeds: validation and dev metrics, clipping, time."""
    metric = primary_metric(task)
    lines = [
        f"### {task}: every run",
        "",
        f"| arm | learning rate | seed | validation {metric} | validation loss | dev {metric} | dev loss | clipped | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(runs, key=lambda r: (_arm(r), r["learning_rate"], r.get("seed", 0))):
        val, dev = r["final"], r.get("test", {})
        scores = [f"{x.get(k, math.nan):.4f}" for x in (val, dev) for k in (metric, "loss")]
        cells = [_arm(r), f"{r['learning_rate']:g}", str(r.get("seed", "–")), *scores, _clip_share([r])]
        lines.append("| " + " | ".join([*cells, f"{r.get('train_cpu_s', math.nan):.0f}"]) + " |")
    return "\n".join(lines)


def plot_validation_vs_rate(task: str, runs: list[dict], path: Path) -> Path:
    """Validation metric against learning rate (log x), one line per arm, at the search seed."""
    plt, metric = _plt(), primary_metric(task)
    arms: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        arms[_arm(run)].append(run)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, rs in sorted(arms.items()):
        _, search = select_rate(rs, metric)
        ax.plot(list(search), [v.get(metric, math.nan) for v in search.values()], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"{task}: learning-rate search (held-out validation split)")
    ax.grid(True, which="both", alpha=0.3)
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
    held_out = [r for r in runs if "test" in r]
    tasks: dict[str, list[dict]] = defaultdict(list)
    for run in held_out:
        tasks[str(run.get("task") or "task")].append(run)
    for task, rs in tasks.items():
        selected, table = tuned_comparison(task, rs)
        curves = {(a, rs[0]["r"]): [r for r in rs if _arm(r) == a and r["learning_rate"] == lr] for a, lr in selected.items()}
        figures = [plot_validation_vs_rate(task, rs, out / f"{_slug(task)}_val_vs_lr.png")]
        figures += [plot_curves(task, curves, "loss", "training loss (selected rates)", out / f"{_slug(task)}_tuned_loss.png")]
        parts += [table, "", search_table(task, rs), ""] + [f"![{p.stem}]({p.name})" for p in figures if p is not None] + [""]
    for task, groups in group_runs([r for r in runs if "test" not in r]).items():
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
