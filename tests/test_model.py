"""The model API on tiny transformers models and a custom module, for every method."""

import copy

import pytest
import torch
from tiny import VOCAB, build, llama_config, output, train_steps
from torch import nn

import svdadapt
from svdadapt import svd as S
from svdadapt.layer import _UNCHECKED, AdapterLayer
from svdadapt.methods import get_method

METHODS = ["lora", "dora", "pissa", "dude", "loraxs", "edora"]
KINDS = ["llama", "mistral", "roberta", "gpt2", "custom"]


def ids(n=2, t=12, seed=0):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_apply_train_merge_save_load_export(kind, method, tmp_path):
    from peft import PeftModel

    base, kw = build(kind)
    pristine = copy.deepcopy(base)
    cfg = svdadapt.AdapterConfig(method=method, r=4, **kw)
    model = svdadapt.apply(base, cfg)
    x = ids()
    train_steps(model, x)
    with torch.no_grad():
        y = output(model, x)
        assert not torch.allclose(y, output(pristine.eval(), x), atol=1e-4)  # training moved the adapter

    for compact in (False, True):
        svdadapt.save_adapter(model, tmp_path / f"a{compact}", compact=compact)
        fresh = svdadapt.load_adapter(copy.deepcopy(pristine), tmp_path / f"a{compact}").eval()
        with torch.no_grad():
            torch.testing.assert_close(output(fresh, x), y, rtol=0, atol=0)

    svdadapt.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(peft_model, x), y, rtol=1e-4, atol=1e-4)

    merged = svdadapt.merge(model)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(output(merged, x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["edora", "dude"])
def test_merged_model_round_trips_through_save_pretrained(method, tmp_path):
    from transformers import AutoModelForCausalLM

    model, kw = build("llama")
    svdadapt.apply(model, svdadapt.AdapterConfig(method=method, r=4, **kw))
    x = ids()
    train_steps(model, x)
    with torch.no_grad():
        y = output(model, x)
    svdadapt.merge(model).save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(again, x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["edora", "dude"])
def test_generation_with_kv_cache_equals_merged_greedy(method):
    model, kw = build("llama")
    svdadapt.apply(model, svdadapt.AdapterConfig(method=method, r=4, **kw))
    train_steps(model, ids(), lr=5e-2)
    prompt = ids(1, 5, seed=1)
    kwargs = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    adapted = model.generate(prompt, **kwargs)
    merged = svdadapt.merge(copy.deepcopy(model)).generate(prompt, **kwargs)
    assert adapted.shape[1] == 17 and adapted.equal(merged)


def _layer_calls(model, x):
    """Per adapter layer, whether its call inside `model(x)` (no grad) skipped its own fold check."""
    seen = []
    real = AdapterLayer._current

    def counting(self, k):
        seen.append(self)
        return real(self, k)

    AdapterLayer._current = counting
    try:
        with torch.no_grad():
            out = output(model, x)
    finally:
        AdapterLayer._current = real
    return out, seen


def test_a_model_call_checks_every_fold_once_and_sees_changes_between_calls():
    """The pre-hook `apply` installs checks all folds once a call; a change between calls (in place,
    or a parameter replaced) is seen on the next, and each output equals a fresh training-mode one."""
    model, kw = build("llama")
    svdadapt.apply(model, svdadapt.AdapterConfig(method="dude", r=4, **kw))
    train_steps(model, ids())
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    x = ids()

    def fresh():
        model.train()
        with torch.no_grad():
            y = output(model, x)
        model.eval()
        return y

    _, seen = _layer_calls(model, x)  # the first call folds (each layer in its own call)
    out, seen = _layer_calls(model, x)
    assert len(seen) == len(layers) and set(map(id, seen)) == set(map(id, layers))  # once each
    tokens = {id(m._checked) for m in layers}
    assert len(tokens) == 1 and layers[0]._checked is not _UNCHECKED  # by the pre-hook, with one token
    torch.testing.assert_close(out, fresh(), rtol=1e-5, atol=1e-6)
    _layer_calls(model, x)  # fold again after the train-mode call
    with torch.no_grad():
        layers[3].lora_B.mul_(3.0)  # in place, between calls
    changed, _ = _layer_calls(model, x)
    assert not torch.allclose(changed, out)
    torch.testing.assert_close(changed, fresh(), rtol=1e-5, atol=1e-6)
    _layer_calls(model, x)
    layers[5].magnitude = nn.Parameter(layers[5].magnitude.detach() * 0.5)  # replaced
    replaced, _ = _layer_calls(model, x)
    assert not torch.allclose(replaced, changed)
    torch.testing.assert_close(replaced, fresh(), rtol=1e-5, atol=1e-6)


def test_a_layer_called_alone_after_a_model_call_checks_its_own_fold():
    model, kw = build("llama")
    svdadapt.apply(model, svdadapt.AdapterConfig(method="edora", r=4, **kw))
    train_steps(model, ids())
    layer = next(m for m in model.modules() if isinstance(m, AdapterLayer))
    with torch.no_grad():
        output(model, ids())
        output(model, ids())  # layer now holds a token from a finished call
        layer.lora_R.add_(0.5)
        x = torch.randn(2, layer.in_features)
        alone = layer(x)
    layer.train()
    torch.testing.assert_close(alone, layer(x).detach(), rtol=1e-6, atol=1e-6)


def test_gradients_on_in_eval_mode_still_reach_the_factors():
    model, kw = build("llama")
    svdadapt.apply(model, svdadapt.AdapterConfig(method="dude", r=4, **kw))
    model.eval()
    with torch.no_grad():
        output(model, ids())
        output(model, ids())
    output(model, ids()).pow(2).mean().backward()
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert all(m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0 for m in layers)


def test_merge_and_deepcopy_carry_the_fold_check_as_they_should():
    from svdadapt.layer import FoldCheck

    def checks(m):
        hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
        return [h.__self__ for h in hooks if isinstance(getattr(h, "__self__", None), FoldCheck)]

    model, kw = build("llama")
    svdadapt.apply(model, svdadapt.AdapterConfig(method="dora", r=4, **kw))
    twin = copy.deepcopy(model)
    (check,) = set(checks(twin))
    ours = {id(m) for m in twin.modules() if isinstance(m, AdapterLayer)}
    assert {id(m) for m in check.layers} == ours  # the copy checks its own layers, not the original's
    svdadapt.merge(model)
    assert checks(model) == []


@pytest.mark.parametrize("method", METHODS)
def test_trainable_counts_equal_the_closed_form(method):
    model, kw = build("llama")
    total_before = sum(p.numel() for p in model.parameters())
    svdadapt.apply(model, svdadapt.AdapterConfig(method=method, r=4, **kw))
    r = 4
    per_layer = {
        "lora": lambda o, i: r * (i + o),
        "dora": lambda o, i: r * (i + o) + o,
        "pissa": lambda o, i: r * (i + o),
        "dude": lambda o, i: r * (i + o) + o,
        "loraxs": lambda o, i: r * r,
        "edora": lambda o, i: r * r + o,
    }[method]
    want = sum(per_layer(m.out_features, m.in_features) for _, m in svdadapt.adapter_layers(model))
    count = svdadapt.trainable_parameters(model)
    trainable, total = count
    assert trainable == want and len(count.layers) == 14
    assert total == total_before + sum(sum(p.numel() for p in m.factors().values()) for _, m in svdadapt.adapter_layers(model))
    assert f"trainable params: {want:,}" in str(count) and "model.layers.1.mlp.down_proj" in count.report()


def test_count_plan_on_meta_device_matches_apply():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    acfg = svdadapt.AdapterConfig(method="edora", r=8, target_modules=["q_proj", "v_proj"])
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    plan = svdadapt.model.count_plan(meta, acfg)
    torch.manual_seed(0)
    real = svdadapt.apply(LlamaForCausalLM(cfg), acfg)
    assert plan.trainable == svdadapt.trainable_parameters(real).trainable == 2 * (2 * (8 * 8 + 64) - 64 + 32)
    # the frozen factors (edora's A and B) count in both totals: `svdadapt count` and `apply` print one percentage
    assert plan.total == svdadapt.trainable_parameters(real).total
    assert f"{plan.percent:.3f}" == f"{svdadapt.trainable_parameters(real).percent:.3f}"


def test_target_modules_forms_select_the_same_layers():
    by_suffix, _ = build("llama")
    by_regex, _ = build("llama")
    svdadapt.apply(by_suffix, svdadapt.AdapterConfig(method="lora", r=2, target_modules=["q_proj", "v_proj"]))
    svdadapt.apply(by_regex, svdadapt.AdapterConfig(method="lora", r=2, target_modules=r".*\.(q|v)_proj"))
    assert [n for n, _ in svdadapt.adapter_layers(by_suffix)] == [n for n, _ in svdadapt.adapter_layers(by_regex)]
    all_linear, _ = build("llama")
    svdadapt.apply(all_linear, svdadapt.AdapterConfig(method="lora", r=2))
    names = [n for n, _ in svdadapt.adapter_layers(all_linear)]
    assert len(names) == 14 and "lm_head" not in names


def test_modules_to_save_stay_trainable_and_are_saved(tmp_path):
    model, kw = build("roberta")
    svdadapt.apply(model, svdadapt.AdapterConfig(method="edora", r=4, **kw))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.dense.weight", "classifier.out_proj.bias"} <= trainable
    assert not any(n.startswith("roberta.embeddings") for n in trainable)
    assert not any(isinstance(m, AdapterLayer) for m in model.classifier.modules())
    svdadapt.save_adapter(model, tmp_path / "a", compact=True)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "a" / "adapter.safetensors"))
    assert "classifier.out_proj.weight" in keys
    assert {k.rsplit(".", 1)[1] for k in keys if "layer." in k} == {
        "R",
        "magnitude",
        "basis_check",
    }  # what trained, and the check


