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

Kinds (`svdadapt.kinds`, registered from the start): `weight` dequantizes; `forward` runs the quantized
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
import warnings

import torch
from torch import nn

from svdadapt.config import AdapterConfig
from svdadapt.io import load_adapter, read_adapter
from svdadapt.kinds import Linear4bitKind, Linear8bitKind, base_kind, bitsandbytes, is_quantized
from svdadapt.layer import AdapterLayer
from svdadapt.methods import get_method
from svdadapt.model import apply, name_matches, output_heads, replace_module

QUANTIZATIONS = ("nf4", "int8")


# --- quantizing a model --------------------------------------------------------------------


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is invalid: it must be one of {list(QUANTIZATIONS)} (or None for none)")


def quantize_linear(linear: nn.Linear, quantization: str) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight quantized, on the same device.

    NF4: blocksize 64, no double quantization, compute in the weight's dtype (transformers'
    `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` defaults). int8: row-wise
    absmax from float16, outlier threshold 6.0 (`load_in_8bit=True` defaults).
    """
    _check_quantization(quantization)
    bnb = bitsandbytes()
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
