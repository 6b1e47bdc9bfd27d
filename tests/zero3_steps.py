"""The library's steps on a ZeRO-3 model and on the same model without DeepSpeed, compared.

    python tests/zero3_steps.py OUT.json METHOD[,METHOD...]

One CPU rank (gloo). For each method a tiny Llama is built plainly and again under
`deepspeed.zero.Init` with the same weights; then `apply`, a training step through a DeepSpeed engine
(forward, backward, SGD), `save_adapter` (full and compact), `load_adapter` onto fresh models and
`merge` run on both. OUT.json gets, per method and step, the largest difference relative to the
largest value of the plain run's tensors (0.0 when bit-identical), or the error a step raised. Run as a
subprocess (tests/test_zero3.py): it initialises a process group.
"""

import json
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))

import deepspeed  # noqa: E402
import transformers as tf  # noqa: E402
from tiny import VOCAB, llama_config  # noqa: E402

import svdadapt  # noqa: E402
from svdadapt.methods import get_method  # noqa: E402
from svdadapt.model import adapter_layers  # noqa: E402

ZERO3 = {
    "train_micro_batch_size_per_gpu": 2,
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 0.0,  # this DeepSpeed clips at 1.0 unless told; the plain step does not clip
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}
BUFFERS = ("init_A", "init_B", "init_magnitude", "_w_sq", "_C", "_G")
Llama = tf.LlamaForCausalLM  # imported before zero.Init, which patches tensor construction


def build(zero: bool) -> torch.nn.Module:
    """The tiny Llama (seed 0); under ZeRO-3 the same weights, partitioned."""
    torch.manual_seed(0)
    plain = Llama(llama_config())
    if not zero:
        return plain
    with deepspeed.zero.Init(config_dict_or_path=ZERO3):
        model = Llama(llama_config())
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0), torch.no_grad():
        for (name, p), (other, q) in zip(model.named_parameters(), plain.named_parameters()):
            assert name == other
            p.copy_(q)
    return model


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered, plus the adapter layers' cached tensors."""
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        out = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, layer in adapter_layers(model):
            out.update({f"{name}.{b}": getattr(layer, b).clone() for b in BUFFERS if getattr(layer, b) is not None})
    return out


def rel_diff(got: dict, want: dict) -> float:
    """max |got − want| / max |want| over matching keys; inf if the keys or shapes differ."""
    if set(got) != set(want) or any(got[k].shape != want[k].shape for k in want):
        return float("inf")
    scale = max(v.abs().max().item() for v in want.values() if v.numel())
    return max(((got[k].double() - want[k].double()).abs().max().item() if want[k].numel() else 0.0) for k in want) / scale


def logits(model, ids) -> dict:
    with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        return {"logits": model(input_ids=ids).logits}


def saved(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter.safetensors"))


def fingerprints(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())["layers"]


def run(method: str, work: Path) -> dict:
    keep = () if get_method(method).residual else ("lm_head",)  # residual: the rewrite is the subject
    cfg = svdadapt.AdapterConfig(method=method, r=4, target_modules="all-linear", modules_to_save=keep)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    out: dict = {}

    def step(name, fn):
        try:
            out[name] = fn()
        except Exception as e:  # recorded, and the later steps still run
            out[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"

    zero, plain = build(True), build(False)
    step("partitioned", lambda: all(hasattr(p, "ds_id") and p.numel() == 0 for p in zero.parameters()))
    svdadapt.apply(zero, cfg)
    svdadapt.apply(plain, cfg)
    step("apply", lambda: rel_diff(state(zero), state(plain)))
    step(
        "registered",
        lambda: all(id(lyr.base_layer.weight) in getattr(lyr, "_external_params", {}) for _, lyr in adapter_layers(zero)),
    )

    def train_step():
        params = [p for p in zero.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=zero, model_parameters=params, optimizer=torch.optim.SGD(params, lr=0.5), config=ZERO3
        )
        mine = [p for p in plain.parameters() if p.requires_grad]
        opt = torch.optim.SGD(mine, lr=0.5)
        got, want = engine(input_ids=ids, labels=ids), plain(input_ids=ids, labels=ids)
        engine.backward(got.loss)
        want.loss.backward()
        from deepspeed.utils import safe_get_full_grad

        grads = rel_diff(
            {str(i): safe_get_full_grad(p) for i, p in enumerate(params)}, {str(i): p.grad for i, p in enumerate(mine)}
        )
        engine.step()
        opt.step()
        return {"forward": rel_diff({"logits": got.logits}, {"logits": want.logits}), "grads": grads,
                "after_step": rel_diff(state(zero), state(plain))}  # fmt: skip

    step("train_step", train_step)
    for compact in (False, True):
        _round_trip(step, zero, plain, ids, work / f"{method}-{'compact' if compact else 'full'}", compact)
    return out


def _round_trip(step, zero, plain, ids, folder: Path, compact: bool) -> None:
    """save_adapter from both, load_adapter of the plain run's file onto fresh models, merge both."""
    kind = "compact" if compact else "full"
    dz, dp = folder / "zero", folder / "plain"
    fresh_zero, fresh_plain = build(True), build(False)

    def save():
        svdadapt.save_adapter(zero, dz, compact=compact)
        svdadapt.save_adapter(plain, dp, compact=compact)

    def load():
        svdadapt.load_adapter(fresh_zero, dp)
        svdadapt.load_adapter(fresh_plain, dp)

    def merge():
        svdadapt.merge(fresh_zero)
        svdadapt.merge(fresh_plain)

    step(f"save_{kind}", save)
    step(f"saved_{kind}", lambda: rel_diff(saved(dz), saved(dp)))
    step(f"fingerprints_{kind}", lambda: fingerprints(dz) == fingerprints(dp))
    for name, done, action in (("load", "loaded", load), ("merge", "merged", merge)):
        step(f"{name}_{kind}", action)
        step(f"{done}_{kind}", lambda: rel_diff(state(fresh_zero), state(fresh_plain)))
        step(f"{done}_{kind}_logits", lambda: rel_diff(logits(fresh_zero, ids), logits(fresh_plain, ids)))


def main(path: str, methods: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    with tempfile.TemporaryDirectory() as work:
        result = {m: run(m, Path(work)) for m in methods.split(",")}
    Path(path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