# --- bad input: a message that names the thing and the fix, and the model left untouched ----


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return set(after) == set(before) and all(after[k].equal(before[k]) for k in before)


def test_targets_that_match_nothing_list_existing_names():
    model, _ = build("llama")
    before = _state(model)
    with pytest.raises(ValueError, match=r"target_modules=\['query'\] matches no supported layer.*'q_proj'"):
        svdadapt.apply(model, svdadapt.AdapterConfig(method="edora", r=4, target_modules=["query"]))
    assert _unchanged(model, before) and all(p.requires_grad for p in model.parameters())


def test_applying_twice_is_refused():
    model, kw = build("llama")
    svdadapt.apply(model, svdadapt.AdapterConfig(method="edora", r=4, **kw))
    before = _state(model)
    with pytest.raises(ValueError, match="already has svdadapt adapters"):
        svdadapt.apply(model, svdadapt.AdapterConfig(method="lora", r=4, **kw))
    assert _unchanged(model, before)


def test_modules_to_save_that_match_nothing():
    model, kw = build("llama")
    with pytest.raises(
        ValueError, match=r"modules_to_save entry 'classifier' matches no module; top-level modules: \['model', 'lm_head'\]"
    ):
        svdadapt.apply(
            model, svdadapt.AdapterConfig(method="edora", r=4, target_modules=["q_proj"], modules_to_save=["classifier"])
        )


