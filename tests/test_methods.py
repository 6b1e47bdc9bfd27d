"""The registry, the methods' start values and what trains (DESIGN §2)."""

import pytest
import torch
from torch import nn

import svdadapt
from svdadapt.methods import get_method

METHODS = ["lora", "dora", "pissa", "dude", "loraxs", "edora"]
TRAINS = {
    "lora": {"A", "B"},
    "dora": {"A", "B", "magnitude"},
    "pissa": {"A", "B"},
    "dude": {"A", "B", "magnitude"},
    "loraxs": {"R"},
    "edora": {"R", "magnitude"},
}


def adapted(method, out_f=24, in_f=40, r=4, bias=True, **kw):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias).double()
    w0 = lin.weight.detach().clone()
    model = nn.Sequential(lin)
    cfg = svdadapt.AdapterConfig(method=method, r=r, target_modules=["0"], svd_dtype="float64", **kw)
    svdadapt.apply(model, cfg)
    return model, model[0], w0, cfg


def test_builtin_registry_is_sorted_and_complete():
    assert svdadapt.methods() == sorted(svdadapt.methods())
    assert set(METHODS) <= set(svdadapt.methods())


def test_unknown_method_lists_registered_names():
    with pytest.raises(ValueError, match=r"unknown method 'edorra'.*\['dora', 'dude', 'edora'"):
        svdadapt.AdapterConfig(method="edorra")


@pytest.mark.parametrize("method", METHODS)
def test_only_the_listed_tensors_train(method):
    model, layer, _, _ = adapted(method)
    trainable = {k for k, v in layer.factors().items() if v.requires_grad}
    assert trainable == TRAINS[method]
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("0.lora_") and "magnitude" not in n]
    assert frozen == []  # the base weight and bias are frozen


def _svd64(w, r):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


@pytest.mark.parametrize("side", ["B", "A"])
def test_edora_factors_are_the_truncated_svd(side):
    model, layer, w0, _ = adapted("edora", singular_values_on=side)
    u, s, vh = _svd64(w0, 4)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    # canonical signs may differ from LAPACK's: compare sign-invariant products and magnitudes
    torch.testing.assert_close(b @ a, u @ torch.diag(s) @ vh, rtol=1e-10, atol=1e-10)
    if side == "B":
        torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=a.dtype), atol=1e-12, rtol=0)  # A = V_rᵀ: orthonormal rows
        torch.testing.assert_close(b.norm(dim=0), s, rtol=1e-10, atol=0)  # B = U_r Σ_r
    else:
        torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=b.dtype), atol=1e-12, rtol=0)  # B = U_r
        torch.testing.assert_close(a.norm(dim=1), s, rtol=1e-10, atol=0)  # A = Σ_r V_rᵀ
    assert layer.weight.equal(w0)  # edora does not rewrite the base weight


def test_edora_random_frozen_factors_ablation():
    _, layer, w0, _ = adapted("edora", frozen_factors="random")
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    u, s, vh = _svd64(w0, 4)
    assert not torch.allclose(b @ a, u @ torch.diag(s) @ vh, atol=1e-3)
    assert a.abs().max() <= 1 / 40**0.5 and b.abs().max() <= 1 / 4**0.5  # Kaiming-uniform bounds 1/sqrt(fan_in)
    assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad


@pytest.mark.parametrize("method", ["pissa", "dude"])
def test_principal_factors_and_residual(method):
    _, layer, w0, cfg = adapted(method)
    assert cfg.scaling == 1.0  # alpha defaults to r for pissa/dude
    a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    torch.testing.assert_close(layer.weight + s * b @ a, w0, rtol=0, atol=1e-12)  # W_res + s·B A == W0
    u, sv, vh = _svd64(w0, 4)
    torch.testing.assert_close(b.norm(dim=0), sv.sqrt(), rtol=1e-10, atol=0)  # B = U √S
    torch.testing.assert_close(a.norm(dim=1), sv.sqrt(), rtol=1e-10, atol=0)  # A = √S Vᵀ


def test_residual_of_a_bf16_weight_is_the_same_in_row_blocks(monkeypatch):
    """W0 − s·B A is rewritten a block of rows at a time: the blocks join up to the one-shot result."""
    from svdadapt import layer as L

    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 24, generator=g).to(torch.bfloat16)
    b, a = torch.randn(37, 4, generator=g), torch.randn(4, 24, generator=g)
    whole = torch.addmm(w.float(), b, a, alpha=-0.5).to(torch.bfloat16)
    monkeypatch.setattr(svdadapt.norm, "BLOCK_ELEMENTS", 5 * 24)  # 5 rows a block: 8 blocks, the last one short
    assert [blk.shape[0] for blk in svdadapt.norm.row_blocks(w, torch.float32)] == [5] * 7 + [2]
    assert L._residual(w, b, a, 0.5).equal(whole)


