"""Time the adapted linears of `svdadapt bench --suite generate`'s model at one token, called in turn.

This is a decoding step without attention: each layer's base GEMM streams its weight through the caches
just before the adapter's ops run, which is where unmerged generation loses time. It prints, against
the merged linears timed next to each (median ratio over repetitions, CPU time, one thread), the layers
as they are and a bare module running only the same four ops (base F.linear, two rank-r F.linear,
addcmul_): the floor of a layer with a magnitude at this width.

    python scripts/decode_layers.py [--method dude] [--reps 24]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from svdadapt.bench.runtime import GENERATE_PLAN, _moved, generate_model
from svdadapt.layer import AdapterLayer


class FourOps(nn.Module):
    """A layer's kept fold, run with nothing but its four ops."""

    def __init__(self, layer: AdapterLayer):
        super().__init__()
        k = layer._keep()
        self.ops = (layer.base_layer.weight.detach(), k.a, k.b, k.g)

    def forward(self, x):
        w, a, b, g = self.ops
        return F.linear(F.linear(x, a), b).addcmul_(F.linear(x, w), g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="dude", choices=["dude", "dora", "edora"])
    ap.add_argument("--reps", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(1)
    unmerged, merged = _moved(generate_model(GENERATE_PLAN), args.method)
    layers = [m for m in unmerged.modules() if isinstance(m, AdapterLayer)]
    plain = [m for n, m in merged.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    xs = [torch.randn(1, 1, m.in_features) for m in layers]
    variants = {"layer": layers, "four ops": [FourOps(m) for m in layers]}

    def run(mods, tokens=4):
        t = time.process_time()
        for _ in range(tokens):
            for m, x in zip(mods, xs):
                m(x)
        return (time.process_time() - t) / tokens

    with torch.no_grad():
        run(layers, 1)  # folds
        ratios = {k: [] for k in variants}
        names = list(variants)
        for rep in range(args.reps):
            before = run(plain)
            for name in names[rep % 2 :] + names[: rep % 2]:
                t, after = run(variants[name]), run(plain)
                ratios[name].append(t / ((before + after) / 2))
                before = after
        token = run(plain, 20)
    print(f"{len(layers)} {args.method} layers, merged {token * 1e3:.2f} ms a token")
    for name, rs in ratios.items():
        med = statistics.median(rs)
        print(f"{name:9s} {med:.3f}x merged, +{(med - 1) * token / len(layers) * 1e6:.1f} us a layer")


if __name__ == "__main__":
    main()
