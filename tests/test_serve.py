"""AdapterBank: every row of a mixed batch equals its adapter run alone through the normal model."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from tiny import llama_config  # noqa: E402

import svdadapt  # noqa: E402
from svdadapt import AdapterConfig  # noqa: E402
from svdadapt.serve import AdapterBank, benchmark_bank  # noqa: E402

VOCAB = 80


def _base(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(vocab_size=VOCAB)).eval()


def _config(method="edora", **kw):
    return AdapterConfig(method=method, r=4, svd_cache_dir="", **kw)


def _adapter(method, seed, config=None):
    """An adapted copy of the base with R and m moved away from their start values (as training would)."""
    model = svdadapt.apply(_base(), config or _config(method))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in svdadapt.adapter_layers(model):
            layer.lora_R.copy_(torch.randn(layer.lora_R.shape, generator=gen) * 0.3)
            if layer.magnitude is not None:
                layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=gen))
    return model.eval()


def _ids(batch, seq=9, seed=5):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Four adapters: edora saved compact, edora saved full, loraxs saved compact, edora in memory."""
    root = tmp_path_factory.mktemp("bank")
    models = {"a": _adapter("edora", 1), "b": _adapter("edora", 2), "c": _adapter("loraxs", 3), "d": _adapter("edora", 4)}
    svdadapt.save_adapter(models["a"], root / "a", compact=True)
    svdadapt.save_adapter(models["b"], root / "b")
    svdadapt.save_adapter(models["c"], root / "c", compact=True)
    sources = {"a": root / "a", "b": root / "b", "c": root / "c", "d": models["d"]}
    return models, sources


def _bank(sources, names):
    bank = AdapterBank(_base(), _config()).eval()
    for n in names:
        bank.add(n, sources[n])
    return bank


def test_mixed_batch_rows_equal_adapters_alone(adapters):
    models, sources = adapters
    bank = _bank(sources, "abcd")
    order = ["a", "c", None, "b", "d", "a"]
    ids = _ids(len(order))
    with torch.no_grad():
        mixed = bank(ids, order).logits
        for row, name in enumerate(order):
            alone = (models[name] if name else _base())(input_ids=ids[row : row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], alone, rtol=1e-5, atol=1e-5)


