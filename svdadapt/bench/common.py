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

import contextlib
import gc
import os
import platform
import statistics
import subprocess
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

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


def probe(steps: dict[str, Callable[[], object]], reference: str) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """Run every step once: (the steps that ran, {name: error} of those that raised). A configuration
    that cannot run (e.g. a dtype a library does not support) is reported, and the rest still timed;
    the reference raising stops the suite."""
    ran, failed = {}, {}
    for name, step in steps.items():
        try:
            step()
        except Exception as e:
            if name == reference:
                raise
            failed[name] = f"{type(e).__name__}: {e}"
            continue
        ran[name] = step
    return ran, failed


def peft_model(model: torch.nn.Module, config) -> torch.nn.Module:
    """`peft.get_peft_model(model, config)`, without the FutureWarning transformers >= 5 raises when peft
    reads `model.is_gradient_checkpointing` (peft's own call, renamed `is_activation_checkpointing`)."""
    import peft

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, config)


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
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_supported": native_cpu_dtype(torch.bfloat16),
        "fp16_supported": native_cpu_dtype(torch.float16),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    return {w for ln in lines if ln.startswith(("flags", "Features")) for w in ln.split(":", 1)[1].split()}


# flags that give native arithmetic in a dtype: x86 AVX512/AMX extensions, Arm half-precision and BF16
_NATIVE_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16", "bf16"}, torch.float16: {"avx512_fp16", "amx_fp16", "asimdhp"}}


def native_cpu_dtype(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies in `dtype` natively; float32/float64 always. torch's own capability
    level (`torch.backends.cpu.get_cpu_capability()`, e.g. "AVX512") does not say: an AVX512 CPU
    without AVX512-BF16 or AMX converts bf16 to float32 and back around every matmul."""
    return dtype in (torch.float32, torch.float64) or bool(_NATIVE_FLAGS.get(dtype, set()) & _cpu_flags())


@dataclass(frozen=True)
class Precision:
    """How a benchmark runs: the weights' dtype, and the autocast dtype (None: no autocast).

    `svdadapt bench --dtype` names: fp32, bf16, fp16 (the base and its adapter in that dtype) and
    autocast-bf16, autocast-fp16 (a float32 model under `torch.autocast`)."""

    name: str
    weights: torch.dtype
    autocast: torch.dtype | None = None

    @property
    def compute(self) -> torch.dtype:
        """The dtype the matmuls run in."""
        return self.autocast or self.weights

    @property
    def label(self) -> str:
        """What result rows carry: the weights' dtype, e.g. "bfloat16", or "autocast-bfloat16"."""
        short = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        return f"autocast-{short(self.autocast)}" if self.autocast else short(self.weights)

    def context(self, device: str):
        """The autocast context of a step (a no-op without autocast)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.autocast)

    def emulated(self, device: str) -> bool:
        """Whether the matmuls are emulated: a low-precision dtype on a CPU without native support."""
        return torch.device(device).type == "cpu" and not native_cpu_dtype(self.compute)


PRECISIONS = {
    p.name: p
    for p in (
        Precision("fp32", torch.float32),
        Precision("bf16", torch.bfloat16),
        Precision("fp16", torch.float16),
        Precision("autocast-bf16", torch.float32, torch.bfloat16),
        Precision("autocast-fp16", torch.float32, torch.float16),
    )
}


def emulation_note(precision: Precision) -> str:
    """The line the output carries for a precision whose matmuls this CPU emulates."""
    dtype = precision.compute
    name = str(dtype).removeprefix("torch.")
    return (
        f"{precision.name}: this CPU has no native {name} arithmetic (torch capability {torch.backends.cpu.get_cpu_capability()}, "
        f"none of the CPU flags {sorted(_NATIVE_FLAGS[dtype])}), so {name} matmuls are emulated through float32; "
        "their times say nothing about hardware with such units, and the shapes are smaller so the run finishes"
    )


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronized(step: Callable[[], object], device: str) -> Callable[[], None]:
    """`step` followed by a wait for the device's queued work, so a clock around it sees that work."""
    if torch.device(device).type != "cuda":
        return step

    def run() -> None:
        step()
        torch.cuda.synchronize(device)

    return run


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
