"""`svdadapt sweep`: run a grid of recipe variants, resumably, in time-boxed chunks.

    svdadapt sweep recipes/evidence/glue_minilm.sweep.yaml --max-minutes 55   # repeat until it says "all done"
    svdadapt sweep recipes/evidence/glue_minilm.sweep.yaml --dry-run          # list runs and their state
    svdadapt sweep recipes/evidence/glue_minilm.sweep.yaml --publish          # copy finished runs into `results`

A sweep file names a base recipe, named variants (each a set of `--set` overrides) and a grid
(key -> list of values); every variant runs at every grid point, each run in its own process and
output directory. A finished run (its `metrics.json` exists) is skipped, an interrupted one resumes
from its last complete checkpoint. After each run its `metrics.json` is copied (labelled with the
variant's name) under `output_root/report/runs/`, and `svdadapt report` rewrites the table and plots
in `output_root/report/`: everything a sweep writes stays under `output_root`. Publishing is a
separate step: `--publish` runs nothing, copies the finished runs' labelled `metrics.json` into
`results/runs/` (e.g. a committed folder) and rewrites the report there.

    recipe: recipes/evidence/glue_minilm.yaml
    output_root: runs/evidence/glue_minilm          # run directories (checkpoints, adapters) and the working report
    results: docs/results/glue_minilm               # where --publish writes: metrics, report, plots
    variants:
      lora: {adapter.method: lora, training.learning_rate: 5.0e-4}
      edora: {adapter.method: edora, training.learning_rate: 5.0e-3}
    grid:
      data.glue_task: [rte, mrpc]
      training.seed,adapter.seed: [0, 1, 2]         # comma-joined keys take the same value

A variant may carry its own `grid` (e.g. `grid: {training.learning_rate: [2.0e-4, 1.0e-3]}`), run
at every point of the sweep's grid; its values end the run's name (`lora-rte-0-0.0002`).
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

_KEYS = {"recipe", "output_root", "results", "variants", "grid"}


@dataclass(frozen=True)
class Run:
    name: str
    variant: str
    overrides: tuple[tuple[str, object], ...]


def read_sweep(path: str | Path) -> tuple[dict, list[Run]]:
    """The sweep file and the runs it describes, checked; raises `ValueError` naming the key."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"sweep file {str(p)!r} does not exist")
    spec = yaml.safe_load(p.read_text()) or {}
    if unknown := sorted(set(spec) - _KEYS):
        raise ValueError(f"{p}: unknown keys {unknown}; a sweep file has {sorted(_KEYS)}")
    for key in ("recipe", "output_root", "results", "variants"):
        if not spec.get(key):
            raise ValueError(f"{p}: {key!r} is required")
    if not isinstance(spec["variants"], dict) or not all(isinstance(v, dict) for v in spec["variants"].values()):
        raise ValueError(f"{p}: 'variants' must map a name to a dict of key: value overrides")
    grid = spec.get("grid") or {}
    if not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"{p}: every 'grid' entry must be a non-empty list of values")
    runs = []
    for variant, sets in spec["variants"].items():
        sets = dict(sets)
        own = sets.pop("grid", None) or {}  # the variant's own grid, e.g. its learning rates
        if not isinstance(own, dict) or not all(isinstance(v, list) and v for v in own.values()):
            raise ValueError(f"{p}: variant {variant!r}: 'grid' must map keys to non-empty lists of values")
        both = {**grid, **own}
        if clash := sorted(set(grid) & set(own)):
            raise ValueError(f"{p}: variant {variant!r} grids {clash}, which the sweep's grid already covers")
        for point in itertools.product(*both.values()):
            assigned = {k.strip(): v for keys, v in zip(both, point) for k in keys.split(",")}
            tag = "-".join(str(v) for v in point)
            runs.append(Run(f"{variant}-{tag}" if tag else variant, variant, tuple({**sets, **assigned}.items())))
    _check_overrides(p, spec["recipe"], runs)
    return spec, runs


def _sets(run: Run) -> list[str]:
    """The run's overrides as `svdadapt train --set` values."""
    return [f"{k}={json.dumps(v)}" for k, v in run.overrides]


def _check_overrides(path: Path, recipe: str, runs: list[Run]) -> None:
    """Every run's recipe must load: a misspelt key or a bad value fails here, naming the variant."""
    from svdadapt.recipe import load_recipe

    for run in runs:
        try:
            load_recipe(recipe, _sets(run))
        except ValueError as e:
            raise ValueError(f"{path}: variant {run.variant!r} (run {run.name!r}): {e}") from None


