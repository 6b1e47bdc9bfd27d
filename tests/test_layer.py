"""The layer's invariants: output at init, the closed-form norm, the forward, peft parity, memory, errors."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from memtrack import LargestTensor
from torch import nn
from torch.overrides import TorchFunctionMode

import svdadapt

METHODS = ["lora", "dora", "pissa", "dude", "loraxs", "edora"]
# (method, norm): "exact" is an option of the magnitude methods only
METHOD_NORMS = [(m, n) for m in METHODS for n in ("detached", "exact") if n == "detached" or m in ("dora", "dude", "edora")]


def wrap(method, out_f=24, in_f=40, r=4, bias=True, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    ref = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    ref.load_state_dict(lin.state_dict())
    model = nn.Sequential(lin)
    cfg = svdadapt.AdapterConfig(method=method, r=r, target_modules=["0"], svd_dtype="float64", **kw)
    svdadapt.apply(model, cfg)
    return model[0], ref


def randomize(layer, scale=0.3, seed=1):
    """Move every factor (frozen or not) away from its start value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.factors().values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    layer.refresh()


def materialised(layer):
    """V = W + s·B R A and g = m / ‖V‖_row, computed the obvious way."""
    a, b = layer.lora_A, layer.lora_B
    p = b if layer.lora_R is None else b @ layer.lora_R
    v = layer.weight.to(a.dtype) + layer.scaling * p @ a
    g = None if layer.magnitude is None else layer.magnitude / torch.linalg.norm(v, dim=1)
    return v, g


