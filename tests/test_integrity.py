"""Adapter files check themselves: damaged or non-finite tensors, and a config that contradicts them, are refused by name."""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import VOCAB, build, output, train_steps

import svdadapt
from svdadapt.svd import fingerprint


def _ids():
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def saved(tmp_path):
    """(base, directory, adapted model) for a trained edora adapter of the custom module with a head, `compact` chosen."""

    def make(compact=True, method="edora", before_save=None):
        base, kw = build("custom")
        model = svdadapt.apply(copy.deepcopy(base), svdadapt.AdapterConfig(method=method, r=4, svd_cache_dir="", **kw))
        train_steps(model, _ids(), steps=2)
        if before_save:
            before_save(model)
        return base, svdadapt.save_adapter(model, tmp_path / f"a{compact}{method}", compact=compact), model

    return make


def _meta(d):
    return json.loads((d / "adapter_config.json").read_text())


def _write_meta(d, meta):
    (d / "adapter_config.json").write_text(json.dumps(meta))


def _as_old_file(d):
    """Strip the checksums, as a file saved before they were written."""
    meta = _meta(d)
    meta.pop("tensor_checksums"), meta.pop("field_checksums")
    _write_meta(d, meta)


def _refused_by_checksum_then_by_tensors(base, d, by_checksum: str, by_tensors: str):
    """The edited file is refused by its field checksums; as an old file without them, by what its tensors say."""
    with pytest.raises(ValueError, match=by_checksum):
        _load(base, d)
    _as_old_file(d)  # without checksums the tensors themselves contradict the edit
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=by_tensors):
        _load(base, d)


def _load(base, d):
    return svdadapt.load_adapter(copy.deepcopy(base), d)


def test_every_tensor_and_field_has_a_checksum_and_the_file_loads_exactly(saved):
    base, d, model = saved()
    meta, tensors = _meta(d), load_file(d / "adapter.safetensors")
    assert meta["tensor_checksums"] == {k: fingerprint(v) for k, v in tensors.items()}
    assert {"compact", "layers", "modules_to_save", "config.alpha", "config.r"} <= set(meta["field_checksums"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = _load(base, d)
    with torch.no_grad():
        torch.testing.assert_close(output(fresh.eval(), _ids()), output(model.eval(), _ids()), rtol=0, atol=0)


def test_a_flipped_byte_is_refused_by_tensor_and_file(saved):
    base, d, _ = saved()
    f = d / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data
    f.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=r"adapter.safetensors: tensor '.+' \(1 in all\) does not match its checksum.*Copy it again"
    ):
        _load(base, d)


def test_a_non_finite_tensor_is_refused_even_with_a_matching_checksum(saved):
    """As a diverged run would have written it: NaN in the tensor and its checksum computed from the NaN."""
    base, d, _ = saved()
    f = d / "adapter.safetensors"
    tensors = load_file(f)
    tensors["up.R"] = torch.full_like(tensors["up.R"], float("nan"))
    save_file(tensors, f)
    meta = _meta(d)
    meta["tensor_checksums"]["up.R"] = fingerprint(tensors["up.R"])
    _write_meta(d, meta)
    with pytest.raises(ValueError, match=r"tensor 'up.R' has 16 non-finite values \(NaN or inf\).*earlier checkpoint"):
        _load(base, d)
    _as_old_file(d)  # without checksums too
    with pytest.warns(UserWarning, match="no checksums"), pytest.raises(ValueError, match="'up.R' has 16 non-finite"):
        _load(base, d)


def test_missing_and_extra_tensors_are_named(saved):
    base, d, _ = saved()
    f = d / "adapter.safetensors"
    tensors = load_file(f)
    save_file({k: v for k, v in tensors.items() if k != "down.magnitude"}, f)
    with pytest.raises(ValueError, match=r"lacks tensors \['down.magnitude'\] \(1 in all\) that adapter_config.json lists"):
        _load(base, d)
    save_file({**tensors, "stowaway": torch.zeros(2)}, f)
    with pytest.raises(ValueError, match=r"holds tensors \['stowaway'\] \(1 in all\) that adapter_config.json does not list"):
        _load(base, d)
    _as_old_file(d)
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=r"holds tensors \['stowaway'\].*no module of modules_to_save"),
    ):
        _load(base, d)


