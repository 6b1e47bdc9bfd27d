"""`svdadapt train RECIPE.yaml`: fine-tune a model with an adapter on the HF Trainer, alone or under DeepSpeed.

This module runs a recipe (output directory policy, model and data loading, metrics, saving the
adapter); `svdadapt.trainer` holds the Trainer itself.

    svdadapt train recipes/quickstart.yaml
    svdadapt train recipes/roberta_glue_edora.yaml --set data.glue_task=rte --set training.learning_rate=1e-3
    deepspeed --module svdadapt train recipes/mistral_dude.yaml
    torchrun --nproc_per_node 8 -m svdadapt train recipes/mistral_dude.yaml --set data.source=../shared/data/gsm8k/train.jsonl

The run directory gets recipe.yaml (the resolved recipe), adapter/ (compact) and adapter_full/,
metrics.json, and the Trainer's checkpoints; `--resume` continues from the last complete one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from svdadapt.faults import StopOnNonFinite
from svdadapt.io import is_temporary, remove_stale_saves, reporting_disk_full
from svdadapt.methods import get_method
from svdadapt.model import adapter_layers, apply, trainable_parameters
from svdadapt.paths import locate, resolve_path
from svdadapt.recipe import Recipe, dump_recipe, load_recipe
from svdadapt.trainer import (
    CLIPPING,
    COMPLETE,
    AdapterTrainer,
    checkpoint_state,
    complete_checkpoints,
    param_groups,
    restart_clock_after_first_evaluation,
    training_arguments,
)

_EVAL_NOISE = ("runtime", "samples_per_second", "steps_per_second", "epoch")


# --- paths and the output directory -----------------------------------------------------------


def _recipe_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _recipe_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def check_output_dir(recipe: Recipe, resume: bool, overwrite: bool) -> Path | None:
    """Decide what to do with the output directory, without touching it.

    Returns the checkpoint to resume from (or None). Raises `ValueError` if the directory holds
    another run (or any files) and neither --resume (same recipe) nor --overwrite was given.
    """
    import yaml

    out = Path(recipe.output_dir)
    if not out.exists() or all(is_temporary(p) for p in out.iterdir()):  # empty, or left by a save cut short
        return None
    if overwrite:
        if not looks_like_run(out):
            entries = sorted(p.name for p in out.iterdir())
            raise ValueError(
                f"--overwrite: output directory {str(out)!r} does not look like an svdadapt run (no recipe.yaml written by "
                f"svdadapt train; it holds {entries[:6]}{' ...' if len(entries) > 6 else ''}), so it is not removed. "
                "Pick another --output-dir, or empty it yourself"
            )
        return None
    saved = out / "recipe.yaml"
    if not saved.is_file():
        raise ValueError(
            f"output directory {str(out)!r} is not empty and holds no recipe.yaml; pick another --output-dir or pass --overwrite"
        )
    old, new = yaml.safe_load(saved.read_text()) or {}, yaml.safe_load(dump_recipe(recipe))
    old.pop("output_dir", None), new.pop("output_dir", None)  # a moved run directory is still the same run
    diff = _recipe_diff(old, new)
    if diff:
        raise ValueError(
            f"output directory {str(out)!r} holds a run of a different recipe ({'; '.join(diff[:6])}); "
            "pick another --output-dir, or pass --overwrite to replace it"
        )
    if not resume:
        raise ValueError(
            f"output directory {str(out)!r} already holds this run; pass --resume to continue it or --overwrite to start over"
        )
    done = complete_checkpoints(out)
    if not done:
        raise ValueError(
            f"--resume: output directory {str(out)!r} holds no complete checkpoint to continue from; it holds "
            f"{_describe_run(out)}. Pass --overwrite to start the run again from step 0"
        )
    return done[-1]


def _describe_run(out: Path) -> str:
    """What a run directory holds, for a message: its checkpoints (and what each lacks) and other entries."""
    parts = []
    for ckpt in sorted(out.glob("checkpoint-*")):
        lacks = checkpoint_state(ckpt)
        parts.append(f"{ckpt.name} ({'complete' if lacks is None else lacks})")
    if not parts:
        parts.append("no checkpoint-* directory (training.save_strategy / save_steps decide when they are written)")
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith("checkpoint-"))
    return "; ".join(parts) + (f"; and {others[:6]}" if others else "")


# --- model and optimiser ----------------------------------------------------------------------


def _model_path(recipe: Recipe) -> str:
    m = recipe.model
    path = resolve_path(m.name_or_path)
    if (path.startswith((".", "/")) or m.name_or_path.startswith("pkg://")) and not Path(path).exists():
        raise ValueError(f"model.name_or_path {m.name_or_path!r}: directory {path!r} does not exist")
    return path


def check_sources(recipe: Recipe) -> None:
    """Fail in seconds, before anything loads, if the model, tokenizer or data can be neither found
    locally nor fetched from the hub (offline, not cached); the error names the `--set` key to change."""
    from svdadapt.data import METAMATHQA
    from svdadapt.data.glue import HUB_ID, SAMPLE

    m, d = recipe.model, recipe.data
    locate(m.name_or_path, "--set model.name_or_path")
    if m.tokenizer:
        locate(m.tokenizer, "--set model.tokenizer")
    if d.kind == "math":
        locate(d.source or METAMATHQA, "--set data.source", "dataset")
        if d.eval_source:
            locate(d.eval_source, "--set data.eval_source", "dataset")
    elif d.source is None:
        locate(HUB_ID, "--set data.source", "dataset")
    elif not Path(resolve_path(d.source)).is_dir():
        raise ValueError(
            f"--set data.source={d.source!r}: GLUE directory {resolve_path(d.source)!r} does not exist (relative paths start at "
            f"the working directory); pass a directory in the original GLUE layout, {SAMPLE} (the SST-2 sample), "
            "or null for the hub's nyu-mll/glue"
        )


def load_tokenizer(recipe: Recipe):
    """The recipe's tokenizer, with a pad token (EOS or UNK if it has none)."""
    from transformers import AutoTokenizer

    m = recipe.model
    gguf = {"gguf_file": m.gguf_file} if m.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(m.tokenizer) if m.tokenizer else _model_path(recipe), **gguf)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_model(recipe: Recipe, tokenizer, num_labels: int | None):
    """The base model the recipe names (before the adapter is applied)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m = recipe.model
    path = _model_path(recipe)
    gguf = {"gguf_file": m.gguf_file} if m.gguf_file else {}
    kwargs = dict(dtype=getattr(torch, m.dtype), **gguf)
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.task == "sequence_classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=m.num_labels or num_labels, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _final_evaluation(trainer, history: list[dict]) -> dict:
    """The evaluation of the trained model: the one logged at the last step when there is one (the
    model has not changed since, and evaluation is deterministic), else a fresh one."""
    step = trainer.state.global_step
    last = next((h for h in reversed(history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == step:
        return {k: v for k, v in last.items() if k != "step"}
    return trainer.evaluate()


# --- the run ----------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What `run` returns: the adapted model, the Trainer, metrics.json's content and the directory."""

    model: torch.nn.Module
    trainer: object
    metrics: dict
    output_dir: Path


