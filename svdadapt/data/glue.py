"""GLUE: the eight tasks, loaded from the hub (`nyu-mll/glue`) or a local dir in the original TSV layout.

    from svdadapt.data.glue import load_glue, glue_metrics
    dev = load_glue("rte", "validation", data_dir="../shared/data/glue")   # datasets.Dataset
    glue_metrics("rte", predictions=[0, 1, 1], labels=[0, 1, 0])           # {"accuracy": 0.667}

Every task comes back with the same columns: `sentence1`, `sentence2` (None for single-sentence
tasks), `label` (int, or float for STS-B), numbered as on the hub (e.g. RTE: 0 entailment,
1 not_entailment).
"""

from __future__ import annotations

import csv
import difflib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class GlueTask:
    """Where a task's data lives and what its columns are.

    Attributes:
        dir: the task's directory in the original GLUE release.
        hub_columns: (first text, second text or None) column names on the hub.
        tsv_columns: (first text, second text or None, label) in the TSV header; ints index a headerless file.
        labels: TSV label strings in hub order; () when the TSV already holds the number.
        num_labels: classes, 1 for regression.
        metrics: what `glue_metrics` reports.
    """

    dir: str
    hub_columns: tuple[str, str | None]
    tsv_columns: tuple[str | int, str | int | None, str | int]
    labels: tuple[str, ...] = ()
    num_labels: int = 2
    metrics: tuple[str, ...] = ("accuracy",)
    dev_file: str = "dev.tsv"


_NLI2 = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", ("sentence", None), (3, None, 1), metrics=("matthews_correlation",)),
    "sst2": GlueTask("SST-2", ("sentence", None), ("sentence", None, "label")),
    "mrpc": GlueTask("MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String", "Quality"), metrics=("accuracy", "f1")),
    "qqp": GlueTask("QQP", ("question1", "question2"), ("question1", "question2", "is_duplicate"), metrics=("accuracy", "f1")),
    "stsb": GlueTask(
        "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2", "score"), num_labels=1, metrics=("pearson", "spearman")
    ),
    "mnli": GlueTask(
        "MNLI",
        ("premise", "hypothesis"),
        ("sentence1", "sentence2", "gold_label"),
        ("entailment", "neutral", "contradiction"),
        3,
        dev_file="dev_matched.tsv",
    ),
    "qnli": GlueTask("QNLI", ("question", "sentence"), ("question", "sentence", "label"), _NLI2),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2", "label"), _NLI2),
}
SPLITS = ("train", "validation", "test")
HUB_ID = "nyu-mll/glue"  # where load_glue reads when no data_dir is given
SAMPLE = "pkg://svdadapt/data/sample"  # the SST-2 sample shipped with svdadapt (train 1000 rows, dev 872)


def glue_task(task: str) -> GlueTask:
    """The task's description; raises naming the close matches for an unknown name."""
    key = task.lower().replace("-", "") if isinstance(task, str) else task
    if key not in GLUE_TASKS:
        close = difflib.get_close_matches(str(key), GLUE_TASKS, n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown GLUE task {task!r}; choose from {sorted(GLUE_TASKS)}.{hint}")
    return GLUE_TASKS[key]


def _tsv_path(spec: GlueTask, split: str, data_dir: Path) -> Path:
    folder = data_dir / spec.dir if (data_dir / spec.dir).is_dir() else data_dir
    names = {"train": ["train_full.tsv", "train.tsv"], "validation": [spec.dev_file, "dev.tsv"], "test": ["test.tsv"]}[split]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(
        f"GLUE data for split {split!r} not found: looked for {names} in {str(folder)!r}. "
        f"Pass data_dir= the directory holding {spec.dir}/ in the original GLUE layout, or leave it unset to use the hub"
    )


def _read_tsv(path: Path, spec: GlueTask) -> list[dict]:
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path} is empty; expected a GLUE TSV file")
    first, second, label = spec.tsv_columns
    if isinstance(first, int):  # headerless (CoLA): columns by position
        index, body = {i: i for i in range(max(len(r) for r in rows))}, rows
    else:
        header, body = rows[0], rows[1:]
        index = {name: i for i, name in enumerate(header)}
        wanted = [c for c in (first, second, label) if c is not None]
        if missing := [c for c in wanted if c not in index]:
            raise ValueError(f"{path}: expected columns {wanted} for this GLUE task, found {header}; missing {missing}")
    out = []
    for n, row in enumerate(body, start=2):
        if not row or len(row) <= max(index[c] for c in (first, second, label) if c is not None):
            continue  # a blank or truncated line (a few in the original QQP/MNLI files)
        raw = row[index[label]]
        try:
            value = float(raw) if spec.num_labels == 1 else spec.labels.index(raw) if spec.labels else int(raw)
        except ValueError:
            allowed = list(spec.labels) or "a number"
            raise ValueError(f"{path} line {n}: label {raw!r} is not one of {allowed}") from None
        out.append(
            {"sentence1": row[index[first]], "sentence2": row[index[second]] if second is not None else None, "label": value}
        )
    return out


