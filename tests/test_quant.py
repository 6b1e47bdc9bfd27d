"""Quantized bases: the layer on NF4 / int8 bitsandbytes linears, training, save/reload, QPiSSA."""

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from tiny import llama_config  # noqa: E402

import svdadapt  # noqa: E402
from svdadapt import AdapterConfig  # noqa: E402
from svdadapt.quant import is_quantized, load_quantized, prepare_quantized, quantize_linear  # noqa: E402

METHODS = ["lora", "dora", "pissa", "dude", "loraxs", "edora"]
QUANTS = ["nf4", "int8"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(intermediate_size=128, vocab_size=96, max_position_embeddings=32))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


def _load(path, quant):
    """The tiny Llama in float32, loaded quantized by transformers (quant given) or not."""
    kw = {}
    if quant == "nf4":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    elif quant == "int8":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu", **kw)


def _config(method, **kw):
    sigma = {"sigma": 0.1} if method in ("loraxs", "edora") else {}  # a visible R for the r×r methods
    return AdapterConfig(method=method, r=4, svd_cache_dir="", **sigma, **kw)


def _train(model, steps=3):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 10), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, params)), "training changed nothing"
    model.eval()


def _logits(model):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- the layer on a quantized base equals the reference from the dequantized weight ------------


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("method", METHODS)
def test_layer_forward_equals_dequantized_reference(method, quant):
    torch.manual_seed(3)
    base = quantize_linear(torch.nn.Linear(128, 64, bias=True), quant)
    model = torch.nn.Sequential(base)
    svdadapt.apply(model, _config(method))
    layer = model[0]
    with torch.no_grad():  # move every trained factor away from its start value, as training would
        for p in layer.factors().values():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    w = layer.kind.weight(layer.base_layer).float()  # the dequantized weight, (out, in)
    ref_w = w + layer.scaling * layer.direction().detach() @ layer.lora_A.detach()
    x = torch.randn(3, 5, 128)
    layer.train()  # int8 on CPU: train mode multiplies by the dequantized weight exactly
    y = layer(x)
    if layer.magnitude is None:
        ref = F.linear(x, ref_w, base.bias)
    else:
        g = layer.magnitude.detach() / ref_w.norm(dim=1)
        ref = F.linear(x, ref_w) * g + base.bias
        torch.testing.assert_close(layer.row_norm(), ref_w.norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    merged = layer.merged_module()
    assert type(merged) is torch.nn.Linear
    torch.testing.assert_close(merged(x), y.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", QUANTS)
def test_blockwise_weight_times_at_matches_dense(quant, monkeypatch):
    base = quantize_linear(torch.nn.Linear(128, 48, bias=False), quant)
    kind = svdadapt.kinds.base_kind(base)
    w = kind.weight(base).float()
    a = torch.randn(6, 128, requires_grad=True)
    dc = torch.randn(48, 6)
    monkeypatch.setattr(svdadapt.norm, "BLOCK_ELEMENTS", 128 * 5)  # 10 blocks of 5 rows (the last of 3)
    assert [blk.shape[0] for blk in kind.row_blocks(base, torch.float32)] == [5] * 9 + [3]
    c = svdadapt.norm.weight_times_at(lambda dtype: kind.row_blocks(base, dtype), a)
    (grad,) = torch.autograd.grad(c, a, dc)
    torch.testing.assert_close(c, w @ a.T.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, dc.T @ w, rtol=1e-5, atol=1e-5)


def test_set_weight_requantizes():
    base = quantize_linear(torch.nn.Linear(64, 32), "nf4")
    kind = svdadapt.kinds.base_kind(base)
    target = torch.randn(32, 64)
    kind.set_weight(base, target)
    q, state = bnb.functional.quantize_4bit(target, blocksize=64, compress_statistics=False, quant_type="nf4")
    torch.testing.assert_close(kind.weight(base), bnb.functional.dequantize_4bit(q, state), rtol=0, atol=0)


# --- a tiny Llama loaded quantized by transformers: train, save, reload ------------------------


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("method", METHODS)
def test_train_save_reload_on_hf_quantized_base(tiny_dir, tmp_path, method, quant):
    model = _load(tiny_dir, quant)
    assert is_quantized(model)
    svdadapt.apply(model, _config(method))
    kinds = {layer.kind.__name__ for _, layer in svdadapt.adapter_layers(model)}
    assert kinds == {"Linear4bitKind" if quant == "nf4" else "Linear8bitKind"}
    _train(model)
    expected = _logits(model)
    svdadapt.save_adapter(model, tmp_path / "a")
    fresh = svdadapt.load_adapter(_load(tiny_dir, quant), tmp_path / "a")
    torch.testing.assert_close(_logits(fresh), expected, rtol=0, atol=0)


def test_compact_edora_reloads_on_quantized_base(tiny_dir, tmp_path):
    model = _load(tiny_dir, "nf4")
    svdadapt.apply(model, _config("edora"))
    _train(model, steps=2)
    svdadapt.save_adapter(model, tmp_path / "a", compact=True)
    fresh = svdadapt.load_adapter(_load(tiny_dir, "nf4"), tmp_path / "a")
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=1e-6, atol=1e-6)


def test_quantized_base_refused_for_full_precision_adapter(tiny_dir, tmp_path):
    model = _load(tiny_dir, None)
    svdadapt.apply(model, _config("edora"))
    svdadapt.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        svdadapt.load_adapter(_load(tiny_dir, "nf4"), tmp_path / "a")


# --- QPiSSA: the residual is what gets quantized ----------------------------------------------


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("method", ["pissa", "dude"])
def test_prepare_quantized_stores_quantized_residual(tiny_dir, tmp_path, method, quant):
    full = _load(tiny_dir, None)
    w0 = {n: m.weight.detach().clone() for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}
    model = prepare_quantized(full, _config(method), quant)
    layers = svdadapt.adapter_layers(model)
    assert layers and all(is_quantized(layer.base_layer) for _, layer in layers)
    for name, layer in layers:
        res = w0[name] - layer.scaling * layer.init_B @ layer.init_A  # the residual in full precision
        if quant == "nf4":
            q, state = bnb.functional.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
            want = bnb.functional.dequantize_4bit(q, state)
        else:
            cb, scb, _ = bnb.functional.int8_vectorwise_quant(res.half())
            want = cb.float() * (scb[:, None] / 127)
        torch.testing.assert_close(layer.weight.float(), want, rtol=1e-6, atol=1e-6)
        if method == "dude":  # m keeps the full-precision row norms of W0
            torch.testing.assert_close(layer.magnitude.detach(), w0[name].norm(dim=1), rtol=1e-5, atol=1e-6)
    assert isinstance(model.lm_head, torch.nn.Linear) and not is_quantized(model.lm_head)
    _train(model)
    svdadapt.save_adapter(model, tmp_path / "a")
    fresh = load_quantized(_load(tiny_dir, None), tmp_path / "a", quant)
    assert is_quantized(fresh)
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["edora", "lora"])
def test_prepare_quantized_non_residual_matches_hf_quantized(tiny_dir, method):
    ours = prepare_quantized(_load(tiny_dir, None), _config(method), "nf4")
    theirs = svdadapt.apply(_load(tiny_dir, "nf4"), _config(method))
    for (n1, l1), (n2, l2) in zip(svdadapt.adapter_layers(ours), svdadapt.adapter_layers(theirs)):
        assert n1 == n2 and l1.base_fingerprint == l2.base_fingerprint
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)


def test_prepare_quantized_rejects_unknown_quantization(tiny_dir):
    with pytest.raises(ValueError, match=r"quantization='fp8' is invalid"):
        prepare_quantized(_load(tiny_dir, None), _config("lora"), "fp8")


def test_residual_on_prequantized_base_warns(tiny_dir):
    with pytest.warns(UserWarning, match="two rounding errors"):
        prepare_quantized(_load(tiny_dir, "nf4"), _config("pissa"), "nf4")


def test_import_registers_nothing_and_a_bitsandbytes_layer_brings_its_kind():
    import subprocess
    import sys

    code = """
import sys, torch, bitsandbytes as bnb, svdadapt
assert "svdadapt.quant" not in sys.modules, "import svdadapt registered the quantized kinds"
lin = torch.nn.Linear(64, 32)
q = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
q.weight = bnb.nn.Int8Params(lin.weight.data.half(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
model = svdadapt.apply(torch.nn.Sequential(q), svdadapt.AdapterConfig(method="edora", r=4, target_modules=["0"], svd_cache_dir=""))
print(model[0].kind.__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "Linear8bitKind"
