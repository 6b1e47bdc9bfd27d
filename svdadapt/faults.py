"""A run that diverges stops by name: `StopOnNonFinite`, a Trainer callback that stops a run whose loss,
gradients or trained tensors stop being finite, before anything is saved from them; the error names the
step and the last good checkpoint. (A full disk is named by `svdadapt.io.reporting_disk_full`.)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback


class TrainingDiverged(ValueError):
    """Raised when training produced a non-finite loss, gradient or trained tensor."""


def _first_non_finite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor with a NaN or inf, with one device sync for all of them."""
    if not named:
        return None
    sums = torch.stack([t.detach().float().sum() for _, t in named])  # NaN and inf survive a sum
    bad = (~torch.isfinite(sums)).nonzero()
    return named[int(bad[0])][0] if len(bad) else None


class StopOnNonFinite(TrainerCallback):
    """Stops training at the first non-finite loss, gradient or trained tensor, raising `TrainingDiverged`.

    Gradients are checked before every optimizer step (not under fp16 loss scaling, which skips such steps
    itself, nor under DeepSpeed, which holds them), trained tensors after it and the logged loss at every log.
    The checks run before the step's checkpoint is saved, so every checkpoint holds finite tensors.
    """

    def __init__(self, output_dir: str | Path, learning_rate: float | None = None):
        self.output_dir, self.learning_rate = Path(output_dir), learning_rate

    def _stop(self, step: int, what: str):
        from svdadapt.trainer import complete_checkpoints

        done = complete_checkpoints(self.output_dir)
        last = f"the last good checkpoint is {done[-1]}" if done else f"no checkpoint was saved in {self.output_dir} before it"
        rate = f" (now {self.learning_rate:g})" if self.learning_rate is not None else ""
        raise TrainingDiverged(
            f"training diverged at step {step}: {what} is not finite (NaN or inf); {last}. No adapter was saved. "
            f"Lower training.learning_rate{rate}, or add warmup or gradient clipping, and train again"
        )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or args.fp16 or args.deepspeed:
            return
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        if name := _first_non_finite(grads):
            self._stop(state.global_step + 1, f"the gradient of {name!r}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        trained = [(n, getattr(p, "ds_tensor", p)) for n, p in model.named_parameters() if p.requires_grad]
        if name := _first_non_finite(trained):
            self._stop(state.global_step, f"trained tensor {name!r} after the optimizer step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                self._stop(state.global_step, f"the logged {key} ({value})")


__all__ = ["StopOnNonFinite", "TrainingDiverged"]