def load_glue(task: str, split: str, data_dir: str | Path | None = None):
    """One GLUE split as a `datasets.Dataset` with columns sentence1, sentence2, label.

    Args:
        task: one of `GLUE_TASKS` (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte).
        split: "train", "validation" (MNLI: matched) or "test" (labels -1 on the hub).
        data_dir: a directory in the original GLUE layout (RTE/train.tsv, SST-2/dev.tsv, ...),
            the task's own folder, or `pkg://svdadapt/data/sample` (SST-2 only); None loads
            `nyu-mll/glue` from the hub.
    """
    import datasets

    from svdadapt.paths import resolve_path

    spec = glue_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown GLUE split {split!r}; choose from {list(SPLITS)}")
    if data_dir is not None:
        root = Path(resolve_path(str(data_dir)))
        if not root.is_dir():
            raise ValueError(
                f"GLUE data_dir {str(root)!r} does not exist; pass the directory holding {spec.dir}/ (original GLUE layout)"
            )
        return datasets.Dataset.from_list(_read_tsv(_tsv_path(spec, split, root), spec))
    name = next(k for k, v in GLUE_TASKS.items() if v is spec)
    hub_split = (
        "validation_matched"
        if name == "mnli" and split == "validation"
        else "test_matched"
        if name == "mnli" and split == "test"
        else split
    )
    ds = datasets.load_dataset(HUB_ID, name, split=hub_split)
    a, b = spec.hub_columns
    ds = ds.rename_column(a, "sentence1") if a != "sentence1" else ds
    if b is None:
        ds = ds.add_column("sentence2", [None] * len(ds))
    elif b != "sentence2":
        ds = ds.rename_column(b, "sentence2")
    return ds.select_columns(["sentence1", "sentence2", "label"])


# --- metrics ---------------------------------------------------------------------------------


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (1-based), as Spearman's correlation needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def _matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(((pred == 1) & (gold == 1)).sum())
    tn = float(((pred == 0) & (gold == 0)).sum())
    fp = float(((pred == 1) & (gold == 0)).sum())
    fn = float(((pred == 0) & (gold == 1)).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom > 0 else 0.0


def _f1(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(((pred == 1) & (gold == 1)).sum())
    denom = float((pred == 1).sum() + (gold == 1).sum())
    return 2 * tp / denom if denom > 0 else 0.0


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
    """The task's GLUE metrics: Matthews (CoLA), Pearson/Spearman (STS-B), accuracy and F1 (MRPC, QQP), else accuracy.

    Args:
        task: a GLUE task name.
        predictions: class ids (n,), or scores (n,) for STS-B; logits (n, classes) are reduced by argmax.
        labels: gold class ids or scores (n,).
    """
    spec = glue_task(task)
    pred, gold = np.asarray(predictions), np.asarray(labels)
    if spec.num_labels == 1:
        pred, gold = pred.reshape(-1).astype(np.float64), gold.reshape(-1).astype(np.float64)
    else:
        pred = pred.argmax(-1) if pred.ndim == 2 else pred
        pred, gold = pred.astype(np.int64), gold.astype(np.int64)
    if pred.shape != gold.shape:
        raise ValueError(f"glue_metrics({task!r}): {pred.shape[0]} predictions for {gold.shape[0]} labels")
    out = {}
    for name in spec.metrics:
        if name == "accuracy":
            out[name] = float((pred == gold).mean())
        elif name == "f1":
            out[name] = _f1(pred, gold)
        elif name == "matthews_correlation":
            out[name] = _matthews(pred, gold)
        elif name == "pearson":
            out[name] = _pearson(pred, gold)
        elif name == "spearman":
            out[name] = _pearson(_ranks(pred), _ranks(gold))
    return out


__all__ = ["GLUE_TASKS", "HUB_ID", "SAMPLE", "GlueTask", "glue_metrics", "glue_task", "load_glue"]
