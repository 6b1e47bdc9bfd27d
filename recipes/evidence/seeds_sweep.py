"""Write the seeds sweep file of one GLUE task from its learning-rate search (round two, step 2 and 3).

    python recipes/evidence/seeds_sweep.py sst2      # -> recipes/evidence/glue_minilm_seeds_sst2.sweep.yaml

Reads the search runs (`*-TASK-0-*` under the search's report folders), selects each arm's rate with
`svdadapt.report.Selection` (the same rule and code as the report: best validation metric at seed 0,
ties to the lower validation loss) and writes a sweep file that runs seeds 1 and 2 of every arm at
its selected rate, and the magnitude ablation (dora and dude with the magnitude's rate x 10, at their
selected rates) at seeds 0, 1 and 2. An arm with fewer than 3 rates run, or whose rate sits at the
edge of the rates run, is left out, with a comment saying so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from svdadapt.report import Selection, load_run

SEARCH = yaml.safe_load(Path("recipes/evidence/glue_minilm_lr.sweep.yaml").read_text())
FOLDERS = [Path(SEARCH["output_root"]) / "report" / "runs", Path(SEARCH["results"]) / "runs"]
ABLATION = {"dora_mlr10": "dora", "dude_mlr10": "dude"}  # magnitude learning rate x 10


def main(task: str) -> Path:
    found = {}
    for folder in FOLDERS:
        for d in sorted(folder.glob(f"*-{task}-0-*")):
            if (d / "metrics.json").is_file():
                found.setdefault(d.name, d)
    runs = [load_run(d) for d in found.values()]
    sel = Selection(task, runs)
    lines = [
        f"# Evidence, round two, steps 2 and 3 ({task}): seeds 1 and 2 at each arm's selected rate, and the magnitude",
        "# ablation (magnitude learning rate x 10 at dora's and dude's selected rates) at seeds 0, 1 and 2.",
        f"# Written by `python recipes/evidence/seeds_sweep.py {task}` from the seed-0 search",
        "# (glue_minilm_lr.sweep.yaml) with svdadapt.report.Selection: the report's own rule and code.",
        f"#   svdadapt sweep recipes/evidence/glue_minilm_seeds_{task}.sweep.yaml --max-minutes 9   # repeat until \"all done\"",
        f"#   svdadapt sweep recipes/evidence/glue_minilm_seeds_{task}.sweep.yaml --publish",
        "# Same output_root and results as the search, so the report sees the search and the seeds together.",
        "recipe: recipes/evidence/glue_minilm_tuned.yaml",
        f"output_root: {SEARCH['output_root']}",
        f"results: {SEARCH['results']}      # written only by --publish",
        "variants:",
    ]
    grids = {name: v["grid"]["training.learning_rate"] for name, v in SEARCH["variants"].items()}
    chosen = {}
    for name, spec in SEARCH["variants"].items():
        sets = {k: v for k, v in spec.items() if k != "grid"}
        if name not in sel.chosen:
            lines.append(f"  # {name}: no search run on {task} yet")
            continue
        rate, search = sel.chosen[name]
        grid = sorted(search)  # the rates run on this task: a point widened for another task may be missing
        if len(grid) < 3:
            lines.append(f"  # {name}: search incomplete on {task} ({len(grid)} of {len(grids[name])} rates)")
            continue
        if rate in (grid[0], grid[-1]):
            lines.append(f"  # {name}: selected {rate:g} is at the edge of the rates run; widen the grid first")
            continue
        chosen[name] = rate
        overrides = ", ".join(f"{k}: {v}" for k, v in {**sets, "training.learning_rate": rate}.items())
        lines.append(f"  {name}: {{{overrides}, grid: {{'training.seed,adapter.seed': [1, 2]}}}}   # selected of {grid[0]:g}..{grid[-1]:g}")
    for name, base in ABLATION.items():
        if base in chosen:
            rate = chosen[base]
            lines.append(
                f"  {name}: {{adapter.method: {base}, training.learning_rate: {rate}, training.magnitude_learning_rate: {10 * rate:.6g}, "
                "grid: {'training.seed,adapter.seed': [0, 1, 2]}}"
            )
    lines += ["grid:", f"  data.glue_task: [{task}]", ""]
    out = Path(f"recipes/evidence/glue_minilm_seeds_{task}.sweep.yaml")
    out.write_text("\n".join(lines))
    return out


if __name__ == "__main__":
    print(main(sys.argv[1]))
