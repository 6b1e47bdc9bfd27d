"""`svdadapt tune`: choose a recipe's learning rate on its own task, on validation data held out of training.

    svdadapt tune recipes/quickstart.yaml --set data.validation_fraction=0.2 --max-minutes 15
    svdadapt tune recipes/evidence/glue_minilm_tuned.yaml --set data.glue_task=cola --rates 1e-4,3e-4,1e-3

Each candidate rate is one `svdadapt train` run in its own process (as `svdadapt sweep` runs them), in
OUTPUT/lr-<rate>/. The default grid is 7 rates at half-decade steps around the recipe's
`training.learning_rate` (from 1/31.6 to 31.6 times it). The selection is the project's fixed rule
(`svdadapt report`): the best validation metric (GLUE: the task's first metric; math: the lowest loss),
ties broken by the lower validation loss. The dev/test set is never used. When the best rate is at an
edge of the grid, one rate beyond it is added (one more half-decade, or the grid's outer step), at most
`--max-widenings` times. A finished candidate (its metrics.json exists) is never run again, so a killed
or time-boxed tune continues where it stopped when run again with the same arguments.

Writes OUTPUT/tuned.yaml (the recipe at the chosen rate, full budget), OUTPUT/tune.md (every candidate)
and OUTPUT/tune.png (validation metric against rate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml

HALF_DECADE = 10**0.5
POINTS = 7  # default grid: 3 half-decades each way, 31.6x
MAX_WIDENINGS = 3


def default_rates(rate: float) -> list[float]:
    """`POINTS` rates at half-decade steps centred on `rate`, each rounded to two significant digits."""
    half = POINTS // 2
    return [_round(rate * HALF_DECADE**k) for k in range(-half, half + 1)]


def _round(x: float) -> float:
    return float(f"{x:.2g}")


def parse_rates(text: str) -> list[float]:
    """`--rates 1e-4,3e-4,1e-3` as sorted distinct floats; raises `ValueError` naming `--rates`."""
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--rates {text!r}: give comma-separated numbers, e.g. --rates 1e-4,3e-4,1e-3") from None
    if len(rates) < 2 or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise ValueError(f"--rates {text!r}: give at least 2 positive learning rates, e.g. --rates 1e-4,3e-4,1e-3")
    return sorted(set(rates))


def widened(rates: list[float], best: float, step: float | None = None) -> float | None:
    """The rate to add when `best` is at an edge of `rates` (one `step` beyond it), else None.

    `step` defaults to the ratio of the two outermost rates on that side.
    """
    rates = sorted(rates)
    if best == rates[0]:
        return _round(rates[0] / (step or rates[1] / rates[0]))
    if best == rates[-1]:
        return _round(rates[-1] * (step or rates[-1] / rates[-2]))
    return None


def check_held_out(recipe) -> None:
    """Refuse a recipe whose evaluation set is not held out of training: tune must never select on dev/test."""
    d = recipe.data
    if d.kind == "glue" and not (d.validation_fraction or d.validation_size):
        raise ValueError(
            "data.validation_fraction is 0, so the recipe evaluates on GLUE dev; tune selects on a validation split "
            "held out of training: add --set data.validation_fraction=0.2 (dev is then scored once, after training)"
        )
    if d.kind == "math" and not (d.eval_size or d.eval_source):
        raise ValueError(
            "data.eval_size is 0 and data.eval_source is unset: tune needs held-out rows, e.g. --set data.eval_size=200"
        )


def selection_metric(task: str) -> str | None:
    """The metric the fixed rule maximises (GLUE's first metric); None: the lowest validation loss (math)."""
    from svdadapt.data.glue import GLUE_TASKS
    from svdadapt.report import primary_metric

    return primary_metric(task) if task in GLUE_TASKS else None


def select(runs: list[dict]) -> float:
    """The chosen rate among finished candidates, by the project's fixed rule (`report.select_rate`)."""
    from svdadapt.report import select_rate

    metric = selection_metric(str(runs[0].get("task")))
    if metric is None:
        return min(runs, key=lambda r: (r["final"].get("loss", math.inf), r["learning_rate"]))["learning_rate"]
    return select_rate(runs, metric)[0]


def budget_sets(recipe, fraction: float) -> list[str]:
    """`--set` values that shorten a candidate to `fraction` of the recipe's steps (none at 1)."""
    if fraction == 1:
        return []
    t = recipe.training
    if t.max_steps > 0:
        return [f"training.max_steps={max(1, math.ceil(fraction * t.max_steps))}"]
    return [f"training.num_train_epochs={fraction * t.num_train_epochs}"]


def _check_candidate(recipe, run_dir: Path) -> None:
    """A finished candidate is reused only if it ran this recipe; raises `ValueError` naming the keys otherwise."""
    import dataclasses

    from svdadapt.train import check_output_dir

    if (run_dir / "metrics.json").is_file() and (run_dir / "recipe.yaml").is_file():
        try:
            check_output_dir(dataclasses.replace(recipe, output_dir=str(run_dir)), resume=True, overwrite=False)
        except ValueError as e:
            if "holds no complete checkpoint" in str(e):  # the same recipe, finished: nothing to resume
                return
            text = str(e).replace("pick another --output-dir, or pass --overwrite to replace it", "give tune another --output")
            raise ValueError(f"finished candidate of another tune: {text}") from None


def _name(rate: float) -> str:
    return f"lr-{rate:g}"


def _load(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def write_outputs(recipe, runs: list[dict], chosen: float, out: Path, command: str) -> list[Path]:
    """tuned.yaml, tune.md and tune.png in `out`; returns their paths."""
    import dataclasses

    from svdadapt.recipe import dump_recipe

    metric = selection_metric(str(runs[0].get("task")))
    shown = metric or "loss"
    tuned = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, learning_rate=chosen))
    head = f"# Chosen by: {command}\n# Selected learning rate {chosen:g} on the held-out validation split (tune.md).\n"
    (out / "tuned.yaml").write_text(head + dump_recipe(tuned))
    rule = f"best validation {metric}, ties broken by the lower validation loss" if metric else "lowest validation loss"
    lines = [
        f"# svdadapt tune: {recipe.name or 'recipe'}, {runs[0].get('task')}, {recipe.adapter.method}",
        "",
        f"Command: `{command}`. Rule: {rule}. Selected: **{chosen:g}**.",
        "",
        f"| learning rate | validation {shown} | validation loss | clipped steps | steps | |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(runs, key=lambda r: r["learning_rate"]):
        f, clip = r["final"], r.get("clipping") or {}
        clipped = f"{clip['clipped']}/{clip['steps']}" if clip.get("steps") else "–"
        mark = "selected" if r["learning_rate"] == chosen else ""
        cells = [f"{r['learning_rate']:g}", f"{f.get(shown, math.nan):.4f}", f"{f.get('loss', math.nan):.4f}", clipped]
        lines.append("| " + " | ".join([*cells, str(r.get("train_steps", "–")), mark]) + " |")
    (out / "tune.md").write_text("\n".join(lines) + "\n")
    from svdadapt.report import rate_figure, save_rate_plot

    xs = sorted(r["learning_rate"] for r in runs)
    ys = [next(r["final"].get(shown, math.nan) for r in runs if r["learning_rate"] == x) for x in xs]
    fig, ax = rate_figure()
    ax.plot(xs, ys, marker="o")
    ax.axvline(chosen, color="grey", linestyle="--", label=f"selected {chosen:g}")
    title = f"{runs[0].get('task')}, {recipe.adapter.method}: validation {shown} against learning rate"
    save_rate_plot(fig, ax, f"validation {shown}", title, out / "tune.png")
    return [out / "tuned.yaml", out / "tune.md", out / "tune.png"]


def tune(
    recipe_path: str,
    sets: list[str] = (),
    rates: list[float] | None = None,
    output: str | Path | None = None,
    fraction: float = 1.0,
    max_minutes: float | None = None,
    max_widenings: int = MAX_WIDENINGS,
) -> tuple[float | None, Path]:
    """Run the candidates and select; returns (chosen rate or None if stopped early, output folder).

    Raises `ValueError` for bad input (naming the field) and `RuntimeError` when a candidate fails.
    """
    from tqdm import tqdm

    from svdadapt.recipe import load_recipe
    from svdadapt.sweep import Run, launch, run_state, train_command

    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction {fraction}: must be in (0, 1], e.g. 1 (the whole budget) or 0.5")
    if max_widenings < 0:
        raise ValueError(f"--max-widenings {max_widenings}: must be >= 0")
    recipe = load_recipe(recipe_path, list(sets))
    check_held_out(recipe)
    grid = sorted(rates) if rates else default_rates(recipe.training.learning_rate)
    step = None if rates else HALF_DECADE
    out = Path(output or Path(recipe.output_dir) / "tune")
    fixed = [*sets, "training.eval_before=false", *budget_sets(recipe, fraction)]  # the untrained model is the same at every rate
    given = [f"--rates {','.join(f'{r:g}' for r in grid)}"] if rates else []
    command = " ".join(["svdadapt tune", recipe_path, *(f"--set {s}" for s in sets), *given, f"--fraction {fraction:g}"])

    def candidate(rate: float) -> Run:
        pairs = [s.split("=", 1) for s in fixed]
        return Run(_name(rate), "tune", (*((k.strip(), yaml.safe_load(v)) for k, v in pairs), ("training.learning_rate", rate)))

    start, widenings, counted = time.time(), 0, set()
    bar = tqdm(total=len(grid), desc="svdadapt tune", unit="run")
    try:
        while True:
            for rate in grid:  # a bad value, or a finished candidate of another recipe, fails before any run
                _check_candidate(load_recipe(recipe_path, [*fixed, f"training.learning_rate={rate}"]), out / _name(rate))
            for rate in grid:
                run_dir = out / _name(rate)
                state = run_state(run_dir)
                if state != "done":
                    if max_minutes is not None and time.time() - start > 60 * max_minutes:
                        return None, out
                    bar.set_postfix_str(f"lr {rate:g}")
                    log = out / f"{_name(rate)}.log"
                    if not launch(train_command(recipe_path, candidate(rate), run_dir, state), run_dir, log):
                        raise RuntimeError(f"candidate {rate:g} failed; its output is in {log}")
                if rate not in counted:
                    counted.add(rate)
                    bar.update(1)
            runs = [_load(out / _name(rate)) for rate in grid]
            chosen = select(runs)
            extra = widened(grid, chosen, step) if widenings < max_widenings else None
            if extra is None:
                break
            widenings += 1
            grid = sorted([*grid, extra])
            bar.total = len(grid)
            bar.refresh()
    finally:
        bar.close()
    write_outputs(recipe, runs, chosen, out, command)
    return chosen, out


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="svdadapt tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", help="a YAML recipe with a held-out validation split")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value, as in train")
    parser.add_argument("--rates", help="comma-separated learning rates (default: 7 at half-decade steps around the recipe's)")
    parser.add_argument("--output", help="folder for the candidates and results (default: the recipe's output_dir/tune)")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the recipe's steps each candidate runs (default 1)")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new candidate after this many minutes")
    parser.add_argument(
        "--max-widenings", type=int, default=MAX_WIDENINGS, help=f"edge widenings at most (default {MAX_WIDENINGS})"
    )
    args = parser.parse_args(argv)
    try:
        rates = parse_rates(args.rates) if args.rates is not None else None
        chosen, out = tune(args.recipe, args.set, rates, args.output, args.fraction, args.max_minutes, args.max_widenings)
    except ValueError as e:
        print(f"svdadapt tune: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"svdadapt tune: {e}", file=sys.stderr)
        return 1
    if chosen is None:
        print(f"svdadapt tune: {args.max_minutes:g} minutes used; run the same command again to continue")
        return 0
    print((out / "tune.md").read_text())
    print(f"svdadapt tune: selected learning rate {chosen:g}; wrote {out / 'tuned.yaml'}, {out / 'tune.md'}, {out / 'tune.png'}")
    return 0
