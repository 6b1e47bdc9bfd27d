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


def _curve(rs: list[dict], key: str, history: str = "log_history") -> tuple[list[float], list[float], list[float], list[float]]:
    """Steps and the median, min and max of `key` over the runs at each step of their `history`
    (`log_history`: training logs; `eval_history`: held-out evaluations)."""
    at: dict[float, list[float]] = defaultdict(list)
    for run in rs:
        for entry in run.get(history) or ():
            v = entry.get(key)
            if isinstance(v, (int, float)) and "step" in entry and math.isfinite(v):
                at[entry["step"]].append(v)
    steps = sorted(at)
    return steps, [statistics.median(at[s]) for s in steps], [min(at[s]) for s in steps], [max(at[s]) for s in steps]


def plot_curves(
    task: str, groups: dict[tuple, list[dict]], key: str, ylabel: str, path: Path, history: str = "log_history"
) -> Path | None:
    """Curves of `key` (e.g. loss) in each run's `history`, per method and rank: median line, min-max band.

    None if no run has `key` there. Held-out evaluations (`eval_history`) are few points, so they get markers.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    for i, ((method, r), rs) in enumerate(sorted(groups.items())):
        steps, med, lo, hi = _curve(rs, key, history)
        if not steps:
            continue
        label = f"{method} r={r}" + (f" (n={len(rs)})" if len(rs) > 1 else "")
        style = ("-", "--", ":", "-.")[i // 10 % 4]  # the colour cycle has 10 colours: a new line style after each 10
        (line,) = ax.plot(steps, med, style, label=label, marker="o" if history == "eval_history" else None)
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


class Selection:
    """One task's tuned arms: each arm's runs, its selected rate with the search, and its runs at that rate by seed."""

    def __init__(self, task: str, runs: list[dict], counts: dict[tuple, int] | None = None):
        self.task, self.metric = task, primary_metric(task)
        self.counts = adapter_counts(runs) if counts is None else counts
        self._differences: dict[tuple[str, str], tuple | None] = {}
        self.arms: dict[str, list[dict]] = defaultdict(list)
        for run in runs:
            self.arms[_arm(run)].append(run)
        self.chosen = {name: select_rate(rs, self.metric) for name, rs in self.arms.items()}
        self.at = {
            name: {r.get("seed", 0): r for r in rs if r["learning_rate"] == self.chosen[name][0]}
            for name, rs in self.arms.items()
        }

    def adapter_params(self, name: str) -> int | None:
        """The arm's adapter parameters: its runs' `adapter_params`, or a run's of the same arm, model and rank."""
        return self.counts.get(_count_key(self.arms[name][0]))

    def params(self, name: str) -> int:
        """Adapter parameters if every arm has them, else all trainable ones (runs written before the field)."""
        if all(self.adapter_params(n) is not None for n in self.arms):
            return self.adapter_params(name)
        return self.arms[name][0]["trainable_params"]

    def order(self) -> list[str]:
        return sorted(self.arms, key=lambda n: (self.arms[n][0]["trainable_params"], n))

    def difference(self, name: str, base: str):
        """`paired_difference` of two arms at their selected rates, or None if either is missing."""
        if name not in self.at or base not in self.at:
            return None
        if (name, base) not in self._differences:  # the tuned table and the claims ask for some pairs twice
            self._differences[name, base] = paired_difference(self.task, self.at[name], self.at[base], self.metric)
        return self._differences[name, base]


def _count_key(run: dict) -> tuple:
    return _arm(run), run.get("model"), run["r"]


def adapter_counts(runs: list[dict]) -> dict[tuple, int]:
    """`{(arm, model, r): adapter_params}` from the runs that record it (the count does not depend on the task)."""
    return {_count_key(r): r["adapter_params"] for r in runs if "adapter_params" in r}


def _params_label(sel: Selection) -> str:
    has = all(sel.adapter_params(n) is not None for n in sel.arms)
    return "adapter params" if has else "trainable params"


def _interval(found) -> str:
    if not found:
        return "–"
    d, lo, hi, k = found
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark} (n={k})"


def tuned_comparison(task: str, runs: list[dict], counts: dict[tuple, int] | None = None) -> tuple[dict, str]:
    """The selection and the comparison for one task: (`{arm: selected rate}`, Markdown)."""
    return _tuned_table(Selection(task, runs, counts))


