"""Truncated SVD with canonical signs, two solvers and an on-disk cache.

`truncated_svd(weight, r)` returns `(U, S, Vh)` with `U` (out, r), `S` (r,), `Vh` (r, in), computed in
float32 or float64 whatever the weight's dtype. Signs are canonical: the largest-magnitude entry of
every left singular vector is positive, so one weight gives bit-identical factors on every run.

The cache keys a decomposition by the weight's fingerprint (content, shape, dtype), solver and its settings;
with the full solver a request for rank r is served by any cached decomposition of rank >= r (its
first r triplets, bit-identical to a fresh rank-r one); a randomized one only at its own rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SOLVERS = ("auto", "full", "randomized")
AUTO_FULL_MAX = 1024  # "auto": the full solver where min(out, in) <= this, else the randomized one
SKETCHES = ("weight", "dtype")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class SVDSettings:
    """How a truncated SVD is computed.

    Attributes:
        solver: "full" (`torch.linalg.svd`), "randomized" (range finder with power iterations) or
            "auto" (the default): full where min(out, in) <= `AUTO_FULL_MAX` (1024), randomized above
            (`solver_for`). On this 2-core CPU a rank-16 full SVD takes 0.28 s at 1024x1024, 0.52 s at
            4096x1024 and 1.5 s at 2048x2048, 7-30x the randomized one's time, whose top singular values
            are then 1.3-2e-3 (relative) from the full one's on flat (random) spectra.
        dtype: "float32" or "float64", the precision of the computation whatever the weight's dtype.
        oversample: extra random directions for the randomized solver (more: more accurate).
        niter: power iterations for the randomized solver (more: more accurate on flat spectra).
        cache_dir: where decompositions are cached; None for the default user cache, "" to disable.
        sketch: precision of the randomized solver's power iterations: "weight" runs them in the
            weight's own dtype when that is bfloat16 (float32 accumulation; 2-4x faster on CPUs with
            bf16 units and on GPUs), "dtype" in `dtype`. Orthonormalisation and the final projection
            are always in `dtype`.

    The randomized defaults (oversample 48, 3 iterations) keep the top-16 reconstruction within 0.3%
    of the full SVD's on power-law spectra down to σ_i = i^-0.5 (`svdadapt bench --suite init`).
    Skinny products are memory-bound, so 64 sketch columns cost about what 32 do.
    """

    solver: str = "auto"
    dtype: str = "float32"
    oversample: int = 48
    niter: int = 3
    cache_dir: str | None = None
    sketch: str = "weight"

    def key(self) -> str:
        """The cache's name for these settings (of a resolved solver: "auto" is resolved per weight first)."""
        if self.solver == "full":
            return f"full-{self.dtype}"
        return f"randomized-{self.dtype}-p{self.oversample}-q{self.niter}-{self.sketch}"


def solver_for(solver: str, shape) -> str:
    """The solver `truncated_svd` runs for a weight of `shape` (out, in): "auto" resolved, the others as given."""
    if solver != "auto":
        return solver
    return "full" if min(shape) <= AUTO_FULL_MAX else "randomized"


