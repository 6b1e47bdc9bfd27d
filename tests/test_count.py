"""`svdadapt count` on a Mistral-7B-sized config, without allocating weights."""

import json

import pytest

from svdadapt.cli import main

# Mistral-7B-v0.1's published architecture numbers
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
}


@pytest.fixture
def mistral_config(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps(MISTRAL_7B))
    return f


def test_count_a_7b_config_in_closed_form(mistral_config, capsys):
    assert main(["count", "--model", str(mistral_config), "--method", "edora,lora", "--r", "16", "--targets", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert "MistralForCausalLM: 7,241,732,096 parameters" in out
    edora = 32 * ((16 * 16 + 4096) + (16 * 16 + 1024))
    lora = 32 * (16 * (4096 + 4096) + 16 * (4096 + 1024))
    assert f"| edora | {edora:,} (" in out and f"| lora | {lora:,} (" in out


def test_count_all_methods_and_ranks_by_default(mistral_config, capsys):
    assert main(["count", "--model", str(mistral_config), "--targets", "q_proj"]) == 0
    out = capsys.readouterr().out
    assert "| r=8 | r=16 | r=32 | r=64 |" in out
    assert all(f"| {m} |" in out for m in ["dora", "dude", "edora", "lora", "loraxs", "pissa"])


def test_count_bad_model_path(tmp_path, capsys):
    assert main(["count", "--model", str(tmp_path / "nope")]) == 2
    assert "--model" in capsys.readouterr().err


def test_unknown_subcommand_suggests(capsys):
    assert main(["cont"]) == 2
    assert "Did you mean 'count'?" in capsys.readouterr().err
