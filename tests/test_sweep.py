"""`svdadapt sweep`: a grid of variants runs once, labels its results, skips finished runs, reports."""

import json

import pytest
import yaml
from test_train import roberta_dir, roberta_recipe  # noqa: F401  (a fixture and its recipe)

from svdadapt.recipe import dump_recipe
from svdadapt.sweep import cli, read_sweep


def test_sweep_runs_each_variant_once_and_reports(roberta_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.yaml"
    base.write_text(
        dump_recipe(roberta_recipe(roberta_dir, tmp_path / "unused", max_steps=3, eval_strategy="steps", eval_steps=3))
    )
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "recipe": str(base),
                "output_root": "runs",
                "results": "results",
                "variants": {
                    "edora": {"adapter.method": "edora"},
                    "lora_fast": {"adapter.method": "lora", "training.learning_rate": 1e-2},
                },
                "grid": {"training.seed,adapter.seed": [0]},
            }
        )
    )
    assert cli([str(sweep)]) == 0
    assert not (tmp_path / "results").exists()  # a sweep writes under output_root only; publishing is explicit
    work = tmp_path / "runs" / "report"
    assert sorted(p.parent.name for p in (work / "runs").glob("*/metrics.json")) == ["edora-0", "lora_fast-0"]
    assert "| edora |" in (work / "report.md").read_text()
    assert cli([str(sweep), "--publish", "--only", "edora"]) == 0
    assert [p.parent.name for p in (tmp_path / "results" / "runs").glob("*/metrics.json")] == ["edora-0"]
    assert cli([str(sweep), "--publish"]) == 0
    runs = sorted(p.parent.name for p in (tmp_path / "results" / "runs").glob("*/metrics.json"))
    assert runs == ["edora-0", "lora_fast-0"]
    edora = json.loads((tmp_path / "results" / "runs" / "edora-0" / "metrics.json").read_text())
    assert edora["label"] == "edora" and edora["train_steps"] == 3
    assert (
        edora["magnitude_change"]["median"] > 0 and edora["magnitude_change"]["layers"] == 8
    )  # 2 layers x (query, value, two "output.dense")
    lora = json.loads((tmp_path / "results" / "runs" / "lora_fast-0" / "metrics.json").read_text())
    assert lora["method"] == "lora" and lora["magnitude_change"] is None
    report = (tmp_path / "results" / "report.md").read_text()
    assert "| edora |" in report and "| lora_fast |" in report and "‖Δm‖/‖m₀‖" in report
    capsys.readouterr()
    assert cli([str(sweep)]) == 0  # finished runs are skipped, not trained again
    out = capsys.readouterr().out
    assert "edora-0: done" in out and "lora_fast-0: done" in out and " -> " not in out  # no training command


def test_sweep_file_errors_name_the_key(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"recipe": "r.yaml", "output_root": "o", "results": "r", "variants": {"a": {}}, "grids": {}}))
    with pytest.raises(ValueError, match=r"unknown keys \['grids'\]"):
        read_sweep(f)
    f.write_text(
        yaml.safe_dump({"recipe": "r.yaml", "output_root": "o", "results": "r", "variants": {"a": {}}, "grid": {"x": []}})
    )
    with pytest.raises(ValueError, match="non-empty list"):
        read_sweep(f)
    with pytest.raises(ValueError, match="does not exist"):
        read_sweep(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text, picked",
    [("dora-rte", ["dora-rte-0", "edora-rte-0"]), ("dora-rte-[0]", ["dora-rte-0"]), ("*a-rte-0", ["dora-rte-0", "edora-rte-0"])],
)
def test_only_is_a_substring_or_a_full_name_glob(text, picked):
    from svdadapt.sweep import _selects

    names = ["dora-rte-0", "edora-rte-0", "dora_mlr10-rte-0", "dora-mrpc-0"]
    assert [n for n in names if _selects(text, n)] == picked


def test_a_variant_grid_multiplies_the_sweep_grid(tmp_path):
    recipe = tmp_path / "base.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": "m", "task": "sequence_classification"},
                "adapter": {"method": "edora"},
                "data": {"kind": "glue"},
            }
        )
    )
    f = tmp_path / "s.yaml"
    spec = {
        "recipe": str(recipe),
        "output_root": "o",
        "results": "r",
        "variants": {"lora": {"adapter.method": "lora", "grid": {"training.learning_rate": [2.0e-4, 1.0e-3]}}, "edora": {}},
        "grid": {"data.glue_task": ["rte", "mrpc"]},
    }
    f.write_text(yaml.safe_dump(spec, sort_keys=False))
    _, runs = read_sweep(f)
    assert [r.name for r in runs] == [
        "lora-rte-0.0002",
        "lora-rte-0.001",
        "lora-mrpc-0.0002",
        "lora-mrpc-0.001",
        "edora-rte",
        "edora-mrpc",
    ]
    assert dict(runs[1].overrides) == {"adapter.method": "lora", "training.learning_rate": 1.0e-3, "data.glue_task": "rte"}
    assert {r.variant for r in runs} == {"lora", "edora"}
    spec["variants"]["lora"]["grid"] = {"data.glue_task": ["sst2"]}
    f.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ValueError, match=r"variant 'lora' grids \['data.glue_task'\]"):
        read_sweep(f)
    spec["variants"]["lora"]["grid"] = {"training.learning_rate": []}
    f.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ValueError, match="variant 'lora': 'grid' must map keys to non-empty lists"):
        read_sweep(f)


def test_a_misspelt_variant_key_is_refused_naming_the_variant(tmp_path, capsys):
    recipe = tmp_path / "base.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "adapter": {"method": "edora"}}))
    sweep = tmp_path / "s.yaml"
    spec = {"recipe": str(recipe), "output_root": str(tmp_path / "runs"), "results": str(tmp_path / "results")}
    sweep.write_text(yaml.safe_dump({**spec, "variants": {"ok": {"adapter.r": 4}, "typo": {"training.learning_rat": 1e-3}}}))
    with pytest.raises(
        ValueError, match=r"(?s)variant 'typo' \(run 'typo'\).*unknown key 'training.learning_rat'. Did you mean 'learning_rate'"
    ):
        read_sweep(sweep)
    assert cli([str(sweep), "--dry-run"]) == 2
    assert "variant 'typo'" in capsys.readouterr().err and not (tmp_path / "runs").exists()