def test_pissa_factors_divide_by_root_scaling():
    _, layer, w0, cfg = adapted("pissa", alpha=16.0)  # s = 4
    sv = _svd64(w0, 4)[1]
    torch.testing.assert_close(layer.lora_B.detach().norm(dim=0), (sv / 4).sqrt(), rtol=1e-10, atol=0)
    torch.testing.assert_close(layer.weight + 4 * layer.lora_B @ layer.lora_A, w0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_start_values(method):
    _, layer, w0, cfg = adapted(method)
    assert cfg.scaling == 16 / 4
    assert layer.lora_B.abs().max() == 0 and layer.lora_A.abs().max() > 0
    assert layer.lora_A.abs().max() <= 1 / 40**0.5


def test_sigma_sets_r_std():
    _, layer, _, _ = adapted("loraxs", out_f=64, in_f=64, r=32, sigma=0.5)
    assert 0.4 < layer.lora_R.std().item() < 0.6
    _, layer, _, _ = adapted("loraxs", sigma=0.0)
    assert layer.lora_R.abs().max() == 0


def test_magnitude_starts_at_the_row_norm():
    for method in ["dora", "dude", "edora"]:
        _, layer, w0, _ = adapted(method, **({"sigma": 0.0} if method == "edora" else {}))  # R = 0 for edora
        torch.testing.assert_close(layer.magnitude.detach(), w0.norm(dim=1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_edora_magnitude_start_base_reproduces_the_authors_forward(dtype):
    """magnitude_start="base" (the EDoRA authors' code: peft's DoRA m = ‖W0‖_row, then A = Σ_rV_rᵀ, B = U_r
    and R put in) against their forward computed here in float64 from W0, A, B, R alone:
    y = ‖W0‖_row / ‖W0 + s·B R A‖_row ⊙ (W0 x + s·B R A x) + bias."""
    torch.manual_seed(0)
    lin = nn.Linear(40, 24).to(dtype)
    w0, bias = lin.weight.detach().double().clone(), lin.bias.detach().double().clone()
    model = nn.Sequential(lin)
    cfg = svdadapt.AdapterConfig(
        method="edora", r=4, target_modules=["0"], singular_values_on="A", sigma=0.3, magnitude_start="base"
    )
    layer = svdadapt.apply(model, cfg)[0]
    a, b, rr = (t.detach().double() for t in (layer.lora_A, layer.lora_B, layer.lora_R))
    v = w0 + cfg.scaling * b @ rr @ a
    x = torch.randn(5, 40, dtype=torch.float64)
    want = (x @ v.T) * (w0.norm(dim=1) / v.norm(dim=1)) + bias
    got = model(x.to(dtype)).double()
    assert float((got - want).detach().norm() / want.norm()) <= (1e-12 if dtype == torch.float64 else 1e-6)
    # the default start ("adapted", next test) is V = W0 + s·B R A itself, with g = 1; the authors' is not
    assert float((want - (x @ v.T + bias)).norm() / want.norm()) > 1e-3


def test_edora_magnitude_start_adapted_makes_g_one():
    model, layer, w0, cfg = adapted("edora", sigma=0.3)
    a, b, rr = (t.detach() for t in (layer.lora_A, layer.lora_B, layer.lora_R))
    v = w0 + cfg.scaling * b @ rr @ a  # float64 throughout
    x = torch.randn(3, 40, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ v.T + layer.base_layer.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.magnitude.detach(), v.norm(dim=1), rtol=1e-12, atol=0)


def test_same_seed_same_start_values_and_per_layer_streams():
    m1, l1, _, _ = adapted("lora")
    m2, l2, _, _ = adapted("lora")
    assert l1.lora_A.equal(l2.lora_A)
    _, l3, _, _ = adapted("lora", seed=1)
    assert not l1.lora_A.equal(l3.lora_A)


def test_user_method_registers_without_touching_the_package():
    @svdadapt.register_method("toy_top_singular", trainable=("B", "magnitude"), magnitude=True, default_alpha=lambda r: 2.0 * r)
    def toy(weight, ctx):
        u, s, vh = ctx.svd(weight)
        return svdadapt.Factors(A=vh, B=torch.zeros_like(u))

    assert "toy_top_singular" in svdadapt.methods()
    model, layer, w0, cfg = adapted("toy_top_singular")
    assert cfg.scaling == 2.0
    assert {k for k, v in layer.factors().items() if v.requires_grad} == {"B", "magnitude"}
    x = torch.randn(3, 40, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ w0.T + layer.bias, rtol=1e-12, atol=1e-12)
    assert get_method("toy_top_singular").trainable_count(24, 40, 4) == 24 * 4 + 24


def test_register_method_validates_its_arguments():
    with pytest.raises(ValueError, match="trainable"):
        svdadapt.register_method("bad", trainable=("Q",))
    with pytest.raises(ValueError, match="magnitude=False"):
        svdadapt.register_method("bad", trainable=("magnitude",))
    with pytest.raises(ValueError, match="has_R=False"):
        svdadapt.register_method("bad", trainable=("R",))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"method": "dude", "sigma": 3.0},
            r"AdapterConfig\.sigma=3\.0 has no effect on method 'dude'; it is an option of \['edora', 'loraxs'",
        ),
        ({"method": "dude", "frozen_factors": "random"}, r"frozen_factors='random' has no effect on method 'dude'"),
        (
            {"method": "lora", "norm": "exact"},
            r"norm='exact' has no effect on method 'lora'; it is an option of \['dora', 'dude', 'edora'",
        ),
        ({"method": "pissa", "singular_values_on": "A"}, r"singular_values_on='A' has no effect on method 'pissa'"),
    ],
)
def test_an_option_the_method_does_not_use_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        svdadapt.AdapterConfig(**kwargs)
    svdadapt.AdapterConfig(method=kwargs["method"], svd_solver="randomized", svd_niter=8)  # SVD settings serve any method


def test_reregistering_a_name_needs_replace():
    from svdadapt.methods import _REGISTRY

    builtin = _REGISTRY["lora"]
    with pytest.raises(
        ValueError, match=r"register_method\('lora'\): a method of that name is registered already; pass replace=True"
    ):
        svdadapt.register_method("lora", trainable=("A", "B"))(lambda w, ctx: None)
    try:
        svdadapt.register_method("lora", trainable=("A", "B"), replace=True)(builtin.init)
        assert _REGISTRY["lora"] is not builtin and _REGISTRY["lora"].options is None  # declared no options: any
    finally:
        _REGISTRY["lora"] = builtin