def default_cache_dir() -> Path:
    """`$SVDADAPT_CACHE`, else `$XDG_CACHE_HOME/svdadapt/svd`, else `~/.cache/svdadapt/svd`."""
    if env := os.environ.get("SVDADAPT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "svdadapt" / "svd"


FINGERPRINT_VERSION = "v2"
_PIECE_BYTES = 1 << 26  # at most this much of a weight is copied at a time (a non-contiguous or non-CPU one)


def fingerprint(weight: torch.Tensor, piece_bytes: int = _PIECE_BYTES) -> str:
    """Identifies a base weight: "v2-" + the 128-bit xxh3 of its shape, dtype and raw bytes (row-major).

    Every bit counts (no float rounding), so a one-ulp change, two swapped rows or a transpose all
    give another fingerprint. A contiguous CPU weight is hashed in place (5-10 GB/s on one core); any
    other is read a block of rows at a time, so a GPU weight is never copied to the CPU whole and the
    value does not depend on the device or the layout.
    """
    import xxhash

    h = xxhash.xxh3_128(f"{tuple(weight.shape)}|{weight.dtype}|".encode())
    for piece in _row_pieces(weight.detach(), piece_bytes):
        h.update(piece.view(torch.uint8).numpy())  # a view of the CPU tensor's memory, not a copy
    return f"{FINGERPRINT_VERSION}-{h.hexdigest()}"


def _row_pieces(t: torch.Tensor, piece_bytes: int):
    """t's elements in row-major order as contiguous CPU tensors of about `piece_bytes` (whole rows)."""
    if t.device.type == "cpu" and t.is_contiguous():
        yield t.reshape(-1)
        return
    if t.numel() == 0:
        return
    rows = t.reshape(1, -1) if t.dim() < 2 else t.flatten(1) if t.dim() > 2 else t  # (rows, row length)
    step = max(1, piece_bytes // max(rows[0].numel() * t.element_size(), 1))
    for i in range(0, rows.shape[0], step):
        yield rows[i : i + step].contiguous().cpu().reshape(-1)  # a block copy on the weight's own device first


def legacy_fingerprint(weight: torch.Tensor) -> str:
    """The version-1 fingerprint (sha256 of shape, dtype and bytes, no prefix): checks old adapter files only."""
    t = weight.detach().contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def fingerprint_matches(weight: torch.Tensor, saved: str, current: str | None = None) -> bool:
    """Whether `weight` is the one a saved fingerprint (either version) identifies.

    Args:
        weight: the base weight to check.
        saved: the fingerprint from a file: "v2-..." or a version-1 sha256 (64 hex digits).
        current: `fingerprint(weight)` if already known (saves hashing twice).
    """
    if saved.startswith(f"{FINGERPRINT_VERSION}-"):
        return saved == (current or fingerprint(weight))
    if re.fullmatch(r"[0-9a-f]{64}", saved):
        return saved == legacy_fingerprint(weight)
    raise ValueError(
        f"fingerprint {saved[:24]!r}... is of an unknown version (this svdadapt writes {FINGERPRINT_VERSION!r}); "
        "upgrade svdadapt to check it, or load with check_fingerprint=False"
    )


def canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so that the largest-magnitude entry of u[:, i] is positive."""
    idx = u.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(u.gather(0, idx[None]).squeeze(0))
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def _randomized(w: torch.Tensor, k: int, s: SVDSettings, dtype: torch.dtype):
    """Halko-Martinsson-Tropp range finder with QR-stabilised power iterations, fixed seed.

    w stays in its own dtype. The power iterations multiply in the sketch precision (see
    `SVDSettings.sketch`); every basis is orthonormalised in `dtype`, and the small matrix whose SVD
    is taken, Qᵀ W, is formed in `dtype` a block of rows of W at a time.
    """
    out_f, in_f = w.shape
    p = min(k + s.oversample, min(out_f, in_f))
    low = s.sketch == "weight" and w.dtype == torch.bfloat16
    sk = w if low else w.to(dtype)

    def times(m: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        return _orth((m @ basis.to(sk.dtype)).to(dtype))

    gen = torch.Generator().manual_seed(0)
    omega = torch.randn(in_f, p, generator=gen, dtype=dtype).to(w.device)
    q = times(sk, omega)  # (out, p)
    for _ in range(s.niter):
        q = times(sk, times(sk.T, q))
    rows = max(1, (1 << 22) // in_f)
    b = sum(q[i : i + rows].T @ sk[i : i + rows].to(dtype) for i in range(0, out_f, rows))  # Qᵀ W (p, in)
    with _one_thread():
        ub, sv, vh = torch.linalg.svd(b, full_matrices=False)  # (p, p), (p,), (p, in)
    return (q @ ub)[:, :k], sv[:k], vh[:k]


@contextlib.contextmanager
def _one_thread():
    """Run small LAPACK factorisations on one thread: a (N, p) QR is microseconds of work, but on
    busy cores every one of its many thread barriers waits for a descheduled peer (measured here: a
    14336 x 32 QR took 1.2 s on two threads under load, 15 ms on one).

    The thread count is restored on exit. torch's OpenMP thread count is per calling thread, so other
    Python threads never see the change (tests/test_svd.py checks it); on a torch built without OpenMP
    the count is process-wide, and this is then a no-op."""
    threads = torch.get_num_threads()
    if threads == 1 or "OpenMP" not in torch.__config__.parallel_info():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _orth(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of y's columns (the Q of its QR)."""
    with _one_thread():
        return torch.linalg.qr(y).Q


def _compute(w: torch.Tensor, k: int, s: SVDSettings, dtype: torch.dtype):
    if s.solver == "full":
        u, sv, vh = torch.linalg.svd(w.to(dtype), full_matrices=False)
        u, sv, vh = u[:, :k], sv[:k], vh[:k]
    else:
        u, sv, vh = _randomized(w, k, s, dtype)
    u, vh = canonical_signs(u, vh)
    return u.contiguous(), sv.contiguous(), vh.contiguous()


def truncated_svd(
    weight: torch.Tensor,
    r: int,
    settings: SVDSettings = SVDSettings(),
    weight_hash: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of `weight` (out, in): U (out, r), S (r,), Vh (r, in).

    Args:
        weight: the matrix, any floating dtype; it is not modified.
        r: how many triplets, 1 <= r <= min(weight.shape).
        settings: solver, precision and cache.
        weight_hash: `fingerprint(weight)` if already known (saves hashing twice).
    """
    if settings.solver not in SOLVERS:
        raise ValueError(f"svd solver {settings.solver!r} is not one of {SOLVERS}")
    if settings.sketch not in SKETCHES:
        raise ValueError(f"svd sketch {settings.sketch!r} is not one of {SKETCHES}")
    if not 1 <= r <= min(weight.shape):
        raise ValueError(f"svd rank r={r} must be in [1, {min(weight.shape)}] for a weight of shape {tuple(weight.shape)}")
    settings = dataclasses.replace(settings, solver=solver_for(settings.solver, weight.shape))
    dtype = _DTYPES[settings.dtype]
    cache = None if settings.cache_dir == "" else Path(settings.cache_dir or default_cache_dir())
    if cache is not None:
        key = weight_hash or fingerprint(weight)
        folder = cache / key.rsplit("-", 1)[-1][:2] / f"{key}-{settings.key()}"
        hit = _lookup(folder, r, exact=settings.solver != "full")
        if hit is not None:
            return tuple(t.to(weight.device) for t in hit)
    u, sv, vh = _compute(weight.detach(), r, settings, dtype)
    if cache is not None:
        _store(folder, r, u, sv, vh)
    return u, sv, vh


def _lookup(folder: Path, r: int, exact: bool):
    """Rank r from the cache. A full SVD's first r triplets are the rank-r SVD bit for bit; a
    randomized one's are not (the sketch depends on the rank), so it is served at its own rank only."""
    if not folder.is_dir():
        return None
    ranks = sorted(int(p.stem[1:]) for p in folder.glob("r*.safetensors") if p.stem[1:].isdigit())
    for k in ranks:
        if k == r or (k > r and not exact):
            try:
                t = load_file(str(folder / f"r{k}.safetensors"))
            except Exception:  # a damaged cache entry is recomputed, never trusted
                continue
            return t["U"][:, :r].contiguous(), t["S"][:r].contiguous(), t["Vh"][:r].contiguous()
    return None


def _store(folder: Path, r: int, u, sv, vh) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        save_file({"U": u.cpu().contiguous(), "S": sv.cpu().contiguous(), "Vh": vh.cpu().contiguous()}, tmp)
        os.replace(tmp, folder / f"r{r}.safetensors")
    except OSError:  # a read-only or full cache never stops training
        pass