def _clean(entry: dict, prefix: str = "eval_") -> dict:
    return {k[len(prefix) :]: v for k, v in entry.items() if k.startswith(prefix) and k[len(prefix) :] not in _EVAL_NOISE}


def collect_metrics(
    recipe: Recipe,
    task: str,
    model,
    history: list[dict],
    steps: int,
    final: dict,
    train_time: float,
    clipping: dict | None = None,
) -> dict:
    """metrics.json: method, sizes, timing, the Trainer's log and eval history, final and before metrics."""
    count = trainable_parameters(model)
    logs = [
        {k: e.get(k) for k in ("step", "loss", "grad_norm", "learning_rate", "epoch")}
        for e in history
        if "loss" in e and "step" in e
    ]
    evals = [{"step": e["step"], **_clean(e)} for e in history if any(k.startswith("eval_") for k in e)]
    before = next((_clean(e) for e in history if e.get("step") == 0 and any(k.startswith("eval_") for k in e)), {})
    return {
        "label": variant_label(recipe.adapter),
        "method": recipe.adapter.method,
        "r": recipe.adapter.r,
        "alpha": recipe.adapter.resolved_alpha,
        "task": task,
        "model": recipe.model.name_or_path,
        "learning_rate": recipe.training.learning_rate,
        "magnitude_learning_rate": recipe.training.magnitude_learning_rate,
        "seed": recipe.training.seed,
        "eval_set": "validation" if recipe.data.validation_fraction or recipe.data.validation_size else "dev",
        "trainable_params": count.trainable,
        "total_params": count.total,
        "adapter_params": count.adapter,
        "train_time_s": round(train_time, 3),
        "train_steps": steps,
        "log_history": logs,
        "eval_history": evals,
        "final": _clean(final),
        "before": before,
        "magnitude_change": magnitude_change(model),
        "clipping": clipping and {**clipping, "max_grad_norm": recipe.training.max_grad_norm},
    }


