"""Quantized base layers: every method on a bitsandbytes NF4 or int8 base, QLoRA- and QPiSSA-style.

Two ways in:

    # 1. a model loaded quantized (transformers' BitsAndBytesConfig): apply as usual. The SVD and the
    #    cached row norms come from the dequantized weight, which is what the forward multiplies by.
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    svdadapt.apply(model, AdapterConfig(method="edora", r=16))

    # 2. a full-precision model quantized here (what a recipe's `model.quantization: nf4` calls):
    model = svdadapt.quant.prepare_quantized(model, AdapterConfig(method="dude", r=16), "nf4")

In (2), a residual method (pissa, dude) takes its SVD in float32 from the full-precision W0 and the
base layer stores Q(W0 − s·B A), the residual, not Q(W0) (QPiSSA, https://arxiv.org/abs/2404.02948 §4):
the principal part, which holds most of the weight's outliers, stays in full precision in B A, so the
effective weight Q(W_res) + s·B A is closer to W0 than Q(W0) is. Reload such an adapter with
`load_quantized` on the full-precision base. Non-residual methods quantize first and take the SVD of
the dequantized weight, so that a saved adapter (compact included) reloads onto any identically
quantized base.

Kinds (see `svdadapt.layer.register_base_kind`): `weight` dequantizes; `forward` runs the quantized
matmul; `set_weight` re-quantizes; `merged` returns a plain `nn.Linear` (merging into a quantized base
gives a full-precision layer: re-quantizing the merged weight would add a second rounding error;
call `quantize_model` on the merged model if you want it quantized again). For dude/dora, whose A
trains, C = W Aᵀ is recomputed each step from row blocks dequantized one at a time.

On CPU, int8 layers in training mode multiply by the dequantized weight exactly; in eval mode
bitsandbytes also quantizes the activations (LLM.int8()), so the forward is within int8 rounding of
the dequantized-weight reference, and the row norms use the dequantized weight.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from torch import nn

from svdadapt import norm
from svdadapt.config import AdapterConfig
from svdadapt.layer import AdapterLayer, base_kind, register_base_kind
from svdadapt.methods import get_method

QUANTIZATIONS = ("nf4", "int8")


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("quantized bases need bitsandbytes: pip install 'svdadapt[quant]'") from e
    return bnb


def _is(module: nn.Module, cls_name: str) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # no bitsandbytes imported: no module can be one of its layers
    return bnb is not None and isinstance(module, getattr(bnb.nn, cls_name))


# --- NF4 / FP4 -----------------------------------------------------------------------------


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
        return _bnb().matmul_4bit(x.to(cd), module.weight.t(), quant_state=qs, bias=b).to(x.dtype)

    @staticmethod
    def set_weight(module, w: torch.Tensor) -> None:
        p = module.weight
        dtype = p.quant_state.dtype if p.bnb_quantized else p.dtype
        new = _bnb().nn.Params4bit(
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


# --- int8 (LLM.int8()) ---------------------------------------------------------------------


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
        out = _bnb().matmul(x, module.weight, bias=None if b is None else b.to(x.dtype), state=st)
        if not st.has_fp16_weights and st.CB is not None:
            module.weight.data = st.CB
        return out

    @staticmethod
    def set_weight(module, w: torch.Tensor) -> None:
        new = _bnb().nn.Int8Params(w.detach().to(torch.float16).contiguous(), requires_grad=False, has_fp16_weights=False)
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


register_base_kind(Linear8bitKind)
register_base_kind(Linear4bitKind)


# --- quantizing a model --------------------------------------------------------------------


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is invalid: it must be one of {list(QUANTIZATIONS)} (or None for none)")


def is_quantized(module: nn.Module) -> bool:
    """Whether a layer (or any layer of a model) is a bitsandbytes 4-bit or int8 linear."""
    return any(Linear4bitKind.matches(m) or Linear8bitKind.matches(m) for m in module.modules())


def quantize_linear(linear: nn.Linear, quantization: str) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight quantized, on the same device.

    NF4: blocksize 64, no double quantization, compute in the weight's dtype (transformers'
    `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` defaults). int8: row-wise
    absmax from float16, outlier threshold 6.0 (`load_in_8bit=True` defaults).
    """
    _check_quantization(quantization)
    bnb = _bnb()
    w, has_bias = linear.weight.detach(), linear.bias is not None
    if w.device.type == "meta":
        raise ValueError("quantize_linear: the layer is on the meta device; load its weights first")
    if quantization == "nf4":
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=w.dtype,
            compress_statistics=False,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            w.contiguous(), requires_grad=False, blocksize=64, compress_statistics=False, quant_type="nf4", module=q
        )._quantize(w.device)
    else:
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        q.weight = bnb.nn.Int8Params(w.to(torch.float16).contiguous(), requires_grad=False, has_fp16_weights=False)._quantize(
            w.device
        )
    if has_bias:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    q.train(linear.training)
    return q


