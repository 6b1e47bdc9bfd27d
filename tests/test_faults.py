"""The faults of a long run: divergence, a full disk, a kill mid-save, a resume with nothing to resume, a shared SVD cache."""

import errno
import json
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
    recipe = llama_recipe(llama_dir, tmp_path / "run", "edora", learning_rate=1e9, max_steps=4, save_steps=4)
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(recipe))
    assert cli([str(path)]) == 2
    err = capsys.readouterr().err
    assert "svdadapt train: training diverged at step" in err and "No adapter was saved" in err
    assert "Lower training.learning_rate (now 1e+09)" in err
    out = tmp_path / "run"
    assert not (out / "adapter").exists() and not (out / "adapter_full").exists()
    assert all(torch.isfinite(v).all() for v in _every_saved_tensor(out).values())


def test_the_quickstart_at_a_huge_rate_stops_although_its_loss_stays_finite(tmp_path, capsys):
    """The magnitude/direction split saturates instead of overflowing: the trained tensors reach ~1e9 while
    the loss stays near 0.69, so the run is stopped by the size of its trained tensors."""
    out = tmp_path / "run"
    sets = ["training.learning_rate=1e9", "training.max_steps=8", "training.eval_before=false", f"output_dir={out}"]
    recipe = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    assert cli([str(recipe), *(a for kv in sets for a in ("--set", kv))]) == 2
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "beyond 1e+06" in err and "No adapter was saved" in err, err[-2000:]
    assert not (out / "adapter").exists() and not (out / "adapter_full").exists()


def test_the_message_names_the_last_good_checkpoint(llama_dir, tmp_path):  # noqa: F811
    from transformers import TrainerCallback

    from svdadapt.faults import TrainingDiverged

    class PoisonAfterCheckpoint1(TrainerCallback):  # the checks ran before this save; a fault after it
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if n.endswith("lora_R")).fill_(float("inf"))

    recipe = llama_recipe(llama_dir, tmp_path / "run", "edora", max_steps=3, save_steps=1, save_total_limit=None)
    with pytest.raises(
        TrainingDiverged, match=r"diverged at step 2: the gradient of '.*' is not finite.*checkpoint is .*checkpoint-1\."
    ):
        run(recipe, callbacks=[PoisonAfterCheckpoint1()])
    out = tmp_path / "run"
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
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


# --- a full disk -----------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_save_adapter_says_so_and_keeps_the_previous_adapter(tmp_path, monkeypatch):
    from tiny import build

    import svdadapt
    import svdadapt.io as io

    base, kw = build("custom")
    model = svdadapt.apply(base, svdadapt.AdapterConfig(method="edora", r=4, svd_cache_dir="", **kw))
    d = svdadapt.save_adapter(model, tmp_path / "adapter")
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    monkeypatch.setattr(io, "save_file", _enospc)
    with pytest.raises(ValueError, match=rf"disk full: saving to '{tmp_path / 'adapter'}' failed \(OSError: .*No space left"):
        svdadapt.save_adapter(model, d)
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_full_disk_at_the_final_save_keeps_the_checkpoint_and_resume_finishes(llama_dir, tmp_path, monkeypatch):  # noqa: F811
    import svdadapt.io as io

    recipe = llama_recipe(llama_dir, tmp_path / "run", "edora", max_steps=2, save_steps=2)
    real = io.save_file
    monkeypatch.setattr(io, "save_file", _enospc)
    with pytest.raises(ValueError, match=r"disk full: saving to '.*run/adapter' failed"):
        run(recipe)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "recipe.yaml"]  # no adapter, no temporary
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    monkeypatch.setattr(io, "save_file", real)
    result = run(recipe, resume=True)  # space freed: the resume saves from the intact checkpoint
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "metrics.json").is_file()
    assert result.metrics["train_steps"] >= 2


def test_a_full_disk_during_a_checkpoint_says_so_and_removes_it(llama_dir, tmp_path, monkeypatch):  # noqa: F811
    real = torch.save

    def short_write(obj, f, *a, **k):
        if str(f).endswith("checkpoint-2/optimizer.pt"):  # what torch's writer raises when the disk fills
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1536 vs 1472")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", short_write)
    recipe = llama_recipe(llama_dir, tmp_path / "run", "edora", max_steps=3, save_steps=1, save_total_limit=None)
    with pytest.raises(ValueError, match=r"disk full: saving to '.*run/checkpoint-2' failed \(RuntimeError: .*unexpected pos"):
        run(recipe)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "recipe.yaml"]
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    listed = json.loads((out / "checkpoint-1" / "svdadapt_checkpoint.json").read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "svdadapt_clipping.json"} <= set(listed)


def test_resume_with_no_complete_checkpoint_says_what_it_found(llama_dir, tmp_path):  # noqa: F811
    recipe = llama_recipe(llama_dir, tmp_path / "run", "edora")
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    with pytest.raises(ValueError, match=r"--resume: .* holds no complete checkpoint.*no checkpoint-\* directory.*--overwrite"):
        run(recipe, resume=True)
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"")
    with pytest.raises(
        ValueError,
        match=r"it holds checkpoint-4 \(no svdadapt_checkpoint.json \(its save did not finish\)\); and \['recipe.yaml'\]",
    ):
        run(recipe, resume=True)