def run_state(run_dir: Path) -> str:
    if (run_dir / "metrics.json").is_file():
        return "done"
    from svdadapt.trainer import complete_checkpoints

    return "resume" if run_dir.is_dir() and complete_checkpoints(run_dir) else "new"


def _working(spec: dict) -> Path:
    """Where a sweep keeps its labelled metrics and report: under output_root, never in `results`."""
    return Path(spec["output_root"]) / "report"


def _collect(run: Run, run_dir: Path, folder: Path) -> None:
    """Copy the run's metrics.json, labelled with its variant, to `folder/runs/<run name>/` (atomically)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["label"] = run.variant
    dest = folder / "runs" / run.name
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, dest / "metrics.json")


def _report(folder: Path) -> None:
    from svdadapt.report import write_report

    runs = sorted(str(d) for d in (folder / "runs").glob("*") if (d / "metrics.json").is_file())
    if runs:
        print(f"svdadapt sweep: report of {len(runs)} runs in {write_report(runs, folder)}")


def publish(spec: dict, runs: list[Run]) -> int:
    """Copy the finished runs among `runs` into `results` and rewrite the report there; returns how many."""
    root, folder = Path(spec["output_root"]), Path(spec["results"])
    done = [run for run in runs if run_state(root / run.name) == "done"]
    for run in done:
        _collect(run, root / run.name, folder)
    _report(folder)
    return len(done)


def train_command(recipe: str, run: Run, run_dir: Path, state: str) -> list[str]:
    """The `svdadapt train` command line of one run, in its own process: resumes a run with checkpoints."""
    sets = [x for kv in _sets(run) for x in ("--set", kv)]
    mode = ["--resume"] if state == "resume" else ["--overwrite"]
    return [sys.executable, "-m", "svdadapt", "train", recipe, *sets, "--output-dir", str(run_dir), *mode]


def launch(cmd: list[str], run_dir: Path, log: Path | None = None) -> bool:
    """Run `cmd` (from `train_command`) to the end; True if it wrote `run_dir/metrics.json`.

    With `log`, the run's output goes to that file instead of the terminal.
    """
    if log is None:
        code = subprocess.run(cmd).returncode
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    return code == 0 and (run_dir / "metrics.json").is_file()


def _selects(text: str, name: str) -> bool:
    """`--only TEXT`: a substring, or a full-name glob when TEXT has glob characters."""
    return fnmatch.fnmatchcase(name, text) if any(c in text for c in "*?[") else text in name


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="svdadapt sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", help="the sweep YAML file")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new run after this many minutes")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run only runs whose name contains this text, or matches it in full if it "
        "has glob characters, e.g. 'dora-rte-[12]' (not edora-rte-1) (repeatable)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="run nothing; copy the finished runs' metrics.json into the sweep's `results` folder and rewrite its report",
    )
    args = parser.parse_args(argv)
    try:
        spec, runs = read_sweep(args.sweep)
    except ValueError as e:
        print(f"svdadapt sweep: {e}", file=sys.stderr)
        return 2
    runs = [r for r in runs if not args.only or any(_selects(t, r.name) for t in args.only)]
    if args.publish:
        print(f"svdadapt sweep: published {publish(spec, runs)} of {len(runs)} runs to {spec['results']}")
        return 0
    root, start, failed, work = Path(spec["output_root"]), time.time(), [], _working(spec)
    for i, run in enumerate(runs, 1):
        run_dir = root / run.name
        state = run_state(run_dir)
        if args.dry_run or state == "done":
            print(f"[{i}/{len(runs)}] {run.name}: {state}")
            if state == "done" and not args.dry_run:
                _collect(run, run_dir, work)
            continue
        if args.max_minutes is not None and time.time() - start > 60 * args.max_minutes:
            print(f"svdadapt sweep: {args.max_minutes:g} minutes used; run the same command again to continue")
            _report(work)
            return 0
        cmd = train_command(spec["recipe"], run, run_dir, state)
        print(f"[{i}/{len(runs)}] {run.name}: {state} -> {' '.join(cmd[2:])}", flush=True)
        if not launch(cmd, run_dir):
            failed.append(run.name)
            continue
        _collect(run, run_dir, work)
    if not args.dry_run:
        _report(work)
    if failed:
        print(f"svdadapt sweep: {len(failed)} runs failed: {failed}", file=sys.stderr)
        return 1
    print("svdadapt sweep: all done" if not args.dry_run else "")
    return 0