def _tuned_table(sel: Selection) -> tuple[dict, str]:
    task, metric = sel.task, sel.metric
    head = [
        "arm",
        _params_label(sel),
        "rates searched: validation " + metric,
        "selected",
        "seeds",
        f"dev {metric}, mean ± sd",
        f"Δ vs {BASELINE} [95% interval]",
        "clipped steps",
    ]
    lines = [f"### {task}: tuned", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 5) + "|"]
    for name in sel.order():
        rate, search = sel.chosen[name]
        rates = sorted(search)
        edge = " (edge)" if len(rates) > 1 and rate in (rates[0], rates[-1]) else " (only rate run)" if len(rates) == 1 else ""
        shown = ", ".join(f"{lr:g}: {v.get(metric, math.nan):.3f}" for lr, v in search.items())
        dev = [r["test"][metric] for r in sel.at[name].values() if metric in r.get("test", {})]
        mean, sd = mean_sd(dev) if dev else (math.nan, None)
        cell = f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
        delta = _interval(sel.difference(name, BASELINE)) if name != BASELINE else "–"
        cells = [name, f"{sel.params(name):,}", shown, f"{rate:g}{edge}", str(len(dev)), cell, delta]
        lines.append("| " + " | ".join([*cells, _clip_share(list(sel.at[name].values()))]) + " |")
    lines += [
        "",
        f"Selected: the rate with the best {metric} on the held-out validation split (carved from the training "
        "examples) at the search seed, ties to the lower validation loss; (edge): the best rate is at the grid's edge; (only rate run): no search yet. "
        f"Dev is scored once per run, after training. Δ: mean over shared seeds of the arm's dev {metric} minus "
        f"{BASELINE}'s, each at its selected rate, with a 95% percentile bootstrap interval over dev examples (paired) and "
        f"seeds ({BOOTSTRAP} resamples); * the interval excludes 0. Clipped steps: optimiser steps whose gradient "
        "norm exceeded max_grad_norm, over the runs at the selected rate.",
    ]
    return {name: sel.chosen[name][0] for name in sel.arms}, "\n".join(lines)


def sensitivity(task: str, runs: list[dict]) -> str:
    """What to run: per arm the selected rate, and dev at it against the neighbouring grid points (search seed)."""
    return _sensitivity_table(Selection(task, runs))


def _sensitivity_table(sel: Selection) -> str:
    task, metric = sel.task, sel.metric
    lines = [
        f"### {task}: what to run, and how sensitive the rate is",
        "",
        f"| arm | selected rate | validation {metric} | dev {metric}: next lower rate · selected · next higher rate "
        "| largest dev drop to a neighbour |",
        "|---|---:|---:|---|---:|",
    ]
    for name in sel.order():
        rate, search = sel.chosen[name]
        seed = min(r.get("seed", 0) for r in sel.arms[name])
        dev = {r["learning_rate"]: r.get("test", {}).get(metric) for r in sel.arms[name] if r.get("seed", 0) == seed}
        rates = sorted(dev)
        i = rates.index(rate)
        near = [rates[j] for j in (i - 1, i + 1) if 0 <= j < len(rates)]

        def at(lr, dev=dev):
            return "–" if lr is None or dev[lr] is None else f"{dev[lr]:.3f} ({lr:g})"

        lower, higher = (rates[i - 1] if i > 0 else None), (rates[i + 1] if i + 1 < len(rates) else None)
        drops = [dev[rate] - dev[lr] for lr in near if dev[lr] is not None and dev[rate] is not None]
        cells = [name, f"{rate:g}", f"{search[rate].get(metric, math.nan):.3f}", f"{at(lower)} · {at(rate)} · {at(higher)}"]
        lines.append("| " + " | ".join([*cells, f"{max(drops):+.3f}" if drops else "–"]) + " |")
    lines += [
        "",
        f"All at the search seed. Largest drop: dev {metric} at the selected rate minus the worse of its grid "
        "neighbours (negative: a neighbour scored higher on dev than the rate validation chose). Dev is used here "
        "only to describe sensitivity, never to choose.",
    ]
    return "\n".join(lines)