def _skipped(model: nn.Module, skip) -> set[int]:
    from svdadapt.model import name_matches, output_heads

    heads = output_heads(model)
    out = set(heads)
    for name, module in model.named_modules():
        if name and (id(module) in heads or name_matches(name, skip)):
            out |= {id(m) for m in module.modules()}
    return out


def quantize_model(model: nn.Module, quantization: str, adapter_config: AdapterConfig | None = None, *, skip=()) -> nn.Module:
    """Quantize every `nn.Linear` of `model` (not the output head, nor `skip` suffixes), in place.

    Adapter layers already in the model get their base quantized and their cached norms recomputed
    from the dequantized weight. With `adapter_config`, also apply the adapter: a residual method
    (pissa, dude) is applied first, on the full-precision weights, so that the base stores
    Q(W0 − s·B A); any other method is applied after quantizing (SVD of the dequantized weight).

    Args:
        model: a full-precision model, adapted or not.
        quantization: "nf4" or "int8".
        adapter_config: an adapter to apply, or None.
        skip: module-name suffixes to keep in full precision (besides the output head).

    Returns:
        `model`.
    """
    _check_quantization(quantization)
    from svdadapt.model import apply, replace_module

    residual = adapter_config is not None and get_method(adapter_config.method).residual
    if adapter_config is not None and residual:
        apply(model, adapter_config)
    keep = _skipped(model, tuple(skip) + tuple(adapter_config.modules_to_save if adapter_config else ()))
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLayer) and type(module.base_layer) is nn.Linear:
            module.base_layer = quantize_linear(module.base_layer, quantization)
            module.kind = base_kind(module.base_layer)
            module.refresh()
        elif type(module) is nn.Linear and id(module) not in keep and not name.endswith("base_layer"):
            replace_module(model, name, quantize_linear(module, quantization))
    if adapter_config is not None and not residual:
        apply(model, adapter_config)
    return model


def prepare_quantized(model: nn.Module, adapter_config: AdapterConfig, quantization: str | None) -> nn.Module:
    """What training calls: apply `adapter_config` to `model` on a base quantized as asked.

    Args:
        model: a full-precision model, or one loaded quantized by transformers (then `quantization`
            only has to agree that it is quantized; the layers are used as loaded).
        adapter_config: the adapter to apply.
        quantization: "nf4", "int8", or None for a full-precision base.

    Returns:
        `model`, adapted.
    """
    from svdadapt.model import apply

    if quantization is None:
        return apply(model, adapter_config)
    _check_quantization(quantization)
    if not is_quantized(model):
        return quantize_model(model, quantization, adapter_config)
    if get_method(adapter_config.method).residual:
        warnings.warn(
            f"{adapter_config.method} on an already quantized base re-quantizes Q(W0) − s·B A (two rounding errors); "
            "for QPiSSA load the model in full precision and let prepare_quantized quantize the residual",
            stacklevel=2,
        )
    return apply(model, adapter_config)


def load_quantized(model: nn.Module, directory: str | os.PathLike, quantization: str | None) -> nn.Module:
    """Load a saved adapter onto a base quantized the way `prepare_quantized` quantized it.

    For a residual method trained with `prepare_quantized` on a full-precision model, pass the same
    full-precision model: the adapter is loaded (base rewritten to W0 − s·B0 A0), then quantized.
    A model already quantized (e.g. by transformers) is loaded onto as it is.
    """
    from svdadapt.io import load_adapter, read_adapter

    if quantization is None or is_quantized(model):
        return load_adapter(model, directory)
    _check_quantization(quantization)
    _, cfg, _ = read_adapter(directory)
    if get_method(cfg.method).residual:
        load_adapter(model, directory)
        return quantize_model(model, quantization, skip=cfg.modules_to_save)
    quantize_model(model, quantization, skip=cfg.modules_to_save)
    return load_adapter(model, directory)


__all__ = [
    "QUANTIZATIONS",
    "Linear4bitKind",
    "Linear8bitKind",
    "is_quantized",
    "load_quantized",
    "prepare_quantized",
    "quantize_linear",
    "quantize_model",
]
