"""The CUDA-only paths: the float32-output GEMM and its probe, the hi/lo-split C = W Aᵀ, the fingerprint's
block path, the layer, its inference path and the bank on bf16 CUDA weights, and NF4/int8 on CUDA
bitsandbytes. The probe's logic is tested here on the CPU too (with torch's calls stood in for); the
split's arithmetic has its CPU emulation in tests/test_precision.py. The rest needs a GPU: marked
`cuda`, skipped without one (`python -m pytest -m cuda` runs just these; `scripts/gpu_check.sh` runs
them on a GPU machine)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svdadapt
from svdadapt import norm


def on_cuda(test):
    """Marked `cuda` and skipped without a CUDA GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


LOW = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}  # relative error of one rounding in each dtype, with margin


def rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def adapted(method, dtype, device="cuda", out_f=96, in_f=128, r=8, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f)).to(device=device, dtype=dtype)
    svdadapt.apply(model, svdadapt.AdapterConfig(method=method, r=r, target_modules=["0"], svd_cache_dir=""))
    layer = model[0]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every factor off its start, so a missing term is an error of order one
        for p in layer.factors().values():
            p.add_((torch.randn(p.shape, generator=g) * p.std().clamp_min(1e-2) * 0.3).to(p.device))
    layer.refresh()
    return layer


def reference(layer, x):
    """The layer's math in float64 through the materialised weight."""
    a, w = layer.lora_A.double(), layer.weight.double()
    v = w + layer.scaling * layer.direction().detach().double() @ a
    bias = layer.bias.double()
    if layer.magnitude is None:
        return F.linear(x.double(), v, bias)
    g = layer.magnitude.double() / v.norm(dim=1)
    return F.linear(x.double(), v) * g + bias


# --- the probe (CPU: torch's calls stood in for) ----------------------------------------------


def test_probe_runs_once_per_device_and_dtype_and_a_failed_probe_is_false_for_that_pair_only(monkeypatch):
    monkeypatch.setattr(norm, "_FLOAT_OUT", {})
    calls, ones = [], torch.ones

    def fake_ones(*shape, dtype, device):
        calls.append(dtype)
        if dtype == torch.float16:
            raise NotImplementedError("no float32-output GEMM for float16 here")
        return ones(*shape, dtype=dtype)

    monkeypatch.setattr(norm.torch, "ones", fake_ones)
    monkeypatch.setattr(norm.torch, "mm", lambda a, b, out_dtype: (a.float() @ b.float()).to(out_dtype))
    cuda = torch.device("cuda")
    assert [norm.float_out_gemm(cuda, torch.bfloat16) for _ in range(3)] == [True] * 3
    assert [norm.float_out_gemm(cuda, torch.float16) for _ in range(3)] == [False] * 3
    assert calls == [torch.bfloat16, torch.float16]  # one probe per pair
    assert not norm.float_out_gemm(cuda, torch.float32) and not norm.float_out_gemm(torch.device("cpu"), torch.bfloat16)


def test_an_error_in_a_real_step_propagates_and_leaves_the_path_on(monkeypatch):
    """A runtime error after the probe (a CUDA out-of-memory) is the caller's: nothing latches the path off."""
    monkeypatch.setattr(norm, "_FLOAT_OUT", {(torch.device("cuda"), torch.bfloat16): True})

    class OnCuda(torch.Tensor):  # a CPU tensor that reports a CUDA device, to reach the CUDA branch
        @property
        def device(self):
            return torch.device("cuda")

    def oom(a, b, out_dtype):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(norm.torch, "mm", oom)
    a = torch.ones(4, 4, dtype=torch.bfloat16).as_subclass(OnCuda)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        norm.mm_to(a, torch.ones(4, 4, dtype=torch.bfloat16), torch.float32)
    assert norm.float_out_gemm(torch.device("cuda"), torch.bfloat16)


# --- CUDA ---------------------------------------------------------------------------------------


@on_cuda
@pytest.mark.parametrize("dtype", LOW)
def test_float32_output_gemm_is_probed_on_and_keeps_the_float32_sum(dtype):
    assert norm.float_out_gemm(torch.device("cuda"), dtype)
    a, b = torch.randn(64, 256, device="cuda").to(dtype), torch.randn(256, 48, device="cuda").to(dtype)
    got = norm.mm_to(a, b, torch.float32)
    want = a.double() @ b.double()
    assert got.dtype == torch.float32
    assert rel(got, want) < 1e-6 < rel((a @ b), want)  # the low-precision output would be rounded


