"""A run that diverges stops by name: `StopOnNonFinite`, a Trainer callback that stops a run whose loss,
gradients or trained tensors stop being finite, or whose trained tensors blow up past `MAX_ABS`, before
anything is saved from them; the error names the step and the last good checkpoint. (A full disk is named
by `svdadapt.io.reporting_disk_full`.)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback

# A trained value this large means a blown-up run, though float32 still holds it: the quickstart's largest
# saved value is 23 after a normal run, and at learning_rate 1e9 its trained tensors reach 8e9 while its loss
# stays finite (the magnitude/direction split saturates rather than overflows), so finiteness alone passes it.
MAX_ABS = 1e6


class TrainingDiverged(ValueError):
    """Raised when training produced a non-finite loss or gradient, or a non-finite or blown-up trained tensor."""


def _first_beyond(named: list[tuple[str, torch.Tensor]], limit: float = math.inf) -> tuple[str, float] | None:
    """The first tensor with a NaN, an inf or a value beyond ±limit, and its largest |value| (one sync for all)."""
    named = [(n, t) for n, t in named if t.numel()]
    if not named:
        return None
    peaks = torch.stack([t.detach().abs().amax().float() for _, t in named])  # amax keeps NaN
    bad = (~(torch.isfinite(peaks) & (peaks <= limit))).nonzero()
    return (named[int(bad[0])][0], float(peaks[int(bad[0])])) if len(bad) else None


class StopOnNonFinite(TrainerCallback):
    """Stops training at the first non-finite loss or gradient, or trained tensor non-finite or beyond
    ±`MAX_ABS`, raising `TrainingDiverged`.

    Gradients are checked before every optimizer step (not under fp16 loss scaling, which skips such steps
    itself, nor under DeepSpeed, which holds them), trained tensors after it and the logged loss at every log.
    The checks run before the step's checkpoint is saved, so every checkpoint holds finite tensors.
    """

    def __init__(self, output_dir: str | Path, learning_rate: float | None = None):
        self.output_dir, self.learning_rate = Path(output_dir), learning_rate

    def _stop(self, step: int, what: str, why: str = "is not finite (NaN or inf)"):
        from svdadapt.trainer import complete_checkpoints

        done = complete_checkpoints(self.output_dir)
        last = f"the last good checkpoint is {done[-1]}" if done else f"no checkpoint was saved in {self.output_dir} before it"
        rate = f" (now {self.learning_rate:g})" if self.learning_rate is not None else ""
        raise TrainingDiverged(
            f"training diverged at step {step}: {what} {why}; {last}. No adapter was saved. "
            f"Lower training.learning_rate{rate}, or add warmup or gradient clipping, and train again"
        )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or args.fp16 or args.deepspeed:
            return
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        if found := _first_beyond(grads):
            self._stop(state.global_step + 1, f"the gradient of {found[0]!r}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        trained = [(n, getattr(p, "ds_tensor", p)) for n, p in model.named_parameters() if p.requires_grad]
        if found := _first_beyond(trained, MAX_ABS):
            name, peak = found
            why = "is not finite (NaN or inf)" if not math.isfinite(peak) else f"reached |value| {peak:.3g}, beyond {MAX_ABS:g}"
            self._stop(state.global_step, f"trained tensor {name!r} after the optimizer step", why)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                self._stop(state.global_step, f"the logged {key} ({value})")


__all__ = ["StopOnNonFinite", "TrainingDiverged"]
