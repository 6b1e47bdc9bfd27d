"""How much closer to W0 the QPiSSA effective weight is than quantizing W0 directly.

For every linear layer `apply` would wrap ("all-linear"), with B A the top-r SVD part of W0 (PiSSA
start values, s = 1) and W_res = W0 − B A:

    direct   = ‖W0 − deq(Q(W0))‖_F                      (QLoRA, or any method on a quantized W0)
    residual = ‖W0 − (deq(Q(W_res)) + B A)‖_F            (pissa through `prepare_quantized`)
    dude     = ‖W0 − g ⊙ (deq(Q(W_res)) + B A)‖_F,  g = ‖W0‖_row / ‖deq(Q(W_res)) + B A‖_row

Q is the same bitsandbytes quantization the model layers get (`quantize_linear`). Run:

    python -m svdadapt.quant_error --model PATH [--gguf-file NAME] [--ranks 16 64] [--per-layer]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict

import torch
from torch import nn

from svdadapt.config import AdapterConfig
from svdadapt.kinds import base_kind
from svdadapt.quant import QUANTIZATIONS, quantize_linear
from svdadapt.svd import SVDSettings, truncated_svd


def _dequantized(w: torch.Tensor, quantization: str) -> torch.Tensor:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(w, requires_grad=False)
    q = quantize_linear(linear, quantization)
    return base_kind(q).weight(q).float()


def layer_errors(w0: torch.Tensor, ranks=(16, 64), quantizations=QUANTIZATIONS) -> list[dict]:
    """Rows {quantization, r, direct, residual, dude} (Frobenius norms) for one weight (out, in)."""
    w0 = w0.detach().float()
    u, s, vh = truncated_svd(w0, max(ranks), SVDSettings(cache_dir=""))
    rows = []
    for quantization in quantizations:
        direct = torch.linalg.norm(w0 - _dequantized(w0, quantization)).item()
        for r in ranks:
            ba = (u[:, :r] * s[:r]) @ vh[:r]
            v = _dequantized(w0 - ba, quantization) + ba
            g = w0.norm(dim=1) / v.norm(dim=1)
            rows.append(
                {
                    "quantization": quantization,
                    "r": r,
                    "direct": direct,
                    "residual": torch.linalg.norm(w0 - v).item(),
                    "dude": torch.linalg.norm(w0 - g[:, None] * v).item(),
                }
            )
    return rows


def model_errors(model: nn.Module, ranks=(16, 64), quantizations=QUANTIZATIONS, progress: bool = True) -> list[dict]:
    """`layer_errors` for every layer "all-linear" selects, each row tagged with the layer's name."""
    from svdadapt.model import find_targets

    targets = find_targets(model, AdapterConfig(method="pissa", r=min(ranks)))
    out = []
    for i, (name, module) in enumerate(targets):
        w = base_kind(module).weight(module)
        out += [{"layer": name, "shape": tuple(w.shape), **row} for row in layer_errors(w, ranks, quantizations)]
        if progress:
            print(f"\r{i + 1}/{len(targets)} layers", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def summarize(rows: list[dict], per_layer: bool = False) -> str:
    """Markdown tables: aggregated (root of summed squares) per (quantization, r), per module type (name without its block index), per layer."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    types: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["quantization"], row["r"]].append(row)
        types[row["quantization"], row["r"], re.sub(r"^.*\.\d+\.", "", row["layer"])].append(row)

    def agg(rs, key):
        return math.sqrt(sum(x[key] ** 2 for x in rs))

    lines = [
        "| quantization | r | layers | ‖W0−Q(W0)‖ | ‖W0−(Q(W_res)+BA)‖ | ratio | dude ratio | per-layer ratio min / median / max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (q, r), rs in groups.items():
        d, res = agg(rs, "direct"), agg(rs, "residual")
        per = sorted(_ratio(x["residual"], x["direct"]) for x in rs)
        lines.append(
            f"| {q} | {r} | {len(rs)} | {d:.4g} | {res:.4g} | {_ratio(res, d):.3f} | {_ratio(agg(rs, 'dude'), d):.3f} "
            f"| {per[0]:.3f} / {per[len(per) // 2]:.3f} / {per[-1]:.3f} |"
        )
    lines += ["", "| quantization | r | module | layers | ratio | dude ratio |", "|---|---|---|---|---|---|"]
    for (q, r, t), rs in types.items():
        d = agg(rs, "direct")
        lines.append(f"| {q} | {r} | {t} | {len(rs)} | {_ratio(agg(rs, 'residual'), d):.3f} | {_ratio(agg(rs, 'dude'), d):.3f} |")
    if per_layer:
        lines += ["", "| layer | shape | quantization | r | ‖W0−Q(W0)‖ | ratio | dude ratio |", "|---|---|---|---|---|---|---|"]
        for x in rows:
            lines.append(
                f"| {x['layer']} | {x['shape'][0]}×{x['shape'][1]} | {x['quantization']} | {x['r']} | {x['direct']:.4g} "
                f"| {_ratio(x['residual'], x['direct']):.3f} | {_ratio(x['dude'], x['direct']):.3f} |"
            )
    return "\n".join(lines)


def load_model(path: str, gguf_file: str | None = None) -> nn.Module:
    """A transformers model in float32 from a directory (safetensors) or a GGUF file in it (dequantized)."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path, gguf_file=gguf_file)
    cls = (
        transformers.AutoModelForCausalLM if cfg.architectures and "CausalLM" in cfg.architectures[0] else transformers.AutoModel
    )
    return cls.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)


def cli(argv: list[str]) -> int:
    """Print the quantization-error tables of a model's linear layers (QPiSSA residual vs direct)."""
    p = argparse.ArgumentParser(prog="python -m svdadapt.quant_error", description=cli.__doc__)
    p.add_argument("--model", required=True, help="a transformers model directory")
    p.add_argument("--gguf-file", default=None, help="a GGUF file inside --model to load (dequantized to float32)")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="ranks r of the principal part B A")
    p.add_argument("--quantizations", nargs="+", default=list(QUANTIZATIONS), choices=QUANTIZATIONS)
    p.add_argument("--per-layer", action="store_true", help="also print one row per layer")
    args = p.parse_args(argv)
    try:
        model = load_model(args.model, args.gguf_file)
    except (OSError, ValueError) as e:
        print(f"error: cannot load --model {args.model!r}: {e}", file=sys.stderr)
        return 2
    print(summarize(model_errors(model, tuple(args.ranks), tuple(args.quantizations)), per_layer=args.per_layer))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