# The papers' claims the tuned comparison tests: (claim, arm, against, kind). Kinds: "within" (arm no more
# than NONINFERIORITY below `against` on dev, with at least MIN_PARAM_RATIO x fewer adapter parameters),
# "better" (arm above `against` on dev), "faster" (lower mean training loss over the first epoch).
CLAIMS = (
    ("EDoRA within 1 point of LoRA with ≥ 15× fewer parameters", "edora", "lora", "within"),
    ("SVD frozen factors beat random ones (EDoRA Table 3)", "edora", "edora_random", "better"),
    ("DuDe converges faster than DoRA", "dude", "dora", "faster"),
    ("PiSSA converges faster than LoRA", "pissa", "lora", "faster"),
    ("DuDe converges faster than LoRA", "dude", "lora", "faster"),
    ("The magnitude adds accuracy: DoRA over LoRA", "dora", "lora", "better"),
    ("The magnitude adds accuracy: DuDe over PiSSA", "dude", "pissa", "better"),
    ("Magnitude rate ×10 adds accuracy: DoRA", "dora_mlr10", "dora", "better"),
    ("Magnitude rate ×10 adds accuracy: DuDe", "dude_mlr10", "dude", "better"),
)
NONINFERIORITY = 0.01
MIN_PARAM_RATIO = 15.0
MIN_SEEDS = 3  # a verdict other than "cannot tell" needs this many shared seeds


def early_loss(run: dict) -> list[tuple[int, float]]:
    """(step, training loss) of the logged steps in the first epoch."""
    return [
        (e["step"], e["loss"])
        for e in run.get("log_history") or ()
        if isinstance(e.get("loss"), (int, float)) and e.get("step", 0) > 0 and (e.get("epoch") or 0) <= 1.0
    ]