def _saved(tmp_path, method="edora", compact=True):
    model, kw = build("llama")
    svdadapt.apply(model, svdadapt.AdapterConfig(method=method, r=4, **kw))
    train_steps(model, ids())
    return svdadapt.save_adapter(model, tmp_path / "adapter", compact=compact)


def test_loading_onto_a_different_base_names_the_layer(tmp_path):
    d = _saved(tmp_path)
    other, _ = build("llama", seed=1)
    before = _state(other)
    with pytest.raises(ValueError, match=r"the base weight of layer 'model.layers.0.self_attn.q_proj' differs.*fingerprint"):
        svdadapt.load_adapter(other, d)
    assert _unchanged(other, before)


def test_loading_onto_the_same_weights_in_another_dtype_names_the_trained_one(tmp_path):
    """An adapter trained on bf16 weights (as DeepSpeed ZeRO-3 with bf16 holds a float32 model) and loaded
    onto the float32 original: the error says to load in bfloat16; in bfloat16 it loads."""
    model, kw = build("llama")
    model.to(torch.bfloat16)
    svdadapt.apply(model, svdadapt.AdapterConfig(method="dude", r=4, **kw))
    d = svdadapt.save_adapter(model, tmp_path / "adapter")
    fp32, _ = build("llama")
    before = _state(fp32)
    with pytest.raises(
        ValueError,
        match=r"trained on this model's weights in bfloat16 .*'model.layers.0.self_attn.q_proj'.*"
        r"float32 here\. Load the model in bfloat16",
    ):
        svdadapt.load_adapter(fp32, d)
    assert _unchanged(fp32, before)
    svdadapt.load_adapter(fp32.to(torch.bfloat16), d)  # the same weights in the trained dtype pass the check
    x = ids()
    with torch.no_grad():
        assert torch.equal(output(fp32, x), output(model, x))


