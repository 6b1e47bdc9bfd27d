"""The HF Trainer as `svdadapt train` runs it: one optimizer route for every learning rate, and
checkpoints that hold what a resume needs and nothing frozen.

- `training_arguments`: `TrainingArguments` from a recipe's training section.
- `param_groups`: AdamW groups found structurally (adapter factors, magnitudes, modules_to_save), each
  with its own rate; `AdapterTrainer.create_optimizer` builds the optimizer from them alone.
- `AdapterTrainer`: those groups, complete-only checkpoints (a marker written last, rotation after it),
  DeepSpeed engine checkpoints without frozen weights, gradient-clipping counts, evaluation in order.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import safetensors.torch
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from svdadapt.io import reporting_disk_full
from svdadapt.model import adapter_config, adapter_layers, find_modules_to_save
from svdadapt.recipe import Recipe

COMPLETE = "svdadapt_checkpoint.json"  # written into a checkpoint once every file of it is saved
CLIPPING = "svdadapt_clipping.json"  # in a checkpoint: the gradient-clipping counts so far


def checkpoint_state(ckpt: Path) -> str | None:
    """None if checkpoint directory `ckpt` is complete, else what it lacks: no marker, or files its marker lists."""
    try:
        marker = json.loads((ckpt / COMPLETE).read_text())
    except FileNotFoundError:
        return f"no {COMPLETE} (its save did not finish)"
    except (OSError, ValueError):
        return f"an unreadable {COMPLETE}"
    files = marker.get("files") if isinstance(marker, dict) else None
    if files is None:  # a marker written before markers listed their files
        return None
    gone = sorted(f for f, size in files.items() if not (ckpt / f).is_file() or (ckpt / f).stat().st_size != size)
    return f"{len(gone)} of the {len(files)} files its marker lists missing or of another size ({gone[:3]})" if gone else None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints whose save finished (the marker is there and so is every file it lists), oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and checkpoint_state(p) is None]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def write_marker(ckpt: Path, info: dict) -> None:
    """Mark `ckpt` complete, listing every file in it (relative path -> size); written last, atomically."""
    files = {str(f.relative_to(ckpt)): f.stat().st_size for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name != COMPLETE}
    tmp = ckpt / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({**info, "files": files}) + "\n")
    tmp.replace(ckpt / COMPLETE)


def remove_checkpoint(ckpt: Path) -> None:
    """Delete a checkpoint, its marker first: a deletion cut short never leaves a complete-looking checkpoint."""
    (ckpt / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)


def training_arguments(recipe: Recipe, has_eval: bool, resuming: bool):
    """`transformers.TrainingArguments` from the recipe's training section."""
    t = recipe.training
    accumulation = t.gradient_accumulation_steps
    if t.global_batch_size:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_step = t.per_device_train_batch_size * world
        if t.global_batch_size % per_step:
            raise ValueError(
                f"training.global_batch_size={t.global_batch_size} is not a multiple of per_device_train_batch_size "
                f"({t.per_device_train_batch_size}) x world size ({world}); change one of them"
            )
        accumulation = t.global_batch_size // per_step
    return TrainingArguments(
        output_dir=recipe.output_dir,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=accumulation,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a non-finite loss is logged as it is (and stops the run, svdadapt.faults)
        eval_strategy=t.eval_strategy if has_eval else "no",
        eval_steps=t.eval_steps,
        eval_on_start=has_eval and t.eval_before and not resuming,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        bf16=t.bf16,
        fp16=t.fp16,
        deepspeed=t.deepspeed,
        dataloader_num_workers=t.dataloader_num_workers,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        activation_checkpointing=recipe.model.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        label_names=["labels"],
        report_to="none",
        ddp_find_unused_parameters=False,
    )


def param_groups(model: torch.nn.Module, training) -> list[dict]:
    """AdamW groups found structurally: adapter factors, magnitudes, and modules_to_save, each with its lr.

    Weight decay applies to matrices only (never to biases, norms or magnitudes).
    """
    layers = [layer for _, layer in adapter_layers(model)]
    magnitudes = {id(layer.magnitude) for layer in layers if layer.magnitude is not None}
    factors = {id(p) for layer in layers for p in layer.factors().values()}
    saved = {id(p) for _, mod in find_modules_to_save(model, adapter_config(model).modules_to_save) for p in mod.parameters()}
    lrs = {
        "adapter": training.learning_rate,
        "magnitude": training.magnitude_learning_rate or training.learning_rate,
        "modules_to_save": training.classifier_learning_rate or training.learning_rate,
    }
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = (
            "magnitude"
            if id(p) in magnitudes
            else "adapter"
            if id(p) in factors
            else "modules_to_save"
            if id(p) in saved
            else None
        )
        if kind is None:
            raise ValueError(f"parameter {name!r} trains but is neither an adapter factor nor in adapter.modules_to_save")
        matrix = len(getattr(p, "ds_shape", p.shape)) >= 2 and kind != "magnitude"
        groups.setdefault((kind, matrix), []).append(p)
    return [
        {
            "params": ps,
            "lr": lrs[kind],
            "weight_decay": training.weight_decay if matrix else 0.0,
            "name": kind if matrix or kind == "magnitude" else f"{kind}_no_decay",
        }
        for (kind, matrix), ps in groups.items()
    ]


