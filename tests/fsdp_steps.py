"""The library under FSDP2 on two CPU ranks, against the same steps in one process.

    torchrun --nproc_per_node 2 tests/fsdp_steps.py OUT.json METHOD[,METHOD...]

For each method a tiny Llama (seed 0) is adapted, then trained 3 SGD steps twice: whole, on the
whole batch (every rank runs it, so each has the reference), and sharded by `fully_shard` (each decoder
layer, then the root), each rank on its half of the batch. Both save full and compact adapters; rank 0
writes OUT.json with, per method, the largest difference of the saved tensors relative to the largest
reference value, how far training moved the tensors, the same for the logits of the FSDP adapter reloaded onto a fresh base, the parameter
types seen under FSDP, the sharded model's eval-mode logits, and the errors `load_adapter` and `merge` raise on the sharded model.
"""

import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

import transformers as tf  # noqa: E402
from tiny import VOCAB, llama_config  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import svdadapt  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def build(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(llama_config())
    cfg = svdadapt.AdapterConfig(method=method, r=4, target_modules=TARGETS, modules_to_save=["lm_head"])
    return svdadapt.apply(model, cfg, progress=False)


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int = 3) -> float:
    """SGD (Adam would magnify rounding where a gradient is near 0); returns how far the tensors moved."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return max(float((p.detach() - s).abs().max()) for p, s in zip(params, start))


def rel(got: dict, want: dict) -> float:
    if set(got) != set(want):
        return float("inf")
    scale = max(v.abs().max().item() for v in want.values() if v.is_floating_point())
    return max((got[k].double() - want[k].double()).abs().max().item() for k in want if want[k].is_floating_point()) / scale


def error(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported, the test reads the message
        return f"{type(e).__name__}: {e}"
    return None


def one(method: str, root: Path, rank: int, ids: torch.Tensor) -> dict:
    ref = build(method)
    moved = train(ref, ids)
    model = build(method)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    train(model, ids.chunk(2)[rank])
    out = {"types": sorted({type(p).__name__ for p in model.parameters()}), "moved": moved}
    for m in (model, ref):
        m.eval()  # the inference path (folded factors), the shards gathered per block
    with torch.no_grad():
        out["sharded eval logits"] = rel({"y": model(input_ids=ids).logits}, {"y": ref(input_ids=ids).logits})
    for m in (model, ref):
        m.train()
    for compact in (False, True):
        kind = "compact" if compact else "full"
        svdadapt.save_adapter(model, root / f"{method}-fsdp-{kind}", compact=compact)
        if rank == 0:
            svdadapt.save_adapter(ref, root / f"{method}-ref-{kind}", compact=compact)
            got = load_file(root / f"{method}-fsdp-{kind}" / "adapter.safetensors")
            want = load_file(root / f"{method}-ref-{kind}" / "adapter.safetensors")
            out[f"saved {kind}"] = rel(got, want)
    out["load_adapter"] = error(lambda: svdadapt.load_adapter(model, root / f"{method}-fsdp-full"))
    out["merge"] = error(lambda: svdadapt.merge(model))
    if rank == 0:
        torch.manual_seed(0)
        fresh = svdadapt.load_adapter(tf.LlamaForCausalLM(llama_config()), root / f"{method}-fsdp-compact")
        with torch.no_grad():
            out["reloaded logits"] = rel({"y": fresh(input_ids=ids).logits}, {"y": ref(input_ids=ids).logits})
    return out


def main() -> int:
    path, methods = Path(sys.argv[1]), sys.argv[2].split(",")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 16))
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        shared = [tmp]  # rank 0's folder: save_adapter writes there from rank 0 only
        dist.broadcast_object_list(shared, src=0)
        for method in methods:
            try:
                result[method] = one(method, Path(shared[0]), rank, ids)
            except Exception:  # noqa: BLE001 - reported per method
                result[method] = {"error": traceback.format_exc(limit=8)}
        dist.barrier()
    if rank == 0:
        path.write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
