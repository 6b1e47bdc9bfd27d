"""`svdadapt tune`: candidates run in their own processes, the fixed rule selects on validation, a killed tune
resumes without rerunning finished candidates, a best rate at an edge widens the grid, bad input names the field."""

import json

import pytest
import yaml
from test_train import roberta_dir, roberta_recipe  # noqa: F401  (a fixture and its recipe)

from svdadapt import tune as tune_module
from svdadapt.recipe import dump_recipe, load_recipe
from svdadapt.tune import cli, default_rates, parse_rates, tune, widened


def _recipe(roberta_dir, tmp_path, fraction=0.25):  # noqa: F811
    r = roberta_recipe(roberta_dir, tmp_path / "unused", "lora", max_steps=2, eval_strategy="steps", eval_steps=2)
    raw = r.to_dict()
    raw["data"] |= {"validation_fraction": fraction, "max_train_samples": 48}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_tune_runs_writes_three_files_and_resumes_only_the_missing_candidate(roberta_dir, tmp_path, capsys):  # noqa: F811
    base, out = _recipe(roberta_dir, tmp_path), tmp_path / "tune"
    args = [str(base), "--rates", "1e-3,1e-2", "--output", str(out), "--max-widenings", "0"]
    assert cli(args) == 0
    assert {p.name for p in out.iterdir()} >= {"tuned.yaml", "tune.md", "tune.png", "lr-0.001", "lr-0.01"}
    runs = {d: json.loads((out / d / "metrics.json").read_text()) for d in ("lr-0.001", "lr-0.01")}
    assert all(r["eval_set"] == "validation" and "test" in r for r in runs.values())  # selection never saw dev
    rule = max(runs.values(), key=lambda r: (r["final"]["accuracy"], -r["final"]["loss"]))["learning_rate"]
    tuned = load_recipe(out / "tuned.yaml")
    assert tuned.training.learning_rate == rule and tuned.training.max_steps == 2 and tuned.training.eval_before
    assert f"Selected: **{rule:g}**" in (out / "tune.md").read_text()
    (out / "lr-0.01" / "metrics.json").unlink()  # a tune killed while this candidate ran
    kept = [(out / p).stat().st_mtime_ns for p in ("lr-0.001/metrics.json", "lr-0.001.log")]
    (out / "lr-0.01.log").unlink()
    assert cli(args) == 0
    assert [(out / p).stat().st_mtime_ns for p in ("lr-0.001/metrics.json", "lr-0.001.log")] == kept  # not run again
    assert (out / "lr-0.01" / "metrics.json").is_file() and (out / "lr-0.01.log").is_file()  # the killed one ran
    capsys.readouterr()
    assert cli([*args, "--set", "training.max_steps=3"]) == 2  # another recipe never reuses these candidates
    assert "training.max_steps: 2 -> 3" in capsys.readouterr().err


def _fake_training(curve: dict[float, float], ran: list[float]):
    """A `launch` that writes metrics.json with validation accuracy `curve[rate]` instead of training."""

    def launch(cmd, run_dir, log=None):
        rate = _rate(cmd)
        ran.append(rate)
        run_dir.mkdir(parents=True, exist_ok=True)
        final = {"accuracy": curve.get(rate, 0.0), "loss": 1.0}
        metrics = {"task": "sst2", "learning_rate": rate, "seed": 0, "final": final, "train_steps": 2}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        return True

    return launch


def _rate(cmd: list[str]) -> float:
    return next(float(c.split("=")[1]) for c in cmd if c.startswith("training.learning_rate="))


def test_best_at_an_edge_widens_the_grid_a_bounded_number_of_times(roberta_dir, tmp_path, monkeypatch):  # noqa: F811
    base, ran = _recipe(roberta_dir, tmp_path), []
    rising = {1e-3: 0.5, 1e-2: 0.6, 0.1: 0.7, 1.0: 0.8, 10.0: 0.9}
    monkeypatch.setattr("svdadapt.sweep.launch", _fake_training(rising, ran))
    chosen, out = tune(str(base), rates=[1e-3, 1e-2], output=tmp_path / "t", max_widenings=2)
    assert ran == [1e-3, 1e-2, 0.1, 1.0] and chosen == 1.0  # two widenings, then stop at the bound
    peaked = {1e-3: 0.5, 1e-2: 0.6, 0.1: 0.7, 1.0: 0.1}
    ran.clear()
    monkeypatch.setattr("svdadapt.sweep.launch", _fake_training(peaked, ran))
    chosen, _ = tune(str(base), rates=[1e-3, 1e-2], output=tmp_path / "u", max_widenings=5)
    assert ran == [1e-3, 1e-2, 0.1, 1.0] and chosen == 0.1  # the peak is inside: no more widening
    assert "| 0.1 | 0.7000 |" in (tmp_path / "u" / "tune.md").read_text()


def test_default_grid_spans_thirty_times_each_way_and_widening_steps_out():
    grid = default_rates(1e-3)
    assert len(grid) == 7 and grid[0] <= 1e-3 / 30 and grid[-1] >= 1e-3 * 30 and grid[3] == 1e-3
    assert widened([1e-3, 1e-2, 1e-1], 1e-1) == 1.0 and widened([1e-3, 1e-2, 1e-1], 1e-3) == 1e-4
    assert widened([1e-3, 1e-2, 1e-1], 1e-2) is None
    assert widened(grid, grid[-1], 10**0.5) == pytest.approx(grid[-1] * 10**0.5, rel=0.05)


def test_bad_input_names_the_field(roberta_dir, tmp_path, capsys):  # noqa: F811
    with pytest.raises(ValueError, match="--rates"):
        parse_rates("1e-3,abc")
    with pytest.raises(ValueError, match="at least 2 positive"):
        parse_rates("-1e-3,1e-3")
    base = _recipe(roberta_dir, tmp_path, fraction=0.0)
    with pytest.raises(ValueError, match=r"data.validation_fraction is 0.*--set data.validation_fraction=0.2"):
        tune(str(base), rates=[1e-3, 1e-2], output=tmp_path / "t")
    assert not (tmp_path / "t").exists()
    assert cli([str(base), "--fraction", "1.5"]) == 2
    assert "--fraction 1.5" in capsys.readouterr().err
    assert cli([str(base), "--set", "training.learning_rat=1e-3"]) == 2
    assert "learning_rate" in capsys.readouterr().err  # the recipe's own error, with the closest key


def test_fraction_shortens_each_candidate_only(roberta_dir, tmp_path, monkeypatch):  # noqa: F811
    base, ran, seen = _recipe(roberta_dir, tmp_path), [], []
    fake = _fake_training({1e-3: 0.5, 1e-2: 0.4}, ran)
    monkeypatch.setattr("svdadapt.sweep.launch", lambda cmd, d, log=None: seen.append(cmd) or fake(cmd, d, log))
    raw = yaml.safe_load(base.read_text())
    raw["training"]["max_steps"] = 9
    base.write_text(dump_recipe(load_recipe_dict(raw)))
    chosen, out = tune(str(base), rates=[1e-3, 1e-2], output=tmp_path / "t", fraction=1 / 3, max_widenings=0)
    assert all("training.max_steps=3" in c for c in seen) and chosen == 1e-3
    assert load_recipe(out / "tuned.yaml").training.max_steps == 9  # the chosen recipe keeps the whole budget
    assert tune_module.budget_sets(load_recipe(base), 1.0) == []


def load_recipe_dict(raw):
    from svdadapt.recipe import recipe_from_dict

    return recipe_from_dict(raw)