def load_trained(src: dict, dst: torch.nn.Module) -> None:
    """Load a checkpoint's module state that holds the trained tensors only (DeepSpeed's custom_load_fn)."""
    result = dst.load_state_dict(src, strict=False)
    trained = {n for n, p in dst.named_parameters() if p.requires_grad}
    missing = sorted(trained & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the checkpoint does not match the model: trained tensors missing {missing[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}; resume with the recipe that wrote it"
        )


FSDP_REFUSAL = (
    "svdadapt train does not run under FSDP: the Trainer's FSDP path (its wrapping, sharded checkpoints and their "
    "resume) does not run on a CPU (transformers refuses it there, or with use_cpu runs DDP instead), so it has no "
    "test in this project. The library itself works "
    "under FSDP2 (apply, then fully_shard each block; save_adapter on every rank), tested on 2 CPU ranks: see "
    "docs/training.md. Or use DeepSpeed ZeRO-3 (training.deepspeed: recipes/ds_zero3.json), tested, or one process"
)


def refuse_fsdp(trainer: Trainer) -> None:
    """Stop before training when the Trainer (or accelerate's config) would run FSDP; see FSDP_REFUSAL."""
    fsdp = getattr(trainer, "is_fsdp_enabled", False) or bool(trainer.args.fsdp)
    if fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise ValueError(FSDP_REFUSAL)


class AdapterTrainer(Trainer):
    """The HF Trainer with structural param groups and checkpoints holding only what trains."""

    def __init__(self, *args, recipe: Recipe, **kwargs):
        super().__init__(*args, **kwargs)
        refuse_fsdp(self)
        self.recipe = recipe
        self.clipping = {"steps": 0, "clipped": 0}  # optimiser steps whose gradient norm was clipped
        self.cpu_before = 0.0  # CPU seconds of training before this process (a resumed run's earlier part)
        self._cpu_start: float | None = None

    def train(self, *args, **kwargs):
        self._cpu_start = time.process_time()
        return super().train(*args, **kwargs)

    def cpu_seconds(self) -> float:
        """CPU seconds this run has trained, over every process that worked on it (resumes included)."""
        return self.cpu_before + (time.process_time() - self._cpu_start if self._cpu_start is not None else 0.0)

    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)  # the norm before clipping (None when DeepSpeed clips and keeps it)
        if norm is not None:
            self.clipping["steps"] += 1
            self.clipping["clipped"] += int(float(norm) > self.args.max_grad_norm)
        return norm

    def _get_eval_sampler(self, eval_dataset):
        # Evaluation keeps the dataset's order (per-example predictions line up across runs).
        if self.args.world_size <= 1 and eval_dataset is not None:
            return torch.utils.data.SequentialSampler(eval_dataset)
        return super()._get_eval_sampler(eval_dataset)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            kwargs.pop("lr", None)
            self.optimizer = cls(param_groups(self.model, self.recipe.training), **kwargs)
        return self.optimizer

    def save_model(self, output_dir=None, _internal_call=False):
        # The trained tensors only: the frozen base is rebuilt from the recipe.
        if self.is_deepspeed_enabled and _internal_call:  # a checkpoint: the engine's files, written next, hold them
            return None
        state = None
        if self.is_deepspeed_enabled and self.model_wrapped.zero_optimization_partition_weights():
            # under ZeRO-3 gather the trained tensors only, never the partitioned frozen base
            state = self.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            names = {n for n, p in self.model.named_parameters() if p.requires_grad}
            source = state if state is not None else self.model.state_dict()
            tensors = {k: v.detach().cpu().contiguous() for k, v in source.items() if k in names}
            safetensors.torch.save_file(tensors, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        return None

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # the engine's checkpoint without the frozen weights (the Trainer excludes them for peft models only)
        from accelerate.utils import DeepSpeedSchedulerWrapper

        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))
        return None

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if not (self.is_deepspeed_enabled and resume_from_checkpoint):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        # The Trainer loads a DeepSpeed checkpoint strictly unless the model is a peft one; ours holds the
        # trained tensors only, so load it here, checking that exactly the frozen ones are missing.
        model, loader = super()._prepare_for_training(max_steps, train_dataloader, None)
        path, _ = self.model_wrapped.load_checkpoint(
            resume_from_checkpoint, load_optimizer_states=True, load_lr_scheduler_states=True, custom_load_fn=load_trained
        )
        if path is None:
            raise ValueError(f"checkpoint {resume_from_checkpoint!r} holds no DeepSpeed engine state to resume from")
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, loader

    def _save_checkpoint(self, model, trial):
        # Complete-only checkpoints: a directory left by a save that was cut short is replaced, the marker is
        # written once every rank's files are on disk, and older checkpoints are deleted only after that.
        run_dir = Path(self._get_output_dir(trial=trial))
        ckpt = run_dir / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and ckpt.is_dir() and not (ckpt / COMPLETE).is_file():
            shutil.rmtree(ckpt)
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            with reporting_disk_full(ckpt):
                try:
                    super()._save_checkpoint(model, trial)
                finally:
                    self.args.save_total_limit = limit
                self.accelerator.wait_for_everyone()
                if self.args.should_save:
                    (ckpt / CLIPPING).write_text(json.dumps(self.clipping) + "\n")  # before the marker: part of the checkpoint
                    write_marker(ckpt, {"step": self.state.global_step, "train_cpu_s": self.cpu_seconds()})
        except ValueError:
            if self.args.should_save:  # the disk is full: the half-written checkpoint is removed, never resumed from
                shutil.rmtree(ckpt, ignore_errors=True)
            raise
        if self.args.should_save:
            for old in complete_checkpoints(run_dir)[: -limit if limit else 0]:
                remove_checkpoint(old)


class _Progress(ProgressCallback):
    """The progress bar, its clock restarted after the evaluation before training."""

    def on_evaluate(self, args, state, control, **kwargs):
        super().on_evaluate(args, state, control, **kwargs)
        if state.global_step == 0 and self.training_bar is not None:
            self.training_bar.reset(total=state.max_steps)


def restart_clock_after_first_evaluation(trainer) -> None:
    """Restart the training progress bar's clock after the evaluation before training, so its first
    ETA is the training's own and not inflated by that evaluation."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_Progress())