@pytest.mark.parametrize("method", ["edora", "dude"])
def test_a_file_with_version_1_fingerprints_still_loads_and_is_checked(method, tmp_path):
    """Files written before fingerprints carried a version hold a bare sha256: they load, are checked
    against the base, and a re-save writes the current version."""
    import json

    from svdadapt.svd import legacy_fingerprint

    d = _saved(tmp_path, method, compact=False)
    base, _ = build("llama")
    want = output(svdadapt.load_adapter(copy.deepcopy(base), d), ids())
    meta = json.loads((d / "adapter_config.json").read_text())
    meta.pop("tensor_checksums"), meta.pop("field_checksums")  # as old files: written before checksums
    for name, info in meta["layers"].items():
        assert info["fingerprint"].startswith("v2-")
        info["fingerprint"] = legacy_fingerprint(base.get_submodule(name).weight)
    (d / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no checksums"):
        model = svdadapt.load_adapter(base, d)
    torch.testing.assert_close(output(model, ids()), want, rtol=0, atol=0)
    resaved = json.loads((svdadapt.save_adapter(model, tmp_path / "again") / "adapter_config.json").read_text())
    assert all(info["fingerprint"].startswith("v2-") for info in resaved["layers"].values())
    other, _ = build("llama", seed=1)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' differs"):
        svdadapt.load_adapter(other, d)
    meta["layers"]["model.layers.0.self_attn.q_proj"]["fingerprint"] = "v7-0123"
    (d / "adapter_config.json").write_text(json.dumps(meta))
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=r"json, layer 'model.layers.0.self_attn.q_proj'.*unknown version"),
    ):
        svdadapt.load_adapter(build("llama")[0], d)


