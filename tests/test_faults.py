"""The faults of a long run: divergence, a full disk, a kill mid-save, a resume with nothing to resume, a shared SVD cache."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import _with, llama_dir, llama_recipe  # noqa: F401  (llama_dir is a fixture)

from svdadapt.recipe import dump_recipe
from svdadapt.train import cli, complete_checkpoints, run


def _every_saved_tensor(out: Path) -> dict:
    return {f"{f.parent.name}/{k}": v for f in out.rglob("*.safetensors") for k, v in load_file(f).items()}


def test_a_diverging_run_stops_by_name_exits_2_and_saves_no_adapter(llama_dir, tmp_path, capsys):  # noqa: F811
    recipe = llama_recipe(llama_dir, tmp_path / "run", "edora", learning_rate=1e9, max_steps=6, save_steps=2)
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(recipe))
    assert cli([str(path)]) == 2
    err = capsys.readouterr().err
    assert "svdadapt train: training diverged at step" in err and "No adapter was saved" in err
    assert "Lower training.learning_rate (now 1e+09)" in err
    out = tmp_path / "run"
    assert not (out / "adapter").exists() and not (out / "adapter_full").exists()
    assert all(torch.isfinite(v).all() for v in _every_saved_tensor(out).values())


def test_the_message_names_the_last_good_checkpoint(llama_dir, tmp_path):  # noqa: F811
    from transformers import TrainerCallback

    from svdadapt.faults import TrainingDiverged

    class PoisonAfterStep3(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if n.endswith("lora_R")).fill_(float("inf"))

    recipe = llama_recipe(llama_dir, tmp_path / "run", "edora", max_steps=8, save_steps=2, save_total_limit=None)
    with pytest.raises(
        TrainingDiverged, match=r"diverged at step 4: the gradient of '.*' is not finite.*checkpoint is .*checkpoint-2\."
    ):
        run(recipe, callbacks=[PoisonAfterStep3()])
    out = tmp_path / "run"
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert all(torch.isfinite(v).all() for v in _every_saved_tensor(out).values())


def test_save_adapter_refuses_non_finite_tensors(tmp_path):
    from tiny import build

    import svdadapt

    base, kw = build("custom")
    model = svdadapt.apply(base, svdadapt.AdapterConfig(method="edora", r=4, svd_cache_dir="", **kw))
    with torch.no_grad():
        model.get_submodule("up").lora_R.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"refusing to save an adapter with non-finite values .* in \['up.R'\]"):
        svdadapt.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []
