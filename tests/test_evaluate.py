"""`svdadapt eval`: local GSM8K/MMLU tasks through lm-eval on a tiny Llama, answer extraction, bad input."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_train import roberta_dir, roberta_recipe  # noqa: F401  (a fixture and its recipe)
from tiny import llama_config

import svdadapt
from svdadapt import evaluate
from svdadapt.prompts import ALPACA_PROMPT, alpaca_prompt
from svdadapt.tasks import MMLU_SUBJECTS, utils, write_task_dir


def _shared_data() -> Path | None:
    """../shared/data next to the repository (CI layout), or next to any parent folder."""
    here = Path(__file__).resolve()
    return next((p / "shared" / "data" for p in here.parents if (p / "shared" / "data").is_dir()), None)


DATA = _shared_data()
needs_data = pytest.mark.skipif(DATA is None, reason="real data not found: ../shared/data (gsm8k/, mmlu/, tokenizers/) is absent")


# ---------------------------------------------------------------- answer extraction


def _gsm8k_yaml(tmp_path) -> dict:
    write_task_dir(tmp_path, tmp_path / "tasks")
    return yaml.safe_load((tmp_path / "tasks" / "gsm8k.yaml").read_text())


def _filtered(spec: dict, name: str, text: str) -> str:
    """Run `text` through the named filter pipeline of the YAML with lm-eval's own filter classes."""
    from lm_eval.filters.extraction import RegexFilter

    (steps,) = [f["filter"] for f in spec["filter_list"] if f["name"] == name]
    assert steps[0]["function"] == "regex" and steps[1]["function"] == "take_first"
    kwargs = {k: v for k, v in steps[0].items() if k != "function"}
    return list(RegexFilter(**kwargs).apply([[text]], [{}]))[0][0]


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("She sells 16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\n#### 18", "18", "18"),
        ("Total: 1,200 + 34 = 1,234.\n#### 1,234", "1,234", "1,234"),
        ("He owes money.\n#### -5", "-5", "-5"),
        ("So she has 3 apples and 10 oranges", "[invalid]", "10"),
        ("The answer is $42.", "[invalid]", "$42."),
        ("no digits at all", "[invalid]", "[invalid]"),
    ],
)
def test_gsm8k_filters_extract_like_lm_eval(tmp_path, text, strict, flexible):
    spec = _gsm8k_yaml(tmp_path)
    assert _filtered(spec, "strict-match", text) == strict
    assert _filtered(spec, "flexible-extract", text) == flexible


def test_gsm8k_exact_match_normalisation(tmp_path):
    from lm_eval.api.metrics import exact_match_hf_evaluate

    (metric,) = _gsm8k_yaml(tmp_path)["metric_list"]
    opts = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")}
    reference = "Step one.\nStep two costs $1,000.\n#### 1,234"
    for pred, hit in [("1,234", 1.0), ("$1,234.", 1.0), ("1234", 1.0), ("1235", 0.0), ("[invalid]", 0.0)]:
        assert exact_match_hf_evaluate([pred], [reference], **opts)["exact_match"] == hit, pred


@pytest.mark.parametrize(
    "text, expected",
    [
        ("16 - 3 - 4 = 9; 9 * 2 = 18. The answer is: 18", 18),
        ("The answer is: 1,234 dollars", 1234),
        ("The answer is: -7.", -7),
        ("The answer is: $12.50", 12),  # rounded to an integer, as the MetaMathQA scorer does
        ("The answer is: 3/4", 1),
        ("The answer is: 5/0", 5),
        ("The answer is: 12. Wait. The answer is: 13", 13),  # the last marker counts
        ("The answer is:\n  7 apples", 7),
        ("The answer is 18", None),  # no colon: no answer
        ("I think 42", None),
        ("The answer is: unknown", None),
    ],
)
def test_metamath_answer_extraction(text, expected):
    assert utils.extract_metamath_answer(text) == expected


def test_metamath_scoring_and_prompt():
    doc = {"question": "How many legs do 3 cats have?", "answer": "3 * 4 = 12 legs.\n#### 1,212"}
    assert utils.gsm8k_label(doc) == "1212"
    assert utils.metamath_process_results(doc, ["3 cats... The answer is: 1212"]) == {
        "exact_match": 1.0,
        "last_number_match": 1.0,
    }
    assert utils.metamath_process_results(doc, ["The answer is: 12"]) == {"exact_match": 0.0, "last_number_match": 0.0}
    assert utils.metamath_process_results(doc, ["1,212"]) == {"exact_match": 0.0, "last_number_match": 1.0}
    assert utils.metamath_process_results(doc, ["The answer is: 1212 (not 12)"]) == {"exact_match": 1.0, "last_number_match": 0.0}
    assert utils.extract_last_number("no digits here") is None
    prompt = utils.metamath_prompt(doc)
    assert prompt == alpaca_prompt(doc["question"]) == ALPACA_PROMPT.replace("{query}", doc["question"])
    assert prompt.startswith(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    )
    assert prompt.endswith(f"### Instruction:\n{doc['question']}\n\n### Response:")


# ---------------------------------------------------------------- task definitions


@needs_data
def test_mmlu_group_has_57_subject_tasks(tmp_path):
    from lm_eval.tasks import TaskManager

    assert len(MMLU_SUBJECTS) == 57
    assert sorted(MMLU_SUBJECTS) == sorted(p.name[: -len("_test.csv")] for p in (DATA / "mmlu" / "test").glob("*_test.csv"))
    write_task_dir(DATA, tmp_path, ["mmlu"])
    loaded = TaskManager(include_defaults=False, include_path=str(tmp_path)).load(["mmlu"])
    assert sorted(loaded["tasks"]) == sorted(f"mmlu_{s}" for s in MMLU_SUBJECTS)
    assert {"mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"} <= set(loaded["groups"])
    task = loaded["tasks"]["mmlu_anatomy"]
    docs = list(task.test_docs())
    assert len(docs) == 135  # rows in mmlu/test/anatomy_test.csv (SOURCES.md)
    assert all(isinstance(c, str) for d in docs for c in d["choices"]) and {d["answer"] for d in docs} <= {0, 1, 2, 3}
    text = task.doc_to_text(docs[0])
    assert text.startswith(docs[0]["question"].strip()) and "\nA. " in text and text.endswith("\nAnswer:")
    assert task.config.description == "The following are multiple choice questions (with answers) about anatomy.\n\n"


@needs_data
def test_local_tasks_are_indexed_alone(tmp_path):
    """gsm8k/mmlu with --data-dir, plus a task from --include-path, need no index of lm-eval's ~15k tasks."""
    own = tmp_path / "own"
    own.mkdir()
    spec = {
        "task": "my_arith",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(DATA / "gsm8k" / "test.jsonl")}},
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "exact_match"}],
    }
    (own / "my_arith.yaml").write_text(yaml.safe_dump(spec))
    manager = evaluate.resolve_tasks(["gsm8k", "mmlu", "my_arith"], str(DATA), [str(own)], str(tmp_path / "work"))
    assert {"gsm8k", "gsm8k_metamath", "mmlu", "mmlu_anatomy", "my_arith"} <= set(manager.all_tasks)
    assert len(manager.all_tasks) < 100 and "hellaswag" not in manager.all_tasks


def test_missing_data_file_is_named(tmp_path):
    (tmp_path / "mmlu").mkdir()
    with pytest.raises(ValueError, match=r"task mmlu_anatomy: .*anatomy_dev\.csv' does not exist"):
        write_task_dir(tmp_path, tmp_path / "tasks", ["mmlu_anatomy"])
    with pytest.raises(ValueError, match="--data-dir .* is not a directory"):
        write_task_dir(tmp_path / "nope", tmp_path / "tasks")


# ---------------------------------------------------------------- end to end on a tiny model


def _tiny_llama(path: Path, seed: int = 0, cls=None, **cfg) -> torch.nn.Module:
    pytest.importorskip("sentencepiece", reason="the Llama-2 tokenizer needs sentencepiece (pip install sentencepiece protobuf)")
    pytest.importorskip("google.protobuf", reason="the Llama-2 tokenizer needs protobuf (pip install protobuf)")
    from transformers import LlamaForCausalLM, LlamaTokenizer

    spm = DATA / "tokenizers" / "llama2" / "tokenizer.model"
    path.mkdir(parents=True)
    shutil.copy(spm, path / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(path))
    (path / "tokenizer.model").unlink()
    torch.manual_seed(seed)
    config = llama_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, max_position_embeddings=4096, **cfg)
    model = (cls or LlamaForCausalLM)(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return model


def _adapt(model: torch.nn.Module, path: Path, **cfg) -> None:
    """An adapter whose trainable tensors moved away from their start values, saved to `path`."""
    svdadapt.apply(model, svdadapt.AdapterConfig(method="dude", r=4, **cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    svdadapt.save_adapter(model, path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if DATA is None:
        pytest.skip("real data not found: ../shared/data is absent")
    root = tmp_path_factory.mktemp("tiny")
    model = _tiny_llama(root / "model")
    _adapt(model, root / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    return root


TASKS = "gsm8k,gsm8k_metamath,mmlu_anatomy,mmlu_astronomy"


def _eval(tiny, out: Path, *extra: str, tasks: str = TASKS) -> tuple[dict, dict]:
    args = ["--model", str(tiny / "model"), "--tasks", tasks, "--data-dir", str(DATA), "--limit", "3"]
    args += ["--gen-kwargs", "max_gen_toks=16", "--log-samples", "--output", str(out), *extra]
    assert evaluate.cli(args) == 0
    return json.loads((out / "results.json").read_text()), json.loads((out / "samples.json").read_text())


def _logliks(samples: dict, task: str) -> torch.Tensor:
    return torch.tensor([[float(r[0][0]) for r in s["resps"]] for s in samples[task]], dtype=torch.float64)


@needs_data
def test_eval_merged_equals_unmerged(tiny, tmp_path):
    merged, s_merged = _eval(tiny, tmp_path / "merged", "--adapter", str(tiny / "adapter"))
    unmerged, s_unmerged = _eval(tiny, tmp_path / "unmerged", "--adapter", str(tiny / "adapter"), "--no-merge")
    base, s_base = _eval(tiny, tmp_path / "base", tasks="mmlu_anatomy,mmlu_astronomy")

    # every task scored, numeric metrics, the official few-shot settings
    want = {
        "gsm8k": ["exact_match,strict-match", "exact_match,flexible-extract"],
        "gsm8k_metamath": ["exact_match,none", "last_number_match,none"],
        "mmlu_anatomy": ["acc,none"],
        "mmlu_astronomy": ["acc,none"],
    }
    for task, keys in want.items():
        for k in keys:
            assert 0.0 <= merged["metrics"][task][k] <= 1.0, (task, k)
    assert merged["n_shot"] == {"gsm8k": 5, "gsm8k_metamath": 0, "mmlu_anatomy": 0, "mmlu_astronomy": 0}
    assert all(n["effective"] == 3 for n in merged["n_samples"].values())
    gsm_prompt = s_merged["gsm8k"][0]["arguments"][0][0]
    assert gsm_prompt.count("Question: ") == 6 and gsm_prompt.endswith("\nAnswer:")
    assert s_merged["gsm8k_metamath"][0]["arguments"][0][0] == alpaca_prompt(s_merged["gsm8k_metamath"][0]["doc"]["question"])

    # what the file says about the run
    assert merged["adapter_config"]["config"]["method"] == "dude" and merged["merged"] is True and unmerged["merged"] is False
    assert merged["svdadapt_version"] == svdadapt.__version__ and merged["lm_eval_version"]
    assert merged["model"] == str(tiny / "model") and merged["seed"] == 1234

    # merging changes nothing: same metrics, same generations, log-likelihoods equal to float32 rounding
    assert merged["metrics"] == unmerged["metrics"]
    for task in ("gsm8k", "gsm8k_metamath"):
        assert [s["resps"] for s in s_merged[task]] == [s["resps"] for s in s_unmerged[task]]
    for task in ("mmlu_anatomy", "mmlu_astronomy"):
        torch.testing.assert_close(_logliks(s_merged, task), _logliks(s_unmerged, task), rtol=0, atol=1e-4)
        # ...while the adapter itself does change the model
        assert (_logliks(s_merged, task) - _logliks(s_base, task)).abs().max() > 1e-3
    assert base["adapter"] is None and base["merged"] is False


# ---------------------------------------------------------------- bad input


def _fails(capsys, *argv: str) -> str:
    assert evaluate.cli(list(argv)) == 2
    return capsys.readouterr().err


@needs_data
def test_unknown_task_lists_close_matches_offline(capsys):
    err = _fails(capsys, "--model", "unused", "--tasks", "gsm8kk,mmlu_anatomyy,gsm8k", "--data-dir", str(DATA))
    assert "task(s) ['gsm8kk', 'mmlu_anatomyy'] are not defined locally" in err
    assert "'gsm8kk': did you mean gsm8k" in err and "'mmlu_anatomyy': did you mean mmlu_anatomy" in err


@pytest.mark.slow
def test_unknown_task_lists_close_matches_online(capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "_offline", lambda: False)  # the name check needs lm-eval's index, not the network
    err = _fails(capsys, "--model", "unused", "--tasks", "hellaswg")
    assert "unknown task name(s) ['hellaswg'] ('hellaswg': did you mean hellaswag" in err


def test_hub_task_offline_fails_naming_local_options(capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    err = _fails(capsys, "--model", "unused", "--tasks", "hellaswag")
    assert (
        "task(s) ['hellaswag'] are not defined locally; lm-eval's own tasks download their data from the Hugging Face hub" in err
    )
    assert "--include-path DIR" in err and "--data-dir DIR" in err
    err = _fails(capsys, "--model", "unused", "--tasks", "gsm8k,mmlu")
    assert "task(s) ['gsm8k', 'mmlu'] read local files here: pass --data-dir DIR" in err
    err = _fails(capsys, "--model", "unused", "--tasks", "gsm8k_metamath")
    assert "task(s) ['gsm8k_metamath'] read local files here" in err


def test_missing_adapter_directory(capsys, tmp_path):
    err = _fails(capsys, "--model", "unused", "--adapter", str(tmp_path / "nope"), "--tasks", "gsm8k")
    assert f"--adapter {str(tmp_path / 'nope')!r} is not a directory" in err


def test_adapter_directory_without_files(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    err = _fails(
        capsys,
        "--model",
        "unused",
        "--adapter",
        str(tmp_path / "empty"),
        "--tasks",
        "gsm8k_metamath",
        "--data-dir",
        str(tmp_path),
    )
    assert "has no adapter_config.json; pass a directory written by svdadapt.save_adapter" in err


def test_tasks_or_glue_required(capsys):
    with pytest.raises(SystemExit):
        evaluate.cli(["--model", "unused"])
    assert "exactly one of --tasks" in capsys.readouterr().err


# ---------------------------------------------------------------- GLUE


@needs_data
def test_glue_eval_matches_direct_computation(tmp_path, capsys):
    """`eval --glue rte` on the real RTE dev rows equals scoring the adapted model directly."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from svdadapt.data.glue import glue_metrics, load_glue

    rows = [dict(r) for r in load_glue("rte", "validation", data_dir=DATA / "glue")][:10]
    model = _tiny_llama(tmp_path / "model", seed=3, cls=LlamaForSequenceClassification, num_labels=2, pad_token_id=0)
    _adapt(model, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], modules_to_save=("score",))
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    tok.pad_token = tok.unk_token
    with torch.no_grad():
        preds = [int(model(**tok(r["sentence1"], r["sentence2"], return_tensors="pt")).logits.argmax(-1)) for r in rows]
    expected = glue_metrics("rte", preds, [r["label"] for r in rows])["accuracy"]

    for extra in ([], ["--no-merge"]):
        out = tmp_path / f"glue{len(extra)}"
        argv = [
            "--glue",
            "rte",
            "--model",
            str(tmp_path / "model"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--batch-size",
            "4",
            "--limit",
            "10",
            "--data-dir",
            str(DATA / "glue"),
            "--output",
            str(out),
        ]
        assert evaluate.cli(argv + extra) == 0
        result = json.loads((out / "results.json").read_text())
        assert result["results"]["rte"]["accuracy"] == pytest.approx(expected) and result["n"] == 10
    err = _fails(capsys, "--glue", "rtx", "--model", "unused")
    assert "did you mean 'rte'" in err


# ---------------------------------------------------------------- from a training run (no ../shared needed)


@pytest.fixture(scope="module")
def trained_run(roberta_dir, tmp_path_factory):  # noqa: F811
    """A short `svdadapt train` run of a tiny classifier on the shipped SST-2 sample (32 dev sentences)."""
    from svdadapt.train import run

    out = tmp_path_factory.mktemp("run") / "run"
    return run(roberta_recipe(roberta_dir, out, "edora")).metrics, out


def test_glue_eval_of_a_run_directory_matches_training(roberta_dir, trained_run, tmp_path, capsys):  # noqa: F811
    """`--adapter RUN_DIR` uses RUN_DIR/adapter; the default batch size is 32; the accuracy is the
    one the training run measured on the same 32 dev sentences."""
    metrics, run_dir = trained_run
    argv = ["--glue", "sst2", "--model", str(roberta_dir), "--adapter", str(run_dir), "--limit", "32"]
    assert evaluate.cli([*argv, "--data-dir", "pkg://svdadapt/data/sample", "--output", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "results.json").read_text())
    assert result["adapter"] == str((run_dir / "adapter").resolve()) and result["batch_size"] == 32 and result["n"] == 32
    assert result["results"]["sst2"]["accuracy"] == metrics["final"]["accuracy"]


def test_adapter_on_the_wrong_base_names_its_base_before_loading_weights(
    trained_run, tmp_path, capsys, monkeypatch, offline_empty_cache
):
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    other = tmp_path / "other"
    RobertaConfig(
        vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    ).save_pretrained(other)

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the adapter was checked")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_loading)
    _, run_dir = trained_run
    err = _fails(capsys, "--glue", "sst2", "--model", "nyu-mll/none", "--adapter", str(run_dir / "adapter"))
    assert "--glue sst2 without --data-dir reads nyu-mll/glue from the Hugging Face hub, which is unreachable here" in err
    argv = ["--glue", "sst2", "--model", str(other), "--adapter", str(run_dir / "adapter")]
    err = _fails(capsys, *argv, "--data-dir", "pkg://svdadapt/data/sample")
    recorded = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["base_model"]
    assert "has shape (48, 48) in the model but (32, 32) in the adapter" in err
    assert f"the adapter was trained on base model {recorded!r}" in err and recorded


def test_a_model_that_is_neither_a_directory_nor_a_hub_id(capsys):
    err = _fails(capsys, "--glue", "sst2", "--model", "/nonexistent/model", "--data-dir", "pkg://svdadapt/data/sample")
    assert "--model='/nonexistent/model': '/nonexistent/model' does not exist" in err