@on_cuda
@pytest.mark.parametrize("dtype", LOW)
def test_weight_times_at_cuda_equals_the_row_block_path(dtype):
    w = (torch.randn(512, 384, device="cuda") * 0.05).to(dtype)
    a = torch.randn(16, 384, device="cuda")
    split = norm.weight_times_at_cuda(w, a)
    blocks = norm.weight_times_at(lambda dt: norm.row_blocks(w, dt), a)  # the CPU path's float32 blocks
    want = w.double() @ a.double().T
    assert split.dtype == blocks.dtype == torch.float32
    assert rel(split, want) < 3e-6 and rel(blocks, want) < 1e-6


@on_cuda
def test_fingerprint_of_a_cuda_weight_is_the_cpu_ones():
    from svdadapt.svd import fingerprint

    w = torch.randn(300, 200)
    for t in (w, w.to(torch.bfloat16), w.T):  # contiguous, another dtype, a transposed (non-contiguous) view
        assert fingerprint(t.cuda()) == fingerprint(t.contiguous())
    assert fingerprint(w.cuda(), piece_bytes=4096) == fingerprint(w)  # many row blocks


@on_cuda
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("method", ["dude", "dora", "edora"])
def test_layer_on_a_cuda_low_precision_weight_is_within_one_rounding_of_float64(method, dtype):
    layer = adapted(method, dtype)
    x = torch.randn(4, 32, 128, device="cuda").to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and rel(y, reference(layer, x)) < TOL[dtype]
    y.float().square().sum().backward()
    trained = [p for p in layer.factors().values() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    layer.eval()
    with torch.no_grad():  # the inference path: folded factors, the same float32 sum rounded once
        torch.testing.assert_close(layer(x).float(), y.detach().float(), rtol=2**-7, atol=2**-7)


@on_cuda
@pytest.mark.parametrize("method", ["dude", "edora"])
def test_cuda_and_cpu_give_the_same_gradients(method):
    cpu = adapted(method, torch.float32, device="cpu")
    gpu = adapted(method, torch.float32, device="cuda")
    x = torch.randn(4, 128)
    for layer, xi in ((cpu, x), (gpu, x.cuda())):
        layer(xi).square().sum().backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-4, atol=1e-5, msg=name)


@on_cuda
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_kinds_on_cuda_bitsandbytes(quant):
    pytest.importorskip("bitsandbytes")
    from svdadapt.quant import quantize_linear

    torch.manual_seed(3)
    base = quantize_linear(nn.Linear(128, 64).cuda(), quant)
    model = nn.Sequential(base)
    svdadapt.apply(model, svdadapt.AdapterConfig(method="dude", r=8, target_modules=["0"], svd_cache_dir=""))
    layer = model[0]
    with torch.no_grad():
        for p in layer.factors().values():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(3, 128, device="cuda")
    y = layer(x)
    w = layer.kind.weight(layer.base_layer).float() + layer.scaling * layer.direction().detach() @ layer.lora_A.detach()
    g = layer.magnitude.detach() / w.norm(dim=1)
    # int8 on CUDA multiplies in int8 with outlier handling: within its own rounding of the dequantized weight
    tol = 1e-4 if quant == "nf4" else 3e-2
    assert rel(y, F.linear(x, w) * g + base.bias) < tol
    y.sum().backward()
    assert torch.isfinite(layer.lora_A.grad).all() and torch.isfinite(layer.magnitude.grad).all()


@on_cuda
def test_bank_on_cuda_serves_the_layers_output():
    from svdadapt.serve import AdapterBank

    layer = adapted("edora", torch.bfloat16)
    base = nn.Sequential(nn.Linear(128, 96)).to("cuda", torch.bfloat16)
    with torch.no_grad():
        base[0].weight.copy_(layer.weight)
        base[0].bias.copy_(layer.bias)
    cfg = svdadapt.AdapterConfig(method="edora", r=8, target_modules=["0"], svd_cache_dir="")
    bank = AdapterBank(base, cfg)
    bank.add_tensors("a", {"0.R": layer.lora_R.detach(), "0.magnitude": layer.magnitude.detach()}, "edora")
    x = torch.randn(1, 64, 128, device="cuda").to(torch.bfloat16)
    bank.routing.index, bank.routing.version = torch.tensor([1], device="cuda"), 1
    with torch.no_grad():
        served = bank.layers["0"](x)
    assert served.dtype == torch.bfloat16 and rel(served, reference(layer, x)) < TOL[torch.bfloat16]


@on_cuda
def test_compiled_step_on_cuda_equals_eager():
    layer = adapted("dude", torch.bfloat16)
    x = torch.randn(8, 128, device="cuda").to(torch.bfloat16)
    eager = layer(x)
    compiled = torch.compile(layer)(x)
    torch.testing.assert_close(compiled.float(), eager.detach().float(), rtol=2**-7, atol=2**-7)
