"""`svdadapt plan`: the meta-device step against a measured CPU step, the model states against DeepSpeed's
estimators and engine, and the verdict on a recipe that does not fit."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tiny import llama_config

import svdadapt
from svdadapt.bench.common import peak_bytes
from svdadapt.cli import main
from svdadapt.plan import activation_bytes, deepspeed_estimate, meta_model, model_states, sizes
from svdadapt.recipe import recipe_from_dict

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    """A 2-layer Llama config (hidden 128, vocabulary 256: the layers, not the logits, dominate the peak)."""
    path = tmp_path_factory.mktemp("cfg")
    llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=256, max_position_embeddings=128, architectures=["LlamaForCausalLM"]).save_pretrained(path)  # fmt: skip
    return path / "config.json"


def recipe(method="dude", r=8, checkpointing=False, **training):
    return recipe_from_dict({
        "model": {"name_or_path": "unused", "dtype": "float32", "gradient_checkpointing": checkpointing},
        "adapter": {"method": method, "r": r, "target_modules": TARGETS},
        "data": {"kind": "math", "source": "unused.jsonl", "max_length": 96},
        "training": {"per_device_train_batch_size": 4, **training},
    })  # fmt: skip


def measured_activations(config_path, rec, checkpointing: bool) -> int:
    """Peak tensor bytes of a real forward and backward on CPU (sdpa attention, an all-ones padding mask),
    gradients of the trained tensors dropped as they are made, as the plan counts them apart."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_path), attn_implementation="sdpa")
    svdadapt.apply(model, rec.adapter, progress=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 256, (4, rec.data.max_length))
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    return peak_bytes(lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward())


@pytest.mark.parametrize("method", ["dude", "edora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_match_a_measured_cpu_step(config_path, method, checkpointing):
    rec = recipe(method)
    planned = activation_bytes(meta_model(rec, str(config_path)), 4, rec.data.max_length, checkpointing)
    measured = measured_activations(config_path, rec, checkpointing)
    assert planned == pytest.approx(measured, rel=0.10), (planned, measured)


def test_checkpointing_keeps_less(config_path):
    model = meta_model(recipe("dude"), str(config_path))
    assert activation_bytes(model, 4, 96, True) < 0.7 * activation_bytes(model, 4, 96, False)


@pytest.mark.parametrize("gpus", [1, 8])
def test_model_states_sum_to_deepspeeds_estimates(config_path, gpus):
    s = sizes(meta_model(recipe("dude"), str(config_path)))
    for stage in ("zero2", "zero3"):
        states = model_states(s, stage, gpus, half=True)
        assert states["adapter"] + states["grads"] + states["adamw"] == pytest.approx(deepspeed_estimate(s, stage, gpus), abs=8)
    none, z3 = model_states(s, "none", gpus, True), model_states(s, "zero3", gpus, True)
    assert none["adamw"] == 8 * s.trainable and z3["frozen"] < none["frozen"] / gpus + 2 * s.largest_block + s.buffer_bytes + 1


def test_residual_start_factors_are_not_counted(config_path):
    dude, pissa = sizes(meta_model(recipe("dude"), str(config_path))), sizes(meta_model(recipe("pissa"), str(config_path)))
    layers = 2 * len(TARGETS)
    assert dude.trainable > pissa.trainable  # the magnitude
    # dude's extra buffers against pissa: cached row norms only, never init_A/init_B
    assert dude.buffer_bytes - pissa.buffer_bytes < layers * 4 * 256 * 2


def test_cli_states_what_does_not_fit(config_path, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: {name_or_path: unused, dtype: float32}\nadapter: {method: dude, r: 8, target_modules: [q_proj, v_proj]}\n"
        "data: {kind: math, source: unused.jsonl, max_length: 96}\ntraining: {per_device_train_batch_size: 4}\n"
    )
    args = ["plan", str(path), "--model-config", str(config_path)]
    assert main([*args, "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "fits in 80 GB" in out and "| frozen weights" in out and "SVD initialisation" in out
    assert main([*args, "--gpu-memory", "0.005"]) == 1
    out = capsys.readouterr().out
    assert "Does not fit: the recipe's setting (no ZeRO, no gradient checkpointing) needs" in out
    assert "more than 0.005 GB; the largest part is" in out
    assert main([*args, "--gpus", "0"]) == 2 and "--gpus 0: must be at least 1" in capsys.readouterr().err