def test_reloaded_adapter_equals_bank_row(adapters, tmp_path):
    _, sources = adapters
    bank = _bank(sources, "a")
    ids = _ids(2)
    alone = svdadapt.load_adapter(_base(), sources["a"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(bank(ids, ["a", "a"]).logits, alone(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_add_and_remove_leave_others_untouched(adapters):
    _, sources = adapters
    bank = _bank(sources, "ab")
    ids = _ids(3)
    with torch.no_grad():
        before = bank(ids, ["a", "b", None]).logits
        bank.add("c", sources["c"])
        bank.add("d", sources["d"])  # grows the slot stacks
        after_add = bank(ids, ["a", "b", None]).logits
        bank.remove("a")
        after_remove = bank(ids[1:], ["b", None]).logits
        bank.add("a2", sources["a"])  # reuses a's slot
        again = bank(ids, ["a2", "b", None]).logits
    torch.testing.assert_close(after_add, before, rtol=0, atol=0)
    torch.testing.assert_close(after_remove, before[1:], rtol=0, atol=0)
    torch.testing.assert_close(again, before, rtol=0, atol=0)
    assert bank.names() == ["a2", "b", "c", "d"]
    with pytest.raises(ValueError, match=r"unknown adapter ids \['a'\]"):
        bank(ids, ["a", "b", None])


def test_generate_follows_each_prompts_adapter(adapters):
    models, sources = adapters
    bank = _bank(sources, "ab")
    ids = _ids(2, seq=5)
    out = bank.generate(ids, ["a", "b"], max_new_tokens=4, do_sample=False, pad_token_id=0)
    for row, name in enumerate("ab"):
        alone = models[name].generate(ids[row : row + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row], alone[0])


def test_bank_refuses_adapters_it_cannot_share(adapters, tmp_path):
    _, sources = adapters
    bank = _bank(sources, "")
    other_rank = _adapter("edora", 7, AdapterConfig(method="edora", r=2, svd_cache_dir=""))
    with pytest.raises(ValueError, match=r"its r=2 differs from the bank's 4"):
        bank.add("x", other_rank)
    dude = svdadapt.apply(_base(), _config("dude"))
    with pytest.raises(ValueError, match="a dude adapter cannot join a bank"):
        bank.add("y", dude)
    other_base = svdadapt.apply(_base(seed=9), _config())
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        bank.add("z", other_base)
    bank.add("a", sources["a"])
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add("a", sources["a"])
    with pytest.raises(ValueError, match="adapter_ids has 1 entries for a batch of 2"):
        bank(_ids(2), ["a"])


def test_bytes_per_adapter_is_r_squared_plus_out_per_layer(adapters):
    _, sources = adapters
    bank = _bank(sources, "a")
    layers = svdadapt.adapter_layers(sources["d"])
    assert bank.bytes_per_adapter() == sum(4 * 4 + layer.out_features for _, layer in layers) * 4


def test_benchmark_bank_quick_reports_figures():
    res = benchmark_bank(quick=True)
    assert res["adapters"] == 100 and res["distinct_adapters_in_batch"] == res["batch"]
    assert res["bytes_per_adapter"] == res["expected_bytes_per_adapter"] < res["lora_bytes_per_adapter"]
    assert res["throughput_ratio"] > 0


def test_bank_on_nf4_base_equals_adapter_alone():
    pytest.importorskip("bitsandbytes")
    from svdadapt.quant import quantize_model

    alone = quantize_model(_base(), "nf4", _config())  # edora on the quantized base
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, layer in svdadapt.adapter_layers(alone):
            layer.lora_R.copy_(torch.randn(layer.lora_R.shape, generator=gen) * 0.3)
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=gen))
    bank = AdapterBank(quantize_model(_base(), "nf4"), _config()).eval()
    bank.add("q", alone)
    ids = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(bank(ids, ["q", "q"]).logits, alone.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_two_threads_serving_one_bank_keep_their_own_batches(adapters):
    """Thread A pauses inside its forward while thread B runs a whole call with other adapters."""
    import threading

    _, sources = adapters
    bank = _bank(sources, ["a", "b"])
    ids = _ids(2)
    with torch.no_grad():
        want_a, want_b = bank(ids, ["a", "b"]).logits, bank(ids, ["b", None]).logits
    layers = list(bank.layers.values())
    b_done, got = threading.Event(), {}

    def pause_in_a(module, args):
        if threading.current_thread().name == "A" and not b_done.is_set():
            b_done.wait(timeout=60)

    handle = layers[len(layers) // 2].register_forward_pre_hook(pause_in_a)

    def call(name, adapter_ids):
        with torch.no_grad():
            got[name] = bank(ids, adapter_ids).logits
        if name == "B":
            b_done.set()

    try:
        a = threading.Thread(target=call, args=("A", ["a", "b"]), name="A")
        b = threading.Thread(target=call, args=("B", ["b", None]), name="B")
        a.start()
        b.start()
        b.join(timeout=120)
        a.join(timeout=120)
    finally:
        handle.remove()
    assert b_done.is_set()
    torch.testing.assert_close(got["A"], want_a, rtol=0, atol=0)
    torch.testing.assert_close(got["B"], want_b, rtol=0, atol=0)


def test_bank_takes_a_file_with_version_1_fingerprints_and_checks_it(adapters, tmp_path):
    import json
    import shutil

    from svdadapt.svd import legacy_fingerprint

    _, sources = adapters
    d = tmp_path / "old"
    shutil.copytree(sources["a"], d)
    meta = json.loads((d / "adapter_config.json").read_text())
    meta.pop("tensor_checksums"), meta.pop("field_checksums")  # as old files: written before checksums
    base = _base()
    for name, info in meta["layers"].items():
        info["fingerprint"] = legacy_fingerprint(base.get_submodule(name).weight)
    (d / "adapter_config.json").write_text(json.dumps(meta))
    bank = _bank(sources, ["a"])
    with pytest.warns(UserWarning, match="no checksums"):
        bank.add("old", d)
    with torch.no_grad():
        torch.testing.assert_close(bank(_ids(1), ["old"]).logits, bank(_ids(1), ["a"]).logits, rtol=0, atol=0)
    first = next(iter(meta["layers"]))
    meta["layers"][first]["fingerprint"] = "0" * 64
    (d / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=rf"layer '{first}' was trained on another base weight"):
        bank.add("wrong", d)