def compact_predictions(predictions, labels) -> dict:
    """Per-example test predictions, small enough for metrics.json: class ids as a string of digits
    (logits are reduced by argmax), regression scores as a list rounded to 4 digits."""
    import numpy as np

    pred, gold = np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions), np.asarray(labels)
    if pred.ndim == 2 and pred.shape[1] > 1:
        if pred.shape[1] > 10:
            raise ValueError(f"compact_predictions: {pred.shape[1]} classes do not fit one digit each")
        return {"predictions": "".join(map(str, pred.argmax(-1))), "labels": "".join(map(str, gold.astype(int)))}
    return {"predictions": [round(float(x), 4) for x in pred.reshape(-1)], "labels": [round(float(x), 4) for x in gold]}


def variant_label(cfg) -> str:
    """The method's name plus any non-default option that changes what it is (for reports)."""
    method, extras = get_method(cfg.method), []
    if method.has_R:  # the options of the frozen-basis initialiser
        extras += ["random A,B"] if cfg.frozen_factors == "random" else []
        extras += ["Σ on A"] if cfg.singular_values_on == "A" else []
    extras += ["exact norm"] if cfg.norm == "exact" and method.magnitude else []
    extras += ["m = ‖W0‖"] if cfg.magnitude_start == "base" else []
    return cfg.method + (f" ({', '.join(extras)})" if extras else "")


