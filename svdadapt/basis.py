"""Check that a compact adapter's rebuilt frozen factors are the ones it was trained with.

A compact adapter rebuilds its frozen start factors (A and B for loraxs/edora; A0 and B0, which set the
residual, for pissa/dude) by SVD on load. Where singular values tie, another machine's SVD (another
thread count, cuSOLVER, another cache entry) may return another, equally exact basis of the tied
subspace, and the trained R or B then multiplies the wrong one. So a compact file stores, per layer,
a sketch of the factors it was trained with,

    X = [A Ω_in | Bᵀ Ω_out]   (r, 2k),  k = r + 8,

with Ω fixed ±1 matrices (a counter-based hash of the entry's index: the same on every machine and
torch version). On load, the sketch X' of the rebuilt factors is compared with X through an orthogonal
Procrustes fit X ≈ T X' (T is r×r):

- the rebuilt factors span the same subspaces (a tie rotated, signs flipped): the fit is exact, and
  A ← T A', B ← B' Tᵀ gives back the saved factors (B A, hence a residual, is unchanged);
- they do not (a near-tie at σ_r: the r-th direction changed): the fit leaves an error, which
  `svdadapt.load_adapter` and `AdapterBank` report (warn above `REALIGNED`) or refuse (above `REFUSED`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from svdadapt.methods import Method
from svdadapt.svd import SVDSettings, truncated_svd

EXTRA_COLUMNS = 8  # k = r + 8 sketch columns per factor
SAME = 1e-6  # X' = X to this (relative): the same factors, used as they are
REALIGNED = 1e-5  # the fit's error up to this: the same subspaces, realigned to float32 rounding
REFUSED = 1e-3  # the fit's error above this: another subspace, the model would differ; refused
_STREAMS = {"A": 1, "B": 2}


def rebuilt(method: Method) -> tuple[str, ...]:
    """Which of "A", "B" a compact load of `method` rebuilds from the base weight (A0, B0 for a residual method)."""
    if method.residual:
        return ("A", "B")
    return tuple(f for f in ("A", "B") if f not in method.trainable)


def _omega(n: int, k: int, stream: int) -> torch.Tensor:
    """A fixed (n, k) ±1 matrix: the sign bit of splitmix64 of each entry's index, seeded by `stream`."""
    z = np.arange(n * k, dtype=np.uint64) + np.uint64(stream * 0x9E3779B97F4A7C15 % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return torch.from_numpy(1.0 - 2.0 * (z >> np.uint64(63)).astype(np.float64)).view(n, k)


def _blocks(factors: dict[str, torch.Tensor], which: tuple[str, ...], k: int) -> list[torch.Tensor]:
    """The sketch's blocks in float64: A Ω_in (r, k) and Bᵀ Ω_out (r, k), as `which` has them."""
    out = []
    for f in which:
        m = factors[f].detach().to(torch.float64)
        m = m if f == "A" else m.T  # (r, n)
        out.append(m @ _omega(m.shape[1], k, _STREAMS[f]).to(m.device))
    return out


def sketch(factors: dict[str, torch.Tensor], which: tuple[str, ...]) -> torch.Tensor:
    """The stored check of one layer's factors "A" (r, in) and "B" (out, r): (r, len(which)·k), float32, on the CPU."""
    r = factors[which[0]].shape[0 if which[0] == "A" else 1]
    return torch.cat(_blocks(factors, which, r + EXTRA_COLUMNS), 1).to("cpu", torch.float32)


@dataclass(frozen=True)
class Fit:
    """How rebuilt factors relate to the saved ones: saved ≈ `rotation` @ rebuilt, with relative `error`
    (the worst block's) after the fit and `unrotated` before it."""

    rotation: torch.Tensor  # (r, r) float64, orthogonal
    error: float
    unrotated: float


def fit(saved: torch.Tensor, factors: dict[str, torch.Tensor], which: tuple[str, ...]) -> Fit:
    """Fit the sketch of rebuilt `factors` to a `saved` one (from `sketch`) by an orthogonal T."""
    k = saved.shape[1] // len(which)
    mine = [b.cpu() for b in _blocks(factors, which, k)]
    theirs = list(saved.to(torch.float64).split(k, 1))
    scale = [1.0 / max(float(t.norm()), 1e-300) for t in theirs]  # each block counts equally
    x = torch.cat([t * s for t, s in zip(theirs, scale)], 1)
    y = torch.cat([m * s for m, s in zip(mine, scale)], 1)
    u, _, vh = torch.linalg.svd(x @ y.T)
    t = u @ vh

    def worst(rot: torch.Tensor | None) -> float:
        return max(float((th - (m if rot is None else rot @ m)).norm()) * s for th, m, s in zip(theirs, mine, scale))

    return Fit(t, worst(t), worst(None))


def realigned(factors: dict[str, torch.Tensor], rotation: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ← T A, B ← B Tᵀ (the others as they are): the saved factors, where the fit is exact."""
    out = dict(factors)
    for f in ("A", "B"):
        if f in out and out[f] is not None:
            t = rotation.to(out[f].device, torch.float64)
            m = out[f].to(torch.float64)
            out[f] = (t @ m if f == "A" else m @ t.T).to(factors[f].dtype)
    return out


def gap(weight: torch.Tensor, r: int) -> str:
    """σ_r and σ_{r+1} of `weight` and their relative gap, in words (for an error message)."""
    s = truncated_svd(weight.detach(), r + 1, SVDSettings("randomized", "float64", cache_dir="", sketch="dtype"))[1]
    a, b = float(s[r - 1]), float(s[r])
    return f"σ_{r} = {a:.6g} and σ_{r + 1} = {b:.6g}, a relative gap of {(a - b) / a:.1e}"


def warn_unchecked_and_drift(where: str, unchecked: int, drift: list[tuple[float, str]], rebuilt_by: str) -> None:
    """One warning for layers that could not be checked (a file saved before the check) and one for layers
    realigned with an error above `REALIGNED` ((error, layer) pairs); `rebuilt_by` names whose basis it is."""
    if unchecked:
        warnings.warn(
            f"{where}: a compact adapter saved before svdadapt checked rebuilt factors: whether {rebuilt_by} is the one "
            f"it was trained with (the same where singular values tie) cannot be checked for {unchecked} layers. "
            "Save it again (compact or full) to add the check",
            stacklevel=4,
        )
    if drift:
        err, name = max(drift)
        warnings.warn(
            f"{where}: {rebuilt_by} differs from the saved one by up to {err:.1e} (relative; layer {name!r}, {len(drift)} "
            "layers in all): singular values near-tie at σ_r. The model differs from the saved one by about that much; "
            "a full save reloads exactly",
            stacklevel=4,
        )
