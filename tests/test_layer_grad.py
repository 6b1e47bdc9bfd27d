"""`AdapterLayer`'s forward/backward against autograd through the materialised weight.

Reference: V = W + s·B R A built as an (out, in) matrix, n = ‖V‖_row (a constant for norm="detached"),
y = F.linear(x, (m / n)[:, None] · V, bias); gradients of x and of every trainable factor by autograd.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svdadapt

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ["lora", "dora", "pissa", "dude", "loraxs", "edora"]
# (method, norm): "exact" is an option of the magnitude methods only
METHOD_NORMS = [(m, n) for m in METHODS for n in ("detached", "exact") if n == "detached" or m in ("dora", "dude", "edora")]


def make(method, bias=True, norm="detached", dtype=torch.float64, out_f=24, in_f=40, r=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=bias).to(dtype))
    cfg = svdadapt.AdapterConfig(method=method, r=r, target_modules=["0"], svd_dtype="float64", svd_cache_dir="", norm=norm)
    svdadapt.apply(model, cfg)
    layer = model[0]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every factor, frozen or not, away from its start value
        for p in layer.factors().values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    layer.refresh()
    return layer


def reference(layer, x):
    """Forward through the materialised V; factors enter as differentiable leaves (copies)."""
    leaves = {k: p.detach().clone().requires_grad_(p.requires_grad) for k, p in layer.factors().items()}
    a, b = leaves["A"], leaves["B"]
    p = b if "R" not in leaves else b @ leaves["R"]
    v = layer.weight.detach().to(a.dtype) + layer.scaling * p @ a  # (out, in)
    w = v
    if "magnitude" in leaves:
        n = torch.linalg.vector_norm(v, dim=1)
        if not layer.exact_norm:
            n = n.detach()
        w = (leaves["magnitude"] / n)[:, None] * v
    bias = None if layer.bias is None else layer.bias.detach().to(w.dtype)
    return F.linear(x, w, bias), leaves


@pytest.mark.parametrize(("method", "norm"), METHOD_NORMS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_the_materialised_reference(method, bias, norm):
    layer = make(method, bias=bias, norm=norm)
    x = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 5, 24, dtype=torch.float64)
    y = layer(x)
    y.backward(gy)
    xr = x.detach().clone().requires_grad_(True)
    y_ref, leaves = reference(layer, xr)
    y_ref.backward(gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for k, p in layer.factors().items():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, leaves[k].grad, rtol=1e-10, atol=1e-12, msg=f"{method} {norm} d/d{k}")
        else:
            assert p.grad is None, f"frozen {k} got a gradient"


@pytest.mark.parametrize("method", ["dude", "edora"])
def test_exact_and_detached_gradients_differ(method):
    grads = {}
    for norm in ("exact", "detached"):
        layer = make(method, norm=norm)
        layer(torch.randn(6, 40, dtype=torch.float64)).square().sum().backward()
        grads[norm] = layer.lora_B.grad if method == "dude" else layer.lora_R.grad
    assert not torch.allclose(grads["exact"], grads["detached"])


def test_input_without_grad_and_trainable_bias():
    layer = make("dude", norm="exact")
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(7, 40, dtype=torch.float64)
    gy = torch.randn(7, 24, dtype=torch.float64)
    layer(x).backward(gy)
    torch.testing.assert_close(layer.bias.grad, gy.sum(0), rtol=1e-12, atol=1e-12)  # y = g ⊙ ypre + bias
    assert layer.magnitude.grad is not None


def test_conv1d_base_matches_the_reference():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(24, 40).double())
    with torch.no_grad():
        model[0].bias.normal_()
    svdadapt.apply(model, svdadapt.AdapterConfig(method="edora", r=4, target_modules=["0"], svd_cache_dir="", norm="exact"))
    layer = model[0]
    with torch.no_grad():
        layer.lora_R.normal_()
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    y_ref, leaves = reference(layer, xr)
    y_ref.square().sum().backward()
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_R.grad, leaves["R"].grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["dude", "edora"])
def test_dropout_applies_to_the_low_rank_path_only(method):
    layer = make(method)
    layer.dropout = nn.Dropout(0.5)
    layer.train()
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    y.square().sum().backward()
    torch.manual_seed(7)  # the same mask: the base layer draws no random numbers
    xr = x.detach().clone().requires_grad_(True)
    xd = F.dropout(xr, 0.5, training=True)
    leaves = {k: p.detach().clone().requires_grad_(p.requires_grad) for k, p in layer.factors().items()}
    p = leaves["B"] if "R" not in leaves else leaves["B"] @ leaves["R"]
    w = layer.weight.detach()
    ypre = xr @ w.T + layer.scaling * (xd @ leaves["A"].T) @ p.T
    n = torch.linalg.vector_norm(w + layer.scaling * p.detach() @ leaves["A"].detach(), dim=1)
    y_ref = (leaves["magnitude"] / n) * ypre + layer.bias.detach()
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for k, p in layer.factors().items():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, leaves[k].grad, rtol=1e-10, atol=1e-12, msg=f"d/d{k}")