def early_loss_difference(arm: dict[int, dict], base: dict[int, dict], n_boot: int = BOOTSTRAP, seed: int = 0):
    """Mean over shared seeds of arm − base first-epoch training loss, paired by seed and logged step.

    The two runs of a seed see the same batches, so each logged step is a paired difference; the 95%
    interval resamples seeds and, within them, logged steps. Returns (difference, low, high, seeds) or None.
    """
    seeds = sorted(set(arm) & set(base))
    per_seed = []
    for s in seeds:
        a, b = dict(early_loss(arm[s])), dict(early_loss(base[s]))
        steps = sorted(set(a) & set(b))
        if steps:
            per_seed.append(np.array([a[t] - b[t] for t in steps]))
    if not per_seed:
        return None
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        picks = rng.integers(0, len(per_seed), len(per_seed))
        boots.append(np.mean([per_seed[i][rng.integers(0, len(per_seed[i]), len(per_seed[i]))].mean() for i in picks]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(np.mean([d.mean() for d in per_seed])), float(lo), float(hi), len(per_seed)


def verdict(kind: str, found, ratio: float | None = None) -> str:
    """holds / does not hold / cannot tell, from a (difference, low, high, seeds) interval."""
    if not found:
        return "not run"
    _, lo, hi, k = found
    if k < MIN_SEEDS:
        return f"cannot tell ({k} seed{'s' if k > 1 else ''})"
    if kind == "within":
        if ratio is not None and ratio < MIN_PARAM_RATIO:
            return "does not hold (parameter ratio)"
        return "holds" if lo > -NONINFERIORITY else "does not hold" if hi < -NONINFERIORITY else "cannot tell"
    if kind == "faster":
        return "holds" if hi < 0 else "does not hold" if lo > 0 else "cannot tell"
    return "holds" if lo > 0 else "does not hold" if hi < 0 else "cannot tell"


def claims(task: str, runs: list[dict], counts: dict[tuple, int] | None = None) -> str:
    """The papers' claims (`CLAIMS`) on one task, each arm at its selected rate, with a verdict."""
    return _claims_table(Selection(task, runs, counts))


def _claims_table(sel: Selection) -> str:
    task = sel.task
    lines = [
        f"### {task}: the claims",
        "",
        "| claim | measure | difference [95% interval] | verdict | the same difference at equal rates (search seed) |",
        "|---|---|---:|---|---|",
    ]
    for claim, name, base, kind in CLAIMS:
        if name not in sel.at or base not in sel.at:
            continue
        ratio = None
        if kind == "faster":
            found = early_loss_difference(sel.at[name], sel.at[base])
            measure = f"first-epoch training loss, {name} − {base}"
        else:
            found = sel.difference(name, base)
            measure = f"dev {sel.metric}, {name} − {base}"
            if kind == "within":
                ratio = sel.params(base) / max(sel.params(name), 1)
                measure += f"; {ratio:.1f}× fewer {_params_label(sel)}"
        same = " · ".join(f"{lr:g}: {d:+.3f}" for lr, d in equal_rate_differences(sel, name, base, kind).items()) or "–"
        lines.append(f"| {claim} | {measure} | {_interval(found)} | {verdict(kind, found, ratio)} | {same} |")
    if len(lines) == 4:
        return ""
    lines += [
        "",
        f"Each arm at its selected rate; intervals as in the tuned table (first-epoch loss: paired by seed and logged "
        f"step, resampling both). Verdicts: a difference needs {MIN_SEEDS} shared seeds and an interval on one side "
        f'(of −{NONINFERIORITY:g} for "within", of 0 otherwise); anything else is "cannot tell". Equal rates: the '
        "measure at each learning rate both arms ran at the search seed, a check that a difference does not come "
        "from the two arms' rate selections alone (the intervals do not include the selection's own noise).",
    ]
    return "\n".join(lines)


def equal_rate_differences(sel: Selection, name: str, base: str, kind: str) -> dict[float, float]:
    """`{rate: arm − base}` at every rate both arms ran at the search seed (dev metric, or first-epoch loss)."""

    def at_seed(arm: str) -> dict[float, dict]:
        seed = min(r.get("seed", 0) for r in sel.arms[arm])
        return {r["learning_rate"]: r for r in sel.arms[arm] if r.get("seed", 0) == seed}

    a, b = at_seed(name), at_seed(base)
    out = {}
    for lr in sorted(set(a) & set(b)):
        if kind == "faster":
            found = early_loss_difference({0: a[lr]}, {0: b[lr]}, n_boot=1)
            if found:
                out[lr] = found[0]
        elif sel.metric in a[lr].get("test", {}) and sel.metric in b[lr].get("test", {}):
            out[lr] = a[lr]["test"][sel.metric] - b[lr]["test"][sel.metric]
    return out


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
    metric = primary_metric(task)
    arms: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        arms[_arm(run)].append(run)
    fig, ax = rate_figure()
    for name, rs in sorted(arms.items()):
        _, search = select_rate(rs, metric)
        ax.plot(list(search), [v.get(metric, math.nan) for v in search.values()], marker="o", label=name)
    return save_rate_plot(fig, ax, f"validation {metric}", f"{task}: learning-rate search (held-out validation split)", path)


def rate_figure():
    """A figure and axes for a metric against the learning rate; finish it with `save_rate_plot`."""
    return _plt().subplots(figsize=(6.4, 4.4))


def save_rate_plot(fig, ax, ylabel: str, title: str, path: Path) -> Path:
    """Finish a plot of a metric against the learning rate (log x) and write it to `path` (png)."""
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
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
    counts = adapter_counts(runs)
    for task, rs in tasks.items():
        sel = Selection(task, rs, counts)  # one selection (and one bootstrap per pair) for the task's tables
        selected, table = _tuned_table(sel)
        curves = {(a, rs[0]["r"]): [r for r in rs if _arm(r) == a and r["learning_rate"] == lr] for a, lr in selected.items()}
        figures = [plot_validation_vs_rate(task, rs, out / f"{_slug(task)}_val_vs_lr.png")]
        figures += [plot_curves(task, curves, "loss", "training loss (selected rates)", out / f"{_slug(task)}_tuned_loss.png")]
        found = _claims_table(sel)
        parts += [table, "", _sensitivity_table(sel), ""] + ([found, ""] if found else [])
        parts += [search_table(task, rs), ""] + [f"![{p.stem}]({p.name})" for p in figures if p is not None] + [""]
    for task, groups in group_runs([r for r in runs if "test" not in r]).items():
        parts += [markdown_table(task, groups), ""]
        task_runs = [r for g in groups.values() for r in g]
        figures = [
            plot_metric_vs_params(task, groups, m, out / f"{_slug(task)}_{_slug(m)}_vs_params.png") for m in _metrics(task_runs)
        ]
        figures += [plot_curves(task, groups, "loss", "training loss", out / f"{_slug(task)}_loss.png")]
        figures += [plot_curves(task, groups, "grad_norm", "gradient norm", out / f"{_slug(task)}_grad_norm.png")]
        figures += [plot_curves(task, groups, "loss", "held-out loss", out / f"{_slug(task)}_heldout_loss.png", "eval_history")]
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
