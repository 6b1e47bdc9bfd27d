"""Base-layer kinds: how the adapter layer reads, runs and rewrites each type of frozen layer.

A kind is a class of static methods: `matches(module)`, `weight(module)` (out, in), `forward(module, x,
bias)`, `set_weight(module, w)`, `row_blocks(module, dtype)` (W in bounded row blocks, see `norm`) and
`merged(module, w)`. `BASE_KINDS` lists them, first match wins; `register_base_kind` adds one.

The bitsandbytes kinds live here too, beside the plain ones: they touch bitsandbytes only through the
module they are given (`matches` looks bitsandbytes up in `sys.modules`, never imports it), so every
kind is known from the start and the core imports nothing above it. Quantizing a model, and loading
onto a quantized one, are in `svdadapt.quant`.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from svdadapt import norm

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- plain layers ----------------------------------------------------------------------------


class LinearKind:
    """`torch.nn.Linear`: weight (out, in)."""

    dtypes = FLOAT_DTYPES

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @staticmethod
    def weight(module) -> torch.Tensor:  # (out, in), a view
        return module.weight

    @staticmethod
    def forward(module, x: torch.Tensor, bias: bool) -> torch.Tensor:
        return F.linear(x, module.weight, module.bias if bias else None)

    @staticmethod
    def set_weight(module, w: torch.Tensor) -> None:
        module.weight.data.copy_(w)

    @staticmethod
    def row_blocks(module, dtype: torch.dtype):
        return norm.row_blocks(module.weight, dtype)

    @staticmethod
    def merged(module, w: torch.Tensor) -> nn.Module:
        out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        out.weight = nn.Parameter(w.to(module.weight.dtype), requires_grad=False)
        if module.bias is not None:
            out.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return out


class Conv1DKind:
    """transformers' GPT-2 `Conv1D`: weight stored transposed, (in, out)."""

    dtypes = FLOAT_DTYPES

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2

    @staticmethod
    def weight(module) -> torch.Tensor:
        return module.weight.T

    @staticmethod
    def forward(module, x: torch.Tensor, bias: bool) -> torch.Tensor:
        return F.linear(x, module.weight.T, module.bias if bias else None)

    @staticmethod
    def set_weight(module, w: torch.Tensor) -> None:
        module.weight.data.copy_(w.T)

    @staticmethod
    def row_blocks(module, dtype: torch.dtype):
        return norm.row_blocks(module.weight.T, dtype)

    @staticmethod
    def merged(module, w: torch.Tensor) -> nn.Module:
        new = type(module)(w.shape[0], w.shape[1])
        new.weight = nn.Parameter(w.T.contiguous().to(module.weight.dtype), requires_grad=False)
        new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return new


def bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("quantized bases need bitsandbytes: pip install 'svdadapt[quant]'") from e
    return bnb


def _is(module: nn.Module, cls_name: str) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # no bitsandbytes imported: no module can be one of its layers
    return bnb is not None and isinstance(module, getattr(bnb.nn, cls_name))


# --- bitsandbytes NF4 / FP4 -----------------------------------------------------------------------------