# --- checkpoint completeness, saves cut short, --overwrite ---------------------------------------------


def _checkpoint(out: Path, step: int) -> Path:
    from svdadapt.trainer import write_marker

    ckpt = out / f"checkpoint-{step}"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "sub" / "state.pt").write_bytes(b"state")
    write_marker(ckpt, {"step": step})
    return ckpt


def test_a_checkpoint_is_complete_only_with_every_file_its_marker_lists(tmp_path):
    from svdadapt.trainer import checkpoint_state, remove_checkpoint

    one, two = _checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)
    assert json.loads((two / "svdadapt_checkpoint.json").read_text())["files"] == {"model.safetensors": 7, "sub/state.pt": 5}
    assert complete_checkpoints(tmp_path) == [one, two]
    (two / "model.safetensors").unlink()  # a cleanup cut short
    assert complete_checkpoints(tmp_path) == [one]
    assert "1 of the 2 files its marker lists missing" in checkpoint_state(two)
    (one / "sub" / "state.pt").write_bytes(b"st")  # truncated
    assert complete_checkpoints(tmp_path) == [] and "['sub/state.pt']" in checkpoint_state(one)
    three = _checkpoint(tmp_path, 3)
    import svdadapt.trainer as trainer

    real = trainer.shutil.rmtree
    trainer.shutil.rmtree = lambda *a, **k: None  # a deletion killed at once: the marker went first
    try:
        remove_checkpoint(three)
    finally:
        trainer.shutil.rmtree = real
    assert (three / "model.safetensors").is_file() and complete_checkpoints(tmp_path) == []


def test_saves_cut_short_are_cleaned_up_and_a_replaced_adapter_put_back(tmp_path):
    from svdadapt.io import remove_stale_saves
    from svdadapt.train import _remove_unfinished_checkpoints

    (tmp_path / ".adapter.k2j_x9qa.tmp").mkdir()  # a save killed while writing
    (tmp_path / ".adapter_full.ab12cd34.tmp.old").mkdir()  # killed between its two renames: the previous save
    (tmp_path / ".adapter_full.ab12cd34.tmp.old" / "adapter.safetensors").write_bytes(b"x")
    (tmp_path / ".metrics.json.tmp").write_text("{")
    (tmp_path / "checkpoint-6").mkdir()  # no marker
    kept = _checkpoint(tmp_path, 4)
    done = remove_stale_saves(tmp_path) + _remove_unfinished_checkpoints(tmp_path)
    assert len(done) == 4 and "restored adapter_full/" in " ".join(done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_full", "checkpoint-4"]
    assert (tmp_path / "adapter_full" / "adapter.safetensors").read_bytes() == b"x" and complete_checkpoints(tmp_path) == [kept]


def test_overwrite_removes_only_a_directory_that_looks_like_a_run(llama_dir, tmp_path):  # noqa: F811
    from svdadapt.train import check_output_dir

    out = tmp_path / "run"
    recipe = llama_recipe(llama_dir, out, "edora")
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(
        ValueError, match=r"--overwrite: .* does not look like an svdadapt run .*\['thesis.tex'\]\), so it is not removed"
    ):
        check_output_dir(recipe, resume=False, overwrite=True)
    (out / "recipe.yaml").write_text("just: a file\n")
    with pytest.raises(ValueError, match="does not look like an svdadapt run"):
        check_output_dir(recipe, resume=False, overwrite=True)
    (out / "thesis.tex").unlink()
    (out / "recipe.yaml").write_text(dump_recipe(llama_recipe(llama_dir, out, "dude")))  # another recipe's run
    assert check_output_dir(recipe, resume=False, overwrite=True) is None
    (out / ".git").mkdir()
    with pytest.raises(ValueError, match="does not look like an svdadapt run"):
        check_output_dir(recipe, resume=False, overwrite=True)
    empty = tmp_path / "left"
    empty.mkdir()
    (empty / ".recipe.yaml.tmp").write_text("")  # only what a kill left: as empty
    assert check_output_dir(llama_recipe(llama_dir, empty, "edora"), resume=False, overwrite=True) is None


# --- one SVD cache, two processes ---------------------------------------------------------------------


def test_two_processes_filling_one_svd_cache_entry_never_read_a_partial_one(tmp_path):
    import multiprocessing as mp

    import cache_worker

    from svdadapt import svd as S

    S._store(tmp_path / "entry", 128, *cache_worker.factors())
    ctx = mp.get_context("spawn")
    go, done, result = ctx.Barrier(2), ctx.Event(), ctx.Queue()  # both start together
    procs = [
        ctx.Process(target=cache_worker.writer, args=(str(tmp_path), 300, go, done)),
        ctx.Process(target=cache_worker.reader, args=(str(tmp_path), go, done, result)),
    ]
    for p in procs:
        p.start()
    reads, missing, wrong = result.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert reads > 0 and missing == 0 and wrong == 0, (reads, missing, wrong)
    assert [p.name for p in (tmp_path / "entry").iterdir()] == ["r128.safetensors"]  # no temporary left
