"""The row norm of the effective direction in closed form, and the products with W it needs.

    V = W + s·P A,   P = B R (out, r),   n_i = ‖V_i‖
    n_i² = ‖W_i‖² + 2s·⟨C_i, P_i⟩ + s²·⟨(P G)_i, P_i⟩,   C = W Aᵀ (out, r),   G = A Aᵀ (r, r)

(DESIGN.md §3). Everything here is in the adapter's precision (float32, or float64 for a float64
base), whatever W's dtype: a change of m by a part in 10⁴ must survive, so the norm cannot carry a
bfloat16 rounding error (2⁻⁹). W enters only through row blocks: a low-precision or quantized W is
upcast (or dequantized) a bounded block of rows at a time, never whole. Each base-layer kind supplies
its blocks (`svdadapt.kinds`); this module owns the
arithmetic, so a fix or a new base kind touches one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch

BLOCK_ELEMENTS = 1 << 20  # elements of W upcast at a time: 4 MiB of float32
_MIN_BLOCKS = 8  # and at least this many blocks, so a block is never a sizeable part of a small W


def closed_form_norm(w_sq: torch.Tensor, c: torch.Tensor, p: torch.Tensor, pg: torch.Tensor, s: float) -> torch.Tensor:
    """n (out,) from ‖W_i‖² (out,), C = W Aᵀ, P = B R and P G (each (out, r))."""
    n2 = w_sq + 2 * s * (c * p).sum(1) + s * s * (pg * p).sum(1)
    return n2.clamp_min(torch.finfo(n2.dtype).tiny).sqrt()


def row_blocks(w: torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """W (out, in) as row blocks in `dtype`: W itself when it already has that dtype, else upcast
    blocks of at most `BLOCK_ELEMENTS` elements and at most 1/8 of W's rows."""
    if w.dtype == dtype:
        yield w
        return
    out_f, in_f = w.shape
    rows = max(1, min(BLOCK_ELEMENTS // in_f, -(-out_f // _MIN_BLOCKS)))
    for blk in w.split(rows):
        yield blk.to(dtype)


Blocks = Callable[[torch.dtype], Iterable[torch.Tensor]]  # dtype -> W's row blocks (k, in) in that dtype


def weight_times_at(blocks: Blocks, a: torch.Tensor) -> torch.Tensor:
    """C = W Aᵀ (out, r) in A's dtype from W's row blocks; differentiable in A (dA = dCᵀ W, blockwise too)."""
    return _WeightTimesAt.apply(blocks, a)


class _WeightTimesAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blocks, a):
        ctx.blocks = blocks
        return torch.cat([blk @ a.T for blk in blocks(a.dtype)])

    @staticmethod
    def backward(ctx, dc):
        return None, weight_t_times(ctx.blocks(dc.dtype), dc)


def weight_t_times(blocks: Iterable[torch.Tensor], dc: torch.Tensor) -> torch.Tensor:
    """dCᵀ W (r, in) in dC's dtype from W's row blocks: the gradient of C = W Aᵀ with respect to A."""
    out, start = None, 0
    for blk in blocks:
        part = dc[start : start + blk.shape[0]].T @ blk
        out = part if out is None else out.add_(part)
        start += blk.shape[0]
    return out


def row_sq(blocks: Iterable[torch.Tensor]) -> torch.Tensor:
    """‖W_i‖² (out,) from W's row blocks."""
    return torch.cat([torch.linalg.vector_norm(blk, dim=1).square() for blk in blocks])


def split_low_precision(a: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A = hi + lo·2⁻ᵏ with hi, lo in `dtype` (bfloat16 or float16): 16+ bits of A in two low-precision factors.

    On CUDA, C = W Aᵀ for a bfloat16 W then runs as one low-precision GEMM with float32 output,
    W [hi; lo·2ᵏ]ᵀ, instead of a float32 GEMM: A keeps ~2⁻¹⁷ relative precision where A rounded to
    bfloat16 would keep 2⁻⁹. lo is scaled by 2ᵏ so that float16 does not flush it to subnormals.
    """
    k = round(-math.log2(torch.finfo(dtype).eps)) + 1  # mantissa bits + 1
    hi = a.to(dtype)
    lo = ((a - hi.to(a.dtype)) * 2.0**k).to(dtype)
    return hi, lo, 2.0**-k


def weight_times_at_cuda(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """C = W Aᵀ (out, r) in A's dtype for a bfloat16/float16 W on CUDA: one low-precision GEMM, float32 output.

    Any low-precision matrix can stand for W: the layer's step also takes d(x) Aᵀ this way (`times_at`)."""
    hi, lo, scale = split_low_precision(a, w.dtype)
    r = a.shape[0]
    c2 = torch.mm(w, torch.cat([hi, lo]).T, out_dtype=torch.float32)  # (out, 2r)
    return c2[:, :r].add_(c2[:, r:], alpha=scale).to(a.dtype)


# --- float32 output from low-precision GEMMs (CUDA) -------------------------------------------

_FLOAT_OUT: dict[tuple[torch.device, torch.dtype], bool] = {}  # (device, input dtype) -> probed


def float_out_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.mm(a, b, out_dtype=torch.float32)` runs for `dtype` inputs on `device`.

    Probed once per (device, dtype) with a 2 × 2 call; CUDA only (elsewhere False). A failure in a
    real step is not caught anywhere: it propagates, an out-of-memory included.
    """
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    key = (torch.device(device), dtype)
    if key not in _FLOAT_OUT and not torch.compiler.is_compiling():
        try:
            t = torch.ones(2, 2, dtype=dtype, device=device)
            _FLOAT_OUT[key] = torch.mm(t, t, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):  # a torch or a GPU without float32-output GEMMs
            _FLOAT_OUT[key] = False
    return _FLOAT_OUT.get(key, False)


def mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b returned in `dtype`: float32 straight from a low-precision GEMM where `float_out_gemm`, else rounded once."""
    if a.dtype == dtype:
        return a @ b
    if dtype == torch.float32 and float_out_gemm(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def times_at(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x Aᵀ (N, r) in A's dtype with A at its own precision, for x (N, in) in any float dtype.

    A low-precision x is exact in float32, so the product is x upcast times A; on CUDA the same to
    2⁻¹⁷ as one low-precision GEMM against A's hi/lo split with float32 output (`weight_times_at_cuda`).
    """
    if x.dtype == a.dtype:
        return x @ a.T
    if a.dtype == torch.float32 and float_out_gemm(x.device, x.dtype):
        return weight_times_at_cuda(x, a)
    return x.to(a.dtype) @ a.T
