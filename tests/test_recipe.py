"""Recipes: every file in recipes/ validates; typos, bad values and overrides are reported clearly."""

from pathlib import Path

import pytest
import yaml

from svdadapt import AdapterConfig
from svdadapt.recipe import dump_recipe, load_recipe, read_yaml, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_every_recipe_validates(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name files (DeepSpeed configs) relative to the repo root
    assert len(RECIPES) >= 13
    errors = []
    for path in RECIPES:
        variants = [[]] + [[f"data.glue_task={t}"] for t in (read_yaml(path).get("per_task") or {})]
        for overrides in variants:
            try:
                recipe = load_recipe(path.relative_to(ROOT), overrides)
            except ValueError as e:
                errors.append(f"{path.name} {overrides}: {e}")
                continue
            if (
                not path.read_text().startswith("#")
                or "svdadapt train" not in path.read_text().split("\n\n")[0] + path.read_text()[:600]
            ):
                errors.append(f"{path.name}: must open with a comment giving the command that runs it")
            if recipe.data.kind == "glue" and overrides and recipe.training.classifier_learning_rate is None:
                errors.append(f"{path.name} {overrides}: a GLUE task without classifier_learning_rate")
    assert not errors, "\n".join(errors)


def test_method_variants_change_only_the_method(monkeypatch):
    monkeypatch.chdir(ROOT)
    base = load_recipe("recipes/mistral_dude.yaml").to_dict()
    for method in ("pissa", "dora", "lora"):
        other = load_recipe(f"recipes/mistral_{method}.yaml").to_dict()
        assert other["adapter"] == {**base["adapter"], "method": method}
        assert other["training"] == base["training"] and other["data"] == base["data"] and other["model"] == base["model"]


def test_glue_per_task_table_and_set_wins(monkeypatch):
    monkeypatch.chdir(ROOT)
    r = load_recipe("recipes/roberta_glue_edora.yaml", ["data.glue_task=mrpc"])
    assert (r.training.learning_rate, r.training.classifier_learning_rate, r.training.num_train_epochs) == (5e-3, 6e-4, 50)
    r = load_recipe("recipes/roberta_glue_edora.yaml", ["data.glue_task=sst2", "training.learning_rate=1e-4"])
    assert (r.training.learning_rate, r.training.classifier_learning_rate, r.training.num_train_epochs) == (1e-4, 5e-4, 20)
    assert isinstance(r.adapter, AdapterConfig) and r.adapter.sigma == 1e-5 and r.adapter.alpha == 16


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


MINIMAL = "model: {name_or_path: some/model}\nadapter: {method: edora}\n"


def test_typo_names_the_closest_key(tmp_path):
    path = _write(tmp_path, MINIMAL + "training: {learnig_rate: 1.0e-4}\n")
    with pytest.raises(ValueError, match=r"unknown key 'training.learnig_rate'. Did you mean 'learning_rate'\?"):
        load_recipe(path)
    path = _write(tmp_path, MINIMAL.replace("method: edora", "method: edora, sigam: 0.1"))
    with pytest.raises(ValueError, match=r"Did you mean 'sigma'\?.*Valid keys: \['alpha'"):
        load_recipe(path)


def test_all_problems_reported_at_once(tmp_path):
    text = "modle: {}\nmodel: {name_or_path: m, dtype: float8}\nadapter: {method: edora, r: -2}\ntraining: {warmup_ratio: 2, bf16: yes, fp16: true}\n"
    with pytest.raises(ValueError) as e:
        load_recipe(_write(tmp_path, text))
    msg = str(e.value)
    for part in (
        "'modle'. Did you mean 'model'",
        "model.dtype='float8'",
        "AdapterConfig.r=-2",
        "warmup_ratio=2",
        "both bf16 and fp16",
    ):
        assert part in msg, msg
    assert "5 problem(s)" in msg


def test_set_overrides_are_yaml_parsed(tmp_path):
    path = _write(tmp_path, MINIMAL)
    r = load_recipe(path, ["training.learning_rate=1e-4", "adapter.target_modules=[q_proj, v_proj]", "training.deepspeed=null"])
    assert r.training.learning_rate == 1e-4 and isinstance(r.training.learning_rate, float)
    assert list(r.adapter.target_modules) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="Did you mean 'training'"):
        load_recipe(path, ["trainig.learning_rate=1"])
    with pytest.raises(ValueError, match="expected key=value"):
        load_recipe(path, ["training.learning_rate"])
    with pytest.raises(ValueError, match="training.learning_rate='fast' must be a number"):
        load_recipe(path, ["training.learning_rate=fast"])


def test_unknown_glue_task_and_mismatched_task(tmp_path):
    text = MINIMAL.replace("some/model}", "m, task: sequence_classification}") + "data: {kind: glue, glue_task: rtee}\n"
    with pytest.raises(ValueError, match=r"unknown GLUE task 'rtee'.*Did you mean 'rte'"):
        load_recipe(_write(tmp_path, text))
    with pytest.raises(ValueError, match="needs data.kind 'glue'"):
        load_recipe(_write(tmp_path, MINIMAL.replace("some/model}", "m, task: sequence_classification}")))


def test_dump_round_trips(monkeypatch):
    monkeypatch.chdir(ROOT)
    r = load_recipe("recipes/roberta_glue_dude.yaml", ["data.glue_task=cola"])
    assert recipe_from_dict(yaml.safe_load(dump_recipe(r))) == r


def test_extends_merges_sections(tmp_path):
    (tmp_path / "base.yaml").write_text(MINIMAL + "training: {learning_rate: 0.1, seed: 3}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nadapter: {method: lora}\ntraining: {seed: 4}\n")
    r = load_recipe(child)
    assert (r.adapter.method, r.training.learning_rate, r.training.seed, r.model.name_or_path) == ("lora", 0.1, 4, "some/model")


def test_yaml_booleans_in_string_fields(tmp_path):
    """`--set training.eval_strategy=no`: YAML reads `no` as False, which a string field takes as "no";
    `yes` has no such reading and the error says how to quote it."""
    path = _write(tmp_path, MINIMAL)
    r = load_recipe(path, ["training.eval_strategy=no", "training.save_strategy=no"])
    assert (r.training.eval_strategy, r.training.save_strategy) == ("no", "no")
    with pytest.raises(ValueError, match=r"training.optim=True must be a string \(YAML reads unquoted yes/on/true .* quote"):
        load_recipe(path, ["training.optim=yes"])
    assert load_recipe(path, ["training.optim='yes'"]).training.optim == "yes"