def _state4(module: nn.Module):
    """The 4-bit weight's (data, quant_state) in the canonical layout (undo bitsandbytes' CPU packing)."""
    p = module.weight
    qs = p.quant_state if p.quant_state is not None else getattr(module, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        p.data, qs = _convert_weight_packed_for_cpu_inverse(p.data, qs)
        p.quant_state = module.quant_state = qs
    return p.data, qs


def _dequant4(data: torch.Tensor, qs, dtype: torch.dtype) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(data, qs).to(dtype)


def _absmax4(qs) -> torch.Tensor:
    if not qs.nested:
        return qs.absmax
    from bitsandbytes.functional import dequantize_blockwise

    return (dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()


class Linear4bitKind:
    """`bitsandbytes.nn.Linear4bit`: NF4/FP4 weight, dequantized to (out, in) in its original dtype."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return _is(module, "Linear4bit")

    @staticmethod
    def weight(module) -> torch.Tensor:
        if not module.weight.bnb_quantized:
            return module.weight.data
        data, qs = _state4(module)
        return _dequant4(data, qs, qs.dtype)

    @staticmethod
    def forward(module, x: torch.Tensor, bias: bool) -> torch.Tensor:
        data, qs = _state4(module)
        cd = module.compute_dtype or x.dtype
        b = module.bias.to(cd) if bias and module.bias is not None else None
        return bitsandbytes().matmul_4bit(x.to(cd), module.weight.t(), quant_state=qs, bias=b).to(x.dtype)

    @staticmethod
    def set_weight(module, w: torch.Tensor) -> None:
        p = module.weight
        dtype = p.quant_state.dtype if p.bnb_quantized else p.dtype
        new = bitsandbytes().nn.Params4bit(
            w.detach().to(dtype).contiguous(),
            requires_grad=False,
            blocksize=p.blocksize,
            compress_statistics=p.compress_statistics,
            quant_type=p.quant_type,
            quant_storage=p.quant_storage,
            module=module,
        )
        module.weight = new._quantize(w.device)

    @staticmethod
    def merged(module, w: torch.Tensor) -> nn.Module:
        return _plain_linear(module, w, module.weight.quant_state.dtype)

    @staticmethod
    def row_blocks(module, dtype: torch.dtype):
        """Dequantized row blocks of W, each (k, in) in `dtype`, never the whole W at once."""
        data, qs = _state4(module)
        out_f, in_f = qs.shape
        bs = qs.blocksize
        if in_f % bs:  # bitsandbytes' CPU dequantization of such shapes is not blockwise over rows
            # (a row block of whole quantization blocks is then no longer a row block of W):
            yield Linear4bitKind.weight(module).to(dtype)  # take the whole weight, as the forward does
            return
        k = _block_rows(out_f, in_f)
        flat, absmax = data.reshape(-1).view(torch.uint8), _absmax4(qs)
        from bitsandbytes.functional import QuantState

        for start in range(0, out_f, k):
            rows = min(k, out_f - start)
            e0, n = start * in_f, rows * in_f
            sub = QuantState(
                absmax=absmax[e0 // bs : (e0 + n) // bs],
                shape=torch.Size([rows, in_f]),
                code=qs.code,
                blocksize=bs,
                quant_type=qs.quant_type,
                dtype=qs.dtype,
            )
            yield _dequant4(flat[e0 // 2 : (e0 + n) // 2], sub, dtype)


# --- bitsandbytes int8 (LLM.int8()) ---------------------------------------------------------------------


def _int8(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(CB int8 (out, in), SCB (out,)) wherever bitsandbytes keeps them, or None if not quantized."""
    p, st = module.weight, module.state
    cb = p.CB if p.CB is not None else st.CB
    scb = p.SCB if p.SCB is not None else st.SCB
    if cb is None and p.dtype == torch.int8:
        cb = p.data
    return None if cb is None or scb is None else (cb, scb)


def _dequant8(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # the product bitsandbytes' dequantizing matmul forms: CB · (SCB / 127), row by row
    return cb.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


class Linear8bitKind:
    """`bitsandbytes.nn.Linear8bitLt`: row-wise absmax int8 weight, dequantized to float32 (out, in)."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return _is(module, "Linear8bitLt")

    @staticmethod
    def weight(module) -> torch.Tensor:
        q = _int8(module)
        return module.weight.data if q is None else _dequant8(*q, torch.float32)

    @staticmethod
    def forward(module, x: torch.Tensor, bias: bool) -> torch.Tensor:
        st = module.state
        st.is_training = module.training
        if module.weight.CB is not None:
            module.init_8bit_state()
        b = module.bias if bias else None
        out = bitsandbytes().matmul(x, module.weight, bias=None if b is None else b.to(x.dtype), state=st)
        if not st.has_fp16_weights and st.CB is not None:
            module.weight.data = st.CB
        return out

    @staticmethod
    def set_weight(module, w: torch.Tensor) -> None:
        new = bitsandbytes().nn.Int8Params(w.detach().to(torch.float16).contiguous(), requires_grad=False, has_fp16_weights=False)
        module.weight = new._quantize(w.device)
        module.state.CB = module.state.SCB = None

    @staticmethod
    def merged(module, w: torch.Tensor) -> nn.Module:
        return _plain_linear(module, w, module.bias.dtype if module.bias is not None else torch.float32)

    @staticmethod
    def row_blocks(module, dtype: torch.dtype):
        cb, scb = _int8(module)
        k = _block_rows(*cb.shape)
        for start in range(0, cb.shape[0], k):
            yield _dequant8(cb[start : start + k], scb[start : start + k], dtype)


def _block_rows(out_f: int, in_f: int) -> int:
    """Rows per dequantized block: the budget of `svdadapt.norm.row_blocks`."""
    return max(1, min(norm.BLOCK_ELEMENTS // in_f, -(-out_f // 8)))


def _plain_linear(module: nn.Module, w: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    out.weight = nn.Parameter(w.detach().to(dtype), requires_grad=False)
    if module.bias is not None:
        out.bias = nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
    return out


BASE_KINDS: list[type] = [Linear8bitKind, Linear4bitKind, LinearKind, Conv1DKind]  # bitsandbytes' layers subclass nn.Linear


def register_base_kind(kind: type, first: bool = True) -> None:
    """Teach the layer a new base-layer type (e.g. a quantized linear); first match wins."""
    BASE_KINDS.insert(0 if first else len(BASE_KINDS), kind)


def is_quantized(module: nn.Module) -> bool:
    """Whether a layer (or any layer of a model) is a bitsandbytes 4-bit or int8 linear."""
    return any(Linear4bitKind.matches(m) or Linear8bitKind.matches(m) for m in module.modules())


def base_kind(module: nn.Module, name: str = "") -> type:
    """The first registered kind that matches `module`; raises naming the module if none does, or if
    its weight has a dtype the kind cannot serve (e.g. float8 without a registered kind)."""
    for kind in BASE_KINDS:
        if kind.matches(module):
            dtypes = getattr(kind, "dtypes", None)
            if dtypes is not None and (dt := kind.weight(module).dtype) not in dtypes:
                where = f"module {name!r}" if name else f"a {type(module).__name__}"
                raise ValueError(
                    f"{where} has {dt} weights; an adapter serves {type(module).__name__} weights in "
                    f"{[str(d).removeprefix('torch.') for d in dtypes]}. Load the model in one of those dtypes, "
                    "leave this module out of target_modules, or register a kind with svdadapt.layer.register_base_kind."
                )
            return kind
    supported = ", ".join(k.__doc__.split(":")[0].strip("` ") for k in BASE_KINDS)
    where = f"module {name!r} " if name else ""
    raise ValueError(
        f"{where}of type {type(module).__name__} cannot be adapted; supported layer types: {supported}. "
        "Pick other target_modules, or register a kind with svdadapt.layer.register_base_kind."
    )


def is_supported(module: nn.Module) -> bool:
    return any(kind.matches(module) for kind in BASE_KINDS)