def test_an_old_file_without_checksums_loads_with_one_warning(saved):
    base, d, model = saved()
    _as_old_file(d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = _load(base, d)
    assert [str(w.message) for w in caught if "checksums" in str(w.message)] == [
        f"{d / 'adapter_config.json'} has no checksums (saved by svdadapt before they were written): damaged tensors, "
        "edited config values and deleted fingerprints cannot be detected. Save the adapter again to add them"
    ]
    assert len(caught) == 1
    with torch.no_grad():
        torch.testing.assert_close(output(fresh.eval(), _ids()), output(model.eval(), _ids()), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(config=None), r"'config' is null, it must be an object.*save the adapter again"),
        (lambda m: m.update(format="2"), r"format '2' is not a format number.*this svdadapt writes 1"),
        (lambda m: m.update(format=2), r"has format 2 from svdadapt .*; upgrade svdadapt"),
        (lambda m: m.update(layers=[]), r"'layers' is \[\], it must be an object"),
        (lambda m: m.update(comment="mine"), r"unknown entries \['comment'\].*Remove them if they were added by hand"),
        (lambda m: m["config"].update(quantum_rank=3), r"the config has unknown keys \['quantum_rank'\]; known keys"),
    ],
    ids=["config-null", "format-string", "format-newer", "layers-list", "unknown-entry", "unknown-config-key"],
)
def test_a_malformed_config_file_is_refused_by_name(saved, edit, message):
    base, d, _ = saved()
    meta = _meta(d)
    edit(meta)
    _write_meta(d, meta)
    with pytest.raises(ValueError, match=message):
        _load(base, d)


def test_an_edited_alpha_is_refused(saved):
    base, d, _ = saved()
    meta = _meta(d)
    meta["config"]["alpha"] = 1600
    _write_meta(d, meta)
    with pytest.raises(ValueError, match=r"config.alpha = 1600: changed after the adapter was saved.*Restore the saved value"):
        _load(base, d)
    del meta["config"]["alpha"]
    _write_meta(d, meta)
    with pytest.raises(ValueError, match=r"config.alpha was removed: changed after"):
        _load(base, d)


def test_emptied_modules_to_save_would_drop_the_head_and_is_refused(saved):
    base, d, _ = saved()
    meta = _meta(d)
    meta["config"]["modules_to_save"] = []
    _write_meta(d, meta)
    _refused_by_checksum_then_by_tensors(
        base,
        d,
        r"config.modules_to_save = \[\]: changed after",
        r"holds tensors \['head.bias', 'head.weight'\].*modules_to_save = \[\]\), so a trained head would be dropped",
    )


def test_deleted_fingerprints_are_refused_unless_the_file_never_had_them(saved):
    base, d, _ = saved()
    meta = _meta(d)
    for info in meta["layers"].values():
        del info["fingerprint"]
    _write_meta(d, meta)
    with pytest.raises(
        ValueError, match=r"fingerprints of layers \['up', 'gate', 'down'\] \(3 in all\) were deleted after saving"
    ):
        _load(base, d)

    def forget(model):
        for _, layer in svdadapt.model.adapter_layers(model):
            layer.base_fingerprint = None

    base, d, _ = saved(before_save=forget)  # never had them: loads, unchecked
    assert all(info["fingerprint"] is None for info in _meta(d)["layers"].values())
    _load(base, d)


def test_a_full_adapter_marked_compact_is_refused(saved):
    base, d, _ = saved(compact=False)
    meta = _meta(d)
    meta["compact"] = True
    _write_meta(d, meta)
    _refused_by_checksum_then_by_tensors(
        base,
        d,
        r"compact = true: changed after",
        r"holds \['down.A', 'down.B', 'gate.A'\] \(6 in all\), the frozen factors a full save stores.*compact: true",
    )


def test_the_serving_bank_checks_the_same(saved):
    from svdadapt.serve import AdapterBank

    base, d, _ = saved()
    f = d / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10
    f.write_bytes(bytes(data))
    bank = AdapterBank(copy.deepcopy(base), svdadapt.AdapterConfig(method="edora", r=4, svd_cache_dir="", **build("custom")[1]))
    with pytest.raises(ValueError, match=r"does not match its checksum"):
        bank.add("damaged", d)