def magnitude_change(model) -> dict | None:
    """How far the magnitudes moved from their start: ‖m − m0‖ / ‖m0‖ per layer, median and max."""
    rel = [
        ((layer.magnitude.detach() - layer.init_magnitude).norm() / layer.init_magnitude.norm()).item()
        for _, layer in adapter_layers(model)
        if layer.magnitude is not None and layer.init_magnitude is not None and layer.magnitude.numel() > 0
    ]
    if not rel:
        return None
    rel.sort()
    return {"median": rel[len(rel) // 2], "max": rel[-1], "layers": len(rel)}


def _save_adapters(model, out: Path, base: str, is_main: bool) -> None:
    # Under ZeRO-3 the tensors are gathered collectively: every rank saves, only rank 0 keeps it.
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    if not (is_main or zero3):
        return
    target = out if is_main else Path(tempfile.mkdtemp(prefix="svdadapt-discard-"))
    from svdadapt.io import save_adapter

    save_adapter(model, target / "adapter", compact=True, base_model=base)
    save_adapter(model, target / "adapter_full", compact=False, base_model=base)
    if not is_main:
        shutil.rmtree(target, ignore_errors=True)


def _remove_unfinished_checkpoints(out: Path) -> list[str]:
    """Remove checkpoint directories without a marker: a save that a kill cut short, never resumed from."""
    done = []
    for ckpt in sorted(out.glob("checkpoint-*")):
        if ckpt.is_dir() and not (ckpt / COMPLETE).exists():
            shutil.rmtree(ckpt, ignore_errors=True)
            done.append(f"removed {ckpt.name} (its save did not finish)")
    return done


def looks_like_run(out: Path) -> bool:
    """Whether `out` holds an svdadapt run: a recipe.yaml with an adapter section, and is no repository."""
    import yaml

    try:
        saved = yaml.safe_load((out / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and "adapter" in saved and not (out / ".git").exists()


def write_atomically(path: Path, text: str) -> None:
    """Write `path` through a temporary file and a rename: a failed write leaves no half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, callbacks=()) -> RunResult:
    """Train the recipe; see the module docstring for what the output directory receives."""
    from svdadapt.data import build_data

    checkpoint = check_output_dir(recipe, resume, overwrite)
    check_sources(recipe)
    out = Path(recipe.output_dir)
    start = time.time()
    tokenizer = load_tokenizer(recipe)
    data = build_data(recipe.data, tokenizer, seed=recipe.training.seed)
    # TrainingArguments before the model: under ZeRO-3 it makes from_pretrained load the weights partitioned
    args = training_arguments(recipe, has_eval=data.eval is not None, resuming=checkpoint is not None)
    from transformers import set_seed

    set_seed(recipe.training.seed)  # a new head (e.g. a classifier) starts from the same values every run
    model = load_model(recipe, tokenizer, num_labels=data.num_labels)
    if recipe.model.gradient_checkpointing:
        model.enable_input_require_grads()
    if recipe.model.quantization:
        from svdadapt.quant import prepare_quantized

        prepare_quantized(model, recipe.adapter, recipe.model.quantization)
    else:
        apply(model, recipe.adapter, progress=args.process_index == 0)
    if args.process_index == 0:
        print(trainable_parameters(model), flush=True)
    with args.main_process_first(local=False):
        if args.process_index == 0:
            if overwrite and out.exists():
                shutil.rmtree(out)
            for line in remove_stale_saves(out) + _remove_unfinished_checkpoints(out):
                print(f"svdadapt train: {out}: {line}", flush=True)
            with reporting_disk_full(out):
                out.mkdir(parents=True, exist_ok=True)
                write_atomically(out / "recipe.yaml", dump_recipe(recipe))
    trainer = AdapterTrainer(
        recipe=recipe,
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        compute_metrics=data.compute_metrics,
        callbacks=[StopOnNonFinite(out, recipe.training.learning_rate), *callbacks],
    )
    if checkpoint is not None and (checkpoint / CLIPPING).is_file():
        trainer.clipping = json.loads((checkpoint / CLIPPING).read_text())
    if checkpoint is not None:
        trainer.cpu_before = json.loads((checkpoint / COMPLETE).read_text()).get("train_cpu_s", 0.0)
    restart_clock_after_first_evaluation(trainer)
    trained = time.time()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_time, cpu_time = time.time() - trained, trainer.cpu_seconds()
    history = list(trainer.state.log_history)  # the final evaluation below would add to it
    final = _final_evaluation(trainer, history) if data.eval is not None else {}
    test = trainer.predict(data.test, metric_key_prefix="test") if data.test is not None else None
    model = trainer.model
    if hasattr(trainer.model_wrapped, "empty_partition_cache"):  # ZeRO-3: settle prefetched params before gathering
        trainer.model_wrapped.empty_partition_cache()
    metrics = collect_metrics(recipe, data.task, model, history, trainer.state.global_step, final, train_time, trainer.clipping)
    metrics["train_cpu_s"] = round(cpu_time, 3)  # CPU time of training (all threads, resumes included): stable under load
    if test is not None:  # scored once, after training: never used for selection
        metrics["test"] = _clean(test.metrics, "test_")
        metrics["test_predictions"] = compact_predictions(test.predictions, test.label_ids)
    _save_adapters(model, out, recipe.model.name_or_path, args.process_index == 0)
    if args.process_index == 0:
        with reporting_disk_full(out):
            write_atomically(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        before, final = metrics["before"], metrics["final"]
        shown = ", ".join(
            f"{k} {before[k]:.4f} -> {v:.4f}" if k in before else f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float)
        )
        print(
            f"svdadapt train: {recipe.adapter.method} r={recipe.adapter.r} | trainable {metrics['trainable_params']:,} of "
            f"{metrics['total_params']:,} | {metrics['train_steps']} steps in {train_time:.0f}s (total {time.time() - start:.0f}s)"
            f"{' | ' + shown if shown else ''}"
            + "".join(f" | test {k} {v:.4f}" for k, v in metrics.get("test", {}).items() if isinstance(v, float))
            + f" | {out}",
            flush=True,
        )
    return RunResult(model, trainer, metrics, out)


def cli(argv: list[str] | None = None) -> int:
    """Fine-tune a model with an adapter from a YAML recipe (HF Trainer, optionally DeepSpeed)."""
    parser = argparse.ArgumentParser(prog="svdadapt train", description=cli.__doc__, epilog=__doc__.split("\n\n")[1])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("recipe", help="a YAML recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value (YAML-parsed), e.g. training.learning_rate=1e-4",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last complete checkpoint in the output directory"
    )
    parser.add_argument("--output-dir", help="write the run here instead of the recipe's output_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace an output directory that holds another run")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # the deepspeed launcher's
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.set)
        if args.output_dir:
            recipe = dataclasses.replace(recipe, output_dir=args.output_dir)
        run(recipe, resume=args.resume, overwrite=args.overwrite)
    except ValueError as e:
        print(f"svdadapt train: {e}", file=sys.stderr)
        _close_process_group(wait=False)
        return 2
    _close_process_group(wait=True)
    return 0


def _close_process_group(wait: bool) -> None:
    """Leave the process group the launcher opened, so no rank exits while gloo's threads still run.

    Without it a rank can abort at interpreter exit ("terminate called without an active exception")
    after a run that finished and saved. `wait` holds each rank until all are done; a rank that failed
    does not wait, since the others may never arrive.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


__all__ = ["RunResult", "check_output_dir", "check_sources", "cli", "complete_checkpoints", "param_groups", "resolve_path", "run"]
