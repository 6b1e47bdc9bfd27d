"""Shared measurement tools: interleaved timing with per-repetition ratios, and peak live tensor bytes.

Timing: every configuration of a suite is warmed up, then timed once per repetition, each run between
two runs of the reference (the base layer, or peft LoRA); its ratio to the mean of those two is one
sample, and the median of the samples is reported. Wall clock by default; `--clock cpu` with
`--threads 1` counts only the CPU time the step used, which is what to use on a shared machine.

Memory: `PeakTensorBytes` is a `TorchDispatchMode` that sees every tensor an ATen op creates (forward,
backward and optimizer step alike), counts the bytes of each fresh storage while it is alive (a
`weakref.finalize` on the storage removes it), and keeps the peak. Views and in-place results share
an input's storage and count nothing. It measures what the computation allocates on top of what
existed before, free of allocator caching and RSS noise, so it is exact and repeatable on CPU; on the
meta device it counts what the same computation would allocate.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MiB = float(1 << 20)


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the `with` block and alive at the same time."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # storages are told apart by their C object, which meta tensors (no data pointer) have too
        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage._cdata, storage.nbytes()
            if size == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def peak_bytes(step: Callable[[], object]) -> int:
    """Peak live bytes allocated by one call of `step` (its result is dropped inside)."""
    gc.collect()
    with PeakTensorBytes() as mode:
        step()
    return mode.peak


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_ratios(
    steps: dict[str, Callable[[], object]], reference: str, reps: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, dict]:
    """Time each step `reps` times, each next to a run of the reference; medians of times and ratios.

    One repetition runs reference, a, reference, b, ..., reference (the order of a, b, ... rotates per
    repetition); a step's ratio is its time over the mean of the two reference runs around it, so a slow
    phase of a shared machine hits both sides of every ratio. `clock="cpu"` measures the process's CPU
    time instead of wall time: with one torch thread that is the work done, free of time spent waiting
    for a core another process holds.

    Returns, per name: {"ms": median milliseconds, "ratio": median of per-repetition ratios, "ratios": all}.
    """
    now = CLOCKS[clock]
    names = list(steps)
    others = [n for n in names if n != reference]
    for _ in range(warmup):
        for name in names:
            steps[name]()

    def timed(name: str) -> float:
        t0 = now()
        steps[name]()
        return now() - t0

    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        k = rep % max(len(others), 1)
        before = timed(reference)
        times[reference].append(before)
        for name in others[k:] + others[:k]:
            t = timed(name)
            after = timed(reference)
            times[name].append(t)
            times[reference].append(after)
            ratios[name].append(t / ((before + after) / 2))
            before = after
        ratios[reference].append(1.0)
    return {
        n: {"ms": 1e3 * statistics.median(times[n]), "ratio": statistics.median(ratios[n]), "ratios": ratios[n]} for n in names
    }


def machine() -> dict:
    """CPU model, core count, threads torch uses, versions: enough to read a figure later."""
    model = platform.processor() or platform.machine()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    import peft
    import transformers

    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bf16_supported": bf16_supported(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def bf16_supported() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX), so bf16 timings mean something."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table; columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            v = row.get(key)
            cells.append("" if v is None else format(v, fmt) if fmt else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])
