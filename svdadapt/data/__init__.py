"""Training data for recipes: `build_data(section, tokenizer, seed)` -> tokenized train/eval sets, collator, metrics.

Modules: `svdadapt.data.math` (MetaMathQA, GSM8K) and `svdadapt.data.glue` (the eight GLUE tasks).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from svdadapt.data.glue import GLUE_TASKS, glue_metrics, glue_task, load_glue
from svdadapt.data.math import PadCollator, load_math, tokenize_math

METAMATHQA = "meta-math/MetaMathQA"  # data.source's default for kind "math"


@dataclass
class DataBundle:
    """What the Trainer needs from the data.

    Attributes:
        train: tokenized training set (`datasets.Dataset`).
        eval: tokenized evaluation set, or None.
        collator: batches examples (dynamic padding).
        compute_metrics: `EvalPrediction -> dict`, or None (the eval loss only).
        num_labels: classes of a GLUE task (1 for STS-B), None for causal LM data.
        task: a short name for reports ("rte", "math").
        test: a test set scored once after training (GLUE dev when a validation split is held out), or None.
    """

    train: object
    eval: object | None
    collator: Callable
    compute_metrics: Callable | None
    num_labels: int | None
    task: str
    test: object | None = None


def _subset(ds, n: int | None, seed: int | None = None):
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    return ds.select(range(min(n, len(ds)))) if n else ds


def _math(section, tokenizer, seed: int) -> DataBundle:
    import datasets

    rows = load_math(section.source or METAMATHQA)
    rng = random.Random(seed)
    eval_rows = load_math(section.eval_source) if section.eval_source else []
    if not eval_rows and section.eval_size:
        rng.shuffle(rows)
        eval_rows, rows = rows[: section.eval_size], rows[section.eval_size :]
    if section.max_train_samples:
        rows = rows[: section.max_train_samples]
    if section.max_eval_samples:
        eval_rows = eval_rows[: section.max_eval_samples]

    def encode(rs):
        feats = [tokenize_math(r, tokenizer, section.max_length) for r in rs]
        kept = [f for f in feats if any(t != -100 for t in f["labels"])]  # the prompt alone filled max_length
        if not kept:
            raise ValueError(f"data.max_length={section.max_length} leaves no response tokens in any example; raise it")
        if len(kept) < len(feats):
            warnings.warn(
                f"dropped {len(feats) - len(kept)} of {len(feats)} examples whose prompt fills data.max_length", stacklevel=2
            )
        feats = kept
        return datasets.Dataset.from_dict({k: [f[k] for f in feats] for k in ("input_ids", "attention_mask", "labels")})

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataBundle(encode(rows), encode(eval_rows) if eval_rows else None, PadCollator(pad), None, None, "math")


def _glue(section, tokenizer, seed: int) -> DataBundle:
    from transformers import DataCollatorWithPadding

    task = section.glue_task.lower().replace("-", "")
    spec = glue_task(task)
    rows = load_glue(task, "train", section.source)
    train = _subset(rows, section.max_train_samples, seed if section.max_train_samples else None)
    dev = _subset(load_glue(task, "validation", section.source), section.max_eval_samples)

    def encode(batch):
        second = batch["sentence2"] if spec.hub_columns[1] is not None else None
        out = tokenizer(batch["sentence1"], second, truncation=True, max_length=section.max_length)
        out["labels"] = batch["label"]
        return out

    val = None
    if section.validation_size:
        val = _remaining(rows, len(train), section.validation_size, seed)
    if section.validation_fraction:
        parts = train.train_test_split(test_size=section.validation_fraction, seed=seed)
        train, val = parts["train"], parts["test"]
    cols = ["sentence1", "sentence2", "label"]
    train, dev = (d.map(encode, batched=True, remove_columns=cols) for d in (train, dev))
    # Evaluation batches of similar lengths pad less; the order is the same in every run (paired comparisons).
    dev = by_length(dev)
    if val is not None:
        val = by_length(val.map(encode, batched=True, remove_columns=cols))

    def compute_metrics(pred) -> dict:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return glue_metrics(task, logits if spec.num_labels > 1 else logits.reshape(-1), pred.label_ids)

    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    if val is not None:
        return DataBundle(train, val, collator, compute_metrics, spec.num_labels, task, test=dev)
    return DataBundle(train, dev, collator, compute_metrics, spec.num_labels, task)


def _remaining(rows, used: int, size: int, seed: int):
    """Up to `size` rows of the training split that the sampled `used` rows (the same seeded shuffle) leave out."""
    left = len(rows) - used
    if left <= 0:
        raise ValueError(
            f"data.validation_size={size}: all {len(rows)} training rows are in the training sample "
            "(data.max_train_samples); lower max_train_samples or hold out a share with data.validation_fraction"
        )
    if left < size:
        warnings.warn(f"data.validation_size={size}: only {left} training rows remain; validating on those", stacklevel=3)
    return rows.shuffle(seed=seed).select(range(used, used + min(size, left)))


def by_length(ds):
    """The tokenized dataset in order of length (stable: equal lengths keep their order)."""
    import numpy as np

    lengths = np.array([len(x) for x in ds["input_ids"]])
    return ds.select(np.argsort(lengths, kind="stable").tolist())


def build_data(section, tokenizer, seed: int = 0) -> DataBundle:
    """Load and tokenize the data a recipe's `data` section describes."""
    return _glue(section, tokenizer, seed) if section.kind == "glue" else _math(section, tokenizer, seed)


__all__ = ["GLUE_TASKS", "DataBundle", "build_data", "glue_metrics", "load_glue", "load_math", "tokenize_math"]