def test_loading_onto_a_different_shape_names_the_layer(tmp_path):
    import transformers as tf

    d = _saved(tmp_path)
    wide = tf.LlamaForCausalLM(llama_config(intermediate_size=128))
    with pytest.raises(
        ValueError, match=r"layer 'model.layers.0.mlp.gate_proj' has shape \(128, 64\) in the model but \(96, 64\)"
    ):
        svdadapt.load_adapter(wide, d)
    deeper = tf.LlamaForCausalLM(llama_config(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"target layers the adapter lacks: \['model.layers.2"):
        svdadapt.load_adapter(deeper, d)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_weights_file(tmp_path, damage):
    d = _saved(tmp_path)
    f = d / "adapter.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    model, _ = build("llama")
    before = _state(model)
    with pytest.raises(ValueError, match=r"adapter.safetensors is truncated or corrupted.*save the adapter again"):
        svdadapt.load_adapter(model, d)
    assert _unchanged(model, before)


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter.safetensors"])
def test_missing_file(tmp_path, missing):
    d = _saved(tmp_path)
    (d / missing).unlink()
    with pytest.raises(ValueError, match=rf"has no {missing}; it is incomplete"):
        svdadapt.load_adapter(build("llama")[0], d)


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match=r"adapter directory .*nowhere' does not exist"):
        svdadapt.load_adapter(build("llama")[0], tmp_path / "nowhere")


def test_tensor_shape_mismatch_in_file(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    d = _saved(tmp_path)
    t = load_file(d / "adapter.safetensors")
    k = next(k for k in t if k.endswith(".R"))
    t[k] = torch.zeros(3, 3)
    save_file(t, d / "adapter.safetensors")
    meta = json.loads((d / "adapter_config.json").read_text())
    meta.pop("tensor_checksums"), meta.pop("field_checksums")  # an old file (a new one fails its checksum first)
    (d / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=rf"tensor '{k}' has shape \(3, 3\), expected \(4, 4\)"):
        svdadapt.load_adapter(build("llama")[0], d)


def test_save_is_atomic_and_replaces(tmp_path, monkeypatch):
    d = _saved(tmp_path)
    first = (d / "adapter.safetensors").read_bytes()
    model, kw = build("llama")
    svdadapt.apply(model, svdadapt.AdapterConfig(method="edora", r=4, **kw))
    import svdadapt.io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        svdadapt.save_adapter(model, d)
    assert (d / "adapter.safetensors").read_bytes() == first  # the old adapter survives a failed save
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left behind


def test_method_options_round_trip_through_the_config_file(tmp_path):
    import json

    model, kw = build("llama")
    cfg = svdadapt.AdapterConfig(method="edora", r=4, sigma=1e-3, singular_values_on="A", norm="exact", **kw)
    svdadapt.apply(model, cfg)
    d = svdadapt.save_adapter(model, tmp_path / "a", compact=True, base_model="tiny-llama")
    meta = json.loads((d / "adapter_config.json").read_text())
    assert (
        meta["base_model"] == "tiny-llama"
        and meta["base_rewritten"] is False
        and meta["svdadapt_version"] == svdadapt.__version__
    )
    assert svdadapt.AdapterConfig.from_dict(meta["config"]) == cfg
    assert all(v["fingerprint"] == S.fingerprint(model.get_submodule(n).weight) for n, v in meta["layers"].items())
    assert (
        get_method("dude").residual
        and json.loads(
            (
                svdadapt.save_adapter(
                    svdadapt.apply(build("llama")[0], svdadapt.AdapterConfig(method="dude", r=4)), tmp_path / "b"
                )
                / "adapter_config.json"
            ).read_text()
        )["base_rewritten"]
    )


def test_modules_to_save_are_never_wrapped():
    model, _ = build("roberta")
    svdadapt.apply(model, svdadapt.AdapterConfig(method="lora", r=4, target_modules=["dense"], modules_to_save=["classifier"]))
    assert isinstance(model.classifier.dense, nn.Linear) and model.classifier.dense.weight.requires_grad
    assert isinstance(model.roberta.encoder.layer[0].output.dense, AdapterLayer)


def test_custom_module_needs_no_transformers():
    model, kw = build("custom")
    svdadapt.apply(model, svdadapt.AdapterConfig(method="edora", r=4, **kw))
    assert isinstance(model.up, AdapterLayer) and isinstance(model.head, nn.Linear) and model.head.weight.requires_grad