# --- 1. output at init ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "dude"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_at_init_equals_base(method, dtype):
    layer, ref = wrap(method, dtype=dtype)
    x = torch.randn(7, 40, dtype=dtype)
    tol = {torch.float32: 2e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(layer(x), ref(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("method", ["loraxs", "edora"])
@pytest.mark.parametrize("bias", [True, False])
def test_frozen_basis_output_at_init_exact_when_sigma_is_zero(method, bias):
    layer, ref = wrap(method, dtype=torch.float32, bias=bias, sigma=0.0)
    x = torch.randn(7, 40)
    if bias:  # (x Wᵀ)·1 + b against the fused addmm of nn.Linear: one rounding apart at most
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=4 * torch.finfo(torch.float32).eps * ref(x).abs().max().item())
    else:
        assert layer(x).equal(ref(x))


@pytest.mark.parametrize("method", ["loraxs", "edora"])
def test_frozen_basis_output_at_init_within_what_sigma_implies(method):
    layer, ref = wrap(method, sigma=1e-5)
    x = torch.randn(7, 40, dtype=torch.float64)
    a, b, rr = layer.lora_A, layer.lora_B, layer.lora_R
    op = torch.linalg.matrix_norm
    # |s·B R A x| <= s ‖B‖₂ ‖R‖₂ ‖A‖₂ ‖x‖, and g − 1 = O(that) as well
    bound = layer.scaling * op(b, 2) * op(rr, 2) * op(a, 2) * x.norm(dim=1, keepdim=True)
    dev = (layer(x) - ref(x)).abs()
    assert dev.max() > 0
    g = layer.scale()
    extra = 0 if g is None else (g - 1).abs().max() * (x @ layer.weight.T).abs()
    assert (dev <= 1.01 * bound + extra).all()
    assert bound.max() < 1e-2  # sigma = 1e-5 means a small start


# --- 2. the closed-form norm and its gradients ----------------------------------------------


@pytest.mark.parametrize("method", ["edora", "loraxs", "dude", "dora"])
def test_closed_form_norm_and_gradients_match_the_materialised_norm(method):
    layer, _ = wrap(method, out_f=30, in_f=50, r=6)
    randomize(layer)
    for p in layer.factors().values():
        p.requires_grad_(True)  # gradients of every factor, frozen ones included
    c = torch.randn(30, dtype=torch.float64)
    (layer.row_norm() * c).sum().backward()
    # frozen A (edora, loraxs) is served from the cache, so the norm is a function of B and R only
    got = {k: p.grad.clone() for k, p in layer.factors().items() if p.grad is not None}
    assert set(layer.method.trainable) - {"magnitude"} <= set(got)
    for p in layer.factors().values():
        p.grad = None
    v, _ = materialised(layer)
    n_ref = torch.linalg.norm(v, dim=1)
    torch.testing.assert_close(layer.row_norm(), n_ref, rtol=1e-12, atol=0)
    (n_ref * c).sum().backward()
    for k, p in layer.factors().items():
        if k in got:
            torch.testing.assert_close(got[k], p.grad, rtol=1e-10, atol=1e-12, msg=f"d n / d {k}")


# --- 3. the forward against a materialised computation --------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_materialised_linear(method, bias):
    layer, _ = wrap(method, bias=bias)
    randomize(layer)
    x = torch.randn(2, 5, 40, dtype=torch.float64)
    v, g = materialised(layer)
    w = v if g is None else g[:, None] * v
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_merged_weight_equals_forward(method):
    layer, _ = wrap(method)
    randomize(layer)
    x = torch.randn(6, 40, dtype=torch.float64)
    torch.testing.assert_close(layer.merged_module()(x), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, "autocast"])
def test_inference_path_equals_the_training_step(method, bias, dtype):
    """Eval mode with gradients off folds g, R A and s·g ⊙ B once; the output is the training step's."""
    layer, _ = wrap(method, bias=bias, dtype=torch.float32 if dtype == "autocast" else dtype)
    randomize(layer)
    x = torch.randn(2, 5, 40, dtype=layer.base_layer.weight.dtype)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast")
    with amp:
        step = layer(x)  # training mode, gradients on: `_AdapterStep`
    layer.eval()
    with torch.no_grad(), amp:
        folded = layer(x)
    assert folded.dtype == step.dtype and layer._kept is not None
    tol = 1e-12 if dtype == torch.float64 else 2**-7  # bf16: the same float32 sum, rounded once, up to one ulp
    torch.testing.assert_close(folded.float(), step.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_inference_path_with_every_tensor_in_bf16(method, amp):
    """A layer cast whole to bf16 (as ZeRO does), under autocast to its own dtype (nothing to recast:
    the decoding path runs), to another, or none: the folded output and the training step's are each
    within two bf16 ulps of the output's scale of the float64 forward, in the step's dtype."""
    layer, _ = wrap(method, bias=True, dtype=torch.bfloat16)
    randomize(layer)
    layer.to(torch.bfloat16)
    exact = copy.deepcopy(layer).double()
    x = torch.randn(2, 5, 40, dtype=torch.bfloat16)
    ref = exact(x.double()).detach()

    def autocast():
        return torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None)

    with autocast():
        step = layer(x).detach()
    layer.eval()
    with torch.no_grad(), autocast():
        folded = layer(x)
    assert folded.dtype == step.dtype == (amp or torch.bfloat16)
    scale = ref.abs().max().item()
    for out in (step, folded):
        assert (out.double() - ref).abs().max().item() <= 2**-7 * scale


class _TorchCalls(TorchFunctionMode):
    """The torch functions called inside the block, tensor property reads left out."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") != "__get__":
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [True, False])
def test_a_decoding_step_is_three_ops_beyond_the_base_gemm(method, bias):
    """In decoding each op after the base GEMM runs with cold caches (about 10 µs each at SmolLM2's
    width, `svdadapt bench --suite generate`): a kept fold serves one token with the base F.linear,
    two rank-r F.linear and one combine, no reshape or copy; its output is the training step's."""
    layer, _ = wrap(method, bias=bias)
    randomize(layer)
    x = torch.randn(1, 1, 40, dtype=torch.float64)
    step = layer(x).detach()
    layer.eval()
    with torch.no_grad():
        layer(x)  # folds
        with _TorchCalls() as seen:
            out = layer(x)
    combine = "add_" if layer.magnitude is None else "addcmul_"
    assert seen.calls == ["linear", "linear", "linear", combine]
    torch.testing.assert_close(out, step, rtol=1e-12, atol=1e-12)


def test_inference_path_folds_once_and_again_after_a_change(monkeypatch):
    layer, _ = wrap("edora")
    randomize(layer)
    layer.eval()
    x = torch.randn(3, 40, dtype=torch.float64)
    calls = []
    real = type(layer).row_norm
    monkeypatch.setattr(type(layer), "row_norm", lambda self: calls.append(1) or real(self))
    with torch.no_grad():
        first = [layer(x) for _ in range(4)]
        assert len(calls) == 1  # the norm once for four calls
        layer.lora_R.add_(0.1)  # in place: a new version
        changed = layer(x)
        layer.lora_R = nn.Parameter(layer.lora_R.detach().clone() * 2)  # replaced: new storage
        replaced = layer(x)
    assert len(calls) == 3
    torch.testing.assert_close(first[-1], first[0], rtol=0, atol=0)
    layer.train()
    for out in (changed, replaced):  # each equals a fresh training-mode forward of the same values
        assert not torch.allclose(out, first[0])
    torch.testing.assert_close(replaced, layer(x).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_inference_path_sees_the_base_bias_and_refresh(method):
    """The kept fold covers the base layer's tensors too: a bias changed in place moves the output by
    exactly that change; after `.data` is assigned (no version counter moves) `refresh()` folds again."""
    layer, _ = wrap(method, bias=True)
    randomize(layer)
    layer.eval()
    x = torch.randn(3, 40, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        layer.base_layer.bias.add_(1.0)
        torch.testing.assert_close(layer(x), before + 1.0, rtol=0, atol=1e-12)
        layer.lora_B.data = layer.lora_B.detach() * 2 + 0.1
        layer.refresh()
        folded = layer(x)
    layer.train()
    torch.testing.assert_close(folded, layer(x).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_a_base_weight_changed_in_place_or_replaced_gives_its_own_norms(method):
    """‖W‖² and C = W Aᵀ are cached; a base weight loaded in place (as `load_state_dict` does) or replaced
    by another tensor is followed, in a training step and in the eval-mode fold, without `refresh()`."""
    layer, _ = wrap(method, bias=True)
    randomize(layer)
    x = torch.randn(5, 40, dtype=torch.float64)
    base = layer.base_layer

    def expected():
        v, g = materialised(layer)
        y = x @ v.T
        return (y if g is None else y * g) + base.bias

    layer.eval()
    with torch.no_grad():
        layer(x)  # folds
        base.weight.mul_(1.5)
        torch.testing.assert_close(layer(x), expected(), rtol=1e-12, atol=1e-12)
    layer.train()
    base.weight = nn.Parameter(base.weight.detach() * 0.7, requires_grad=False)
    torch.testing.assert_close(layer(x), expected(), rtol=1e-12, atol=1e-12)
    layer.eval()
    with torch.no_grad():
        base.weight.add_(0.01)
        torch.testing.assert_close(layer(x), expected(), rtol=1e-12, atol=1e-12)


def test_a_whole_adapted_module_pickles_and_its_copy_follows_its_own_base(tmp_path):
    """`torch.save` of the module itself (not a state dict) and deepcopy work; each copy tracks its own W."""
    layer, _ = wrap("dude", bias=True)
    randomize(layer)
    x = torch.randn(5, 40, dtype=torch.float64)
    want = layer(x).detach()
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    twin = copy.deepcopy(layer)
    for other in (loaded, twin):
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)
    with torch.no_grad():
        twin.base_layer.weight.mul_(2.0)
    v, g = materialised(twin)
    torch.testing.assert_close(twin(x), x @ v.T * g + twin.base_layer.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_a_dtype_move_after_an_eval_call_folds_again(method):
    """`.double()` / `.float()` convert through `.data` (no version counter moves): the next eval-mode
    call must fold from the converted tensors, not reuse the old dtype's factors, or C from the old A."""
    layer, _ = wrap(method, bias=True)
    randomize(layer)
    layer.float().eval()
    x = torch.randn(3, 40, dtype=torch.float64)
    with torch.no_grad():
        layer(x.float())  # folds in float32
        layer.double()
        folded = layer(x)
    assert folded.dtype == torch.float64
    layer.train()
    torch.testing.assert_close(folded, layer(x).detach(), rtol=1e-12, atol=1e-12)


def test_exact_norm_switch_changes_only_the_gradient():
    det, _ = wrap("edora", norm="detached")
    ex, _ = wrap("edora", norm="exact")
    for lay in (det, ex):
        randomize(lay)
    x = torch.randn(5, 40, dtype=torch.float64)
    torch.testing.assert_close(det(x), ex(x), rtol=0, atol=0)
    det(x).sum().backward()
    ex(x).sum().backward()
    assert not torch.allclose(det.lora_R.grad, ex.lora_R.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["dude", "edora"])
def test_low_precision_base(method, dtype):
    layer, ref = wrap(method, dtype=dtype, out_f=64, in_f=96, r=8)
    assert layer.lora_A.dtype == torch.float32 and layer._w_sq.dtype == torch.float32  # norms in float32
    x = torch.randn(4, 96, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref(x).float(), rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.factors().values() if p.requires_grad)


# --- 5. parity with peft's DoRA + PiSSA ------------------------------------------------------


def test_dude_agrees_with_peft_dora_pissa():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 40))
    ours = nn.Sequential(nn.Linear(48, 40))
    ours.load_state_dict(base.state_dict())
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights="pissa")
    )
    svdadapt.apply(ours, svdadapt.AdapterConfig(method="dude", r=8, target_modules=["0"]))
    pl, ol = peft_model.base_model.model[0], ours[0]
    x = torch.randn(10, 48)
    # same start: residual, B A product, magnitude and output (SVD signs may differ per column)
    torch.testing.assert_close(pl.base_layer.weight, ol.weight, rtol=0, atol=2e-5)
    torch.testing.assert_close(
        pl.lora_B["default"].weight @ pl.lora_A["default"].weight, ol.lora_B @ ol.lora_A, rtol=0, atol=2e-5
    )
    torch.testing.assert_close(pl.lora_magnitude_vector["default"].weight, ol.magnitude, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(peft_model(x), ours(x), rtol=1e-5, atol=1e-5)
    # the same perturbation of B, A and m in both (copy ours into peft so the coordinates agree)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(ol.lora_A)
        pl.lora_B["default"].weight.copy_(ol.lora_B)
        for p_ours, p_peft in [
            (ol.lora_A, pl.lora_A["default"].weight),
            (ol.lora_B, pl.lora_B["default"].weight),
            (ol.magnitude, pl.lora_magnitude_vector["default"].weight),
        ]:
            d = torch.randn(p_ours.shape, generator=g) * 0.2
            p_ours.add_(d)
            p_peft.add_(d)
    torch.testing.assert_close(peft_model(x), ours(x), rtol=1e-5, atol=1e-5)


# --- memory: never an (out, in) temporary ----------------------------------------------------


@pytest.mark.parametrize(("method", "norm"), METHOD_NORMS)
def test_no_out_by_in_tensor_in_forward_or_backward(method, norm):
    out_f, in_f, tokens = 192, 256, 16
    layer, _ = wrap(method, out_f=out_f, in_f=in_f, r=8, dtype=torch.float32, norm=norm, dropout=0.1)
    x = torch.randn(tokens, in_f, requires_grad=True)
    with LargestTensor() as seen:
        layer(x).square().sum().backward()
    assert seen.numel < out_f * in_f // 4, f"{seen.op} made a tensor of {seen.numel} elements"
    assert x.grad is not None


_PEAK = textwrap.dedent(
    """
    import json, sys, torch, torch.nn.functional as F
    from torch import nn
    import svdadapt
    torch.manual_seed(0)
    torch.set_num_threads(1)
    which = sys.argv[1]
    model = nn.Sequential(nn.Linear(4096, 4096))
    svdadapt.apply(model, svdadapt.AdapterConfig(method="edora", r=16, target_modules=["0"], svd_solver="randomized", svd_cache_dir=""))
    layer = model[0]
    def materialising(x):  # what a DoRA that builds V every step does
        v = layer.weight + layer.scaling * (layer.lora_B @ layer.lora_R) @ layer.lora_A
        n = torch.linalg.norm(v, dim=1).detach()
        return F.linear(x, (layer.magnitude / n)[:, None] * v, layer.bias)
    step = layer if which == "svdadapt" else materialising
    x = torch.randn(256, 4096, requires_grad=True)
    step(x).sum().backward()  # warm-up: allocator and caches
    def rss(key):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss("VmRSS:")
    step(x).sum().backward()
    print(json.dumps({"peak": rss("VmHWM:") - before}))
    """
)


def _peak(which):
    out = subprocess.run([sys.executable, "-c", _PEAK, which], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def test_edora_step_peak_memory_is_a_weight_below_a_materialising_step():
    ours, naive = _peak("svdadapt"), _peak("materialising")
    weight_bytes = 4096 * 4096 * 4
    print(f"peak extra RSS of one step: svdadapt edora {ours / 2**20:.1f} MiB, materialising {naive / 2**20:.1f} MiB")
    assert naive - ours >= weight_bytes


# --- 8. bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, r"AdapterConfig\.r=0 is invalid"),
        ({"r": -3}, r"AdapterConfig\.r=-3 is invalid"),
        ({"alpha": 0.0}, r"AdapterConfig\.alpha=0\.0 is invalid.*positive"),
        ({"sigma": -1e-5}, r"AdapterConfig\.sigma=-1e-05 is invalid"),
        ({"dropout": 1.0}, r"AdapterConfig\.dropout=1\.0"),
        ({"singular_values_on": "C"}, r"singular_values_on='C'.*\['B', 'A'\]"),
        ({"svd_solver": "lanczos"}, r"svd_solver='lanczos'.*\['auto', 'full', 'randomized'\]"),
        ({"svd_sketch": "float16"}, r"svd_sketch='float16'.*\['weight', 'dtype'\]"),
        ({"norm": "approx"}, r"norm='approx'"),
        ({"target_modules": []}, r"target_modules=\[\] is invalid"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        svdadapt.AdapterConfig(method="edora", **kwargs)


@pytest.mark.parametrize("r", [24, 30])
def test_rank_too_large_names_the_module(r):
    model = nn.Sequential(nn.Linear(40, 24))
    with pytest.raises(ValueError, match=rf"r={r} is too large for module '0' of shape \(24, 40\).*below 24"):
        svdadapt.apply(model, svdadapt.AdapterConfig(method="edora", r=r, target_modules=["0"]))
    assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_names_the_module_and_changes_nothing(bad, dtype):
    model = nn.Sequential(nn.Linear(40, 24), nn.Linear(24, 24)).to(dtype)
    with torch.no_grad():
        model[1].weight[3, 5] = bad
    with pytest.raises(ValueError, match=r"module '1': its weight has NaN or Inf"):
        svdadapt.apply(model, svdadapt.AdapterConfig(method="pissa", r=4, target_modules=["0", "1"]))
    assert isinstance(model[0], nn.Linear) and model[0].weight.requires_grad  # untouched


def test_unsupported_layer_lists_supported_types():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(
        ValueError, match=r"module '0' of type Conv2d cannot be adapted; supported layer types: .*nn\.Linear.*Conv1D"
    ):
        svdadapt.apply(model, svdadapt.AdapterConfig(method="lora", r=2, target_modules=["0"]))
