"""Time the adapted linears of `svdadapt bench --suite generate`'s model at one token, called in turn.

This is a decoding step without attention: each layer's base GEMM streams its weight through the caches
just before the adapter's ops run, which is where unmerged generation loses time. It prints, against
the base layers alone timed next to each (the same weights, so the same cache traffic: merged copies
would be other memory, and which of two 400 MB weight sets the cache holds moves a ratio by 10%;
median ratio over repetitions, CPU time, one thread, a warm-up token before each timing), the layers as
they are, and a bare module running only the same four ops (base F.linear, two rank-r GEMMs, addcmul_;
the floor of a layer with a magnitude at this width) in three forms (`FourOps`).

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
from svdadapt.layer import AdapterLayer, FoldCheck


class FourOps(nn.Module):
    """A layer's kept fold, run with nothing but its four ops: base F.linear, two rank-r GEMMs, addcmul_.

    form "linear": F.linear on the kept A' and B' (column-major), as the layer runs them; "mm": torch.mm
    on their transposes (row-major), the same GEMMs, on the input reshaped to 2-D and the result viewed
    back; "row-major": F.linear on row-major copies of A' and B', as `F.linear` weights usually are."""

    def __init__(self, layer: AdapterLayer, form: str):
        super().__init__()
        k = layer._keep()
        _, _, a, b, g, _ = k.ops
        a, b = (a.contiguous(), b.contiguous()) if form == "row-major" else (a, b)
        self.ops = (layer.base_layer.weight.detach(), a, b, a.T, b.T, g)
        self.mm = form == "mm"

    def forward(self, x):
        w, a, b, at, bt, g = self.ops
        y = F.linear(x, w)
        if self.mm:
            return torch.mm(torch.mm(x.reshape(-1, x.shape[-1]), at), bt).view(y.shape).addcmul_(y, g)
        return F.linear(F.linear(x, a), b).addcmul_(y, g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="dude", choices=["dude", "dora", "edora"])
    ap.add_argument("--reps", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(1)
    unmerged, _ = _moved(generate_model(GENERATE_PLAN), args.method)
    layers = [m for m in unmerged.modules() if isinstance(m, AdapterLayer)]
    plain = [m.base_layer for m in layers]
    xs = [torch.randn(1, 1, m.in_features) for m in layers]
    check = FoldCheck(layers)
    variants = {
        "layer": layers,
        "in a call": layers,  # checked once a token by the model's pre-hook, as inside `model(...)`
        "four ops": [FourOps(m, "linear") for m in layers],
        "mm ops": [FourOps(m, "mm") for m in layers],
        "row-major": [FourOps(m, "row-major") for m in layers],
    }

    def token(mods, hooked):
        if hooked:
            check.before(None, ())
        for m, x in zip(mods, xs):
            m(x)
        if hooked:
            check.after(None, (), None)

    def run(mods, tokens=4, hooked=False):
        token(mods, hooked)  # a warm-up token: the timed ones find this weight set in the cache
        t = time.process_time()
        for _ in range(tokens):
            token(mods, hooked)
        return (time.process_time() - t) / tokens

    with torch.no_grad():
        run(layers, 1)  # folds
        ratios = {k: [] for k in variants}
        names = list(variants)
        for rep in range(args.reps):
            before = run(plain)
            for name in names[rep % 2 :] + names[: rep % 2]:
                t, after = run(variants[name], hooked=name == "in a call"), run(plain)
                ratios[name].append(t / ((before + after) / 2))
                before = after
        base = run(plain, 20)
    print(f"{len(layers)} {args.method} layers, base layers alone {base * 1e3:.2f} ms a token")
    for name, rs in ratios.items():
        med = statistics.median(rs)
        print(f"{name:10s} {med:.3f}x the base, +{(med - 1) * base / len(layers) * 1e6:.1f} us a layer")


if __name__ == "__main__":
    main()
