"""Serve many EDoRA / LoRA-XS adapters of one base model at once: every sequence names its adapter.

    bank = AdapterBank(model, AdapterConfig(method="edora", r=16))
    bank.add("billing", "adapters/billing")        # a saved adapter directory, compact or full
    bank.add("legal", adapted_model)               # or a model svdadapt.apply adapted
    logits = bank(input_ids, adapter_ids=["billing", "legal", None]).logits   # None: the base model
    tokens = bank.generate(input_ids, adapter_ids=[...], max_new_tokens=32)

edora and loraxs adapters of one base share W, A and B (the frozen SVD basis): only R (r, r) and the
precomputed row scale g = m / ‖W + s·B R A‖_row (out,) differ per adapter, so a wrapped layer keeps a
stack R (N, r, r), g (N, out) and computes, for a batch whose sequence b uses adapter k_b,

    y_b = (x_b Wᵀ + s·((x_b Aᵀ) R_{k_b}ᵀ) Bᵀ) ⊙ g_{k_b} + bias            (g = 1 for loraxs)

with one matmul by W for the whole batch, one batched (r, r) product, and no per-adapter weight.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
import time
from pathlib import Path

import torch
from torch import nn

from svdadapt import basis, norm
from svdadapt.config import AdapterConfig
from svdadapt.io import CHECK, read_adapter
from svdadapt.model import adapter_config, adapter_layers, find_targets, initialize_layer, replace_module, wrap
from svdadapt.svd import fingerprint_matches, solver_for

SERVABLE = ("edora", "loraxs")
_BASIS_FIELDS = (
    "r",
    "resolved_alpha",
    "frozen_factors",
    "singular_values_on",
    "svd_dtype",
    "svd_oversample",
    "svd_niter",
    "svd_sketch",
)


class _Routing(threading.local):
    """The adapter slot of every sequence of the batch being run, shared by all bank layers.

    Thread-local: two threads serving one bank each see their own batch's routing (and gathered R, g).
    """

    def __init__(self):
        self.index: torch.Tensor | None = None
        self.version = 0  # bumped on every bank call: within one call a layer gathers its R, g once
        self.selected: dict[int, tuple] = {}  # id(layer) -> (key, (R[idx]ᵀ, g[idx])) of this call


class BankLayer(nn.Module):
    """A frozen layer with a shared basis A, B and a stack of per-adapter R and g (see module docstring)."""

    def __init__(self, layer, routing: _Routing, dtype: torch.dtype):
        super().__init__()
        self.base_layer, self.kind, self.scaling, self.routing = layer.base_layer, layer.kind, layer.scaling, routing
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        self.r, self.out_features = a.shape[0], b.shape[0]
        # A and s·Bᵀ in the adapter's precision (float32): the low-rank term is never rounded on its own
        self.register_buffer("A", a.clone())  # (r, in)
        self.register_buffer("sBT", (layer.scaling * b.T).contiguous())  # (r, out)
        # the basis and what n needs, in the adapter's precision (float32): ‖W_i‖², C = W Aᵀ, G = A Aᵀ
        self.register_buffer("basis_A", a.clone(), persistent=False)
        self.register_buffer("basis_B", b.clone(), persistent=False)
        for key in ("_w_sq", "_C", "_G"):
            self.register_buffer(key, getattr(layer, key), persistent=False)
        self.register_buffer("R", torch.zeros(1, self.r, self.r, dtype=dtype, device=a.device))  # slot 0: the base model
        # g in the adapter's precision whatever `dtype`: rounded to bfloat16, g ≈ 1 would lose the magnitude's effect
        self.register_buffer("g", torch.ones(1, self.out_features, dtype=a.dtype, device=a.device))

    @torch.no_grad()
    def scale_for(self, r_mat: torch.Tensor, magnitude: torch.Tensor | None) -> torch.Tensor:
        """g = m / ‖W + s·B R A‖_row (out,) for one adapter, in closed form; ones without magnitude."""
        if magnitude is None:
            return torch.ones(self.out_features, dtype=self._w_sq.dtype, device=self._w_sq.device)
        p = self.basis_B @ r_mat.to(self.basis_B)
        n = norm.closed_form_norm(self._w_sq, self._C, p, p @ self._G, self.scaling)
        return magnitude.to(n) / n

    @torch.no_grad()
    def set_slot(self, slot: int, r_mat: torch.Tensor, g: torch.Tensor) -> None:
        if slot >= self.R.shape[0]:  # grow by doubling; existing slots keep their values
            grow = max(slot + 1, 2 * self.R.shape[0]) - self.R.shape[0]
            self.R = torch.cat([self.R, self.R.new_zeros(grow, self.r, self.r)])
            self.g = torch.cat([self.g, self.g.new_ones(grow, self.out_features)])
        self.R[slot] = r_mat.to(self.R)
        self.g[slot] = g.to(self.g)

    def _selected(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """R[idx]ᵀ (batch, r, r) and g[idx] (batch, 1, out) of this call, gathered once per bank call."""
        idx, key = self.routing.index, (self.routing.version, batch)
        if idx is None:
            raise RuntimeError("BankLayer called outside AdapterBank: call the bank, not the wrapped model")
        key_sel = self.routing.selected.get(id(self))
        if key_sel is None or key_sel[0] != key:
            if batch != idx.shape[0]:  # generate() expanded the batch (beams, several samples per prompt)
                if batch % idx.shape[0]:
                    raise ValueError(
                        f"batch of {batch} sequences but {idx.shape[0]} adapter_ids; give one adapter id per sequence"
                    )
                idx = idx.repeat_interleave(batch // idx.shape[0])
            key_sel = key, (self.R[idx].transpose(1, 2), self.g[idx].unsqueeze(1))
            self.routing.selected[id(self)] = key_sel
        return key_sel[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, ..., in) -> (batch, ..., out); sequence b uses slot `routing.index[b]`."""
        batch, shape = x.shape[0], x.shape
        rt, g = self._selected(batch)
        y = self.kind.forward(self.base_layer, x, bias=False)  # (batch, ..., out)
        h = norm.times_at(x.reshape(-1, shape[-1]), self.A).view(batch, -1, self.r)  # (batch, T, r) in float32
        h = torch.bmm(h, rt.to(h.dtype))  # (batch, T, r): each sequence its own R
        y2, h2 = y.reshape(-1, self.out_features), h.view(-1, self.r)
        z = torch.addmm(y2, h2, self.sBT) if y2.dtype == h.dtype else y2.to(h.dtype).addmm_(h2, self.sBT)  # y + s·h Bᵀ, float32
        z = z.view(batch, -1, self.out_features).mul_(g)  # g ⊙ (y + s·h Bᵀ) (+ bias), rounded once, as AdapterLayer
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            z.add_(bias)
        return z.to(y.dtype).view(*shape[:-1], self.out_features)


class AdapterBank(nn.Module):
    """Many edora/loraxs adapters over one base model, chosen per sequence.

    Args:
        model: the base model, unadapted; its target layers are wrapped in place.
        config: the shared basis: r, alpha, target_modules, frozen_factors, singular_values_on, SVD
            settings (and seed, for random frozen factors). Every added adapter must agree with it;
            `method` may be "edora" or "loraxs", and adapters of both kinds can share one bank.
        dtype: storage dtype of R (None: float32). The step computes in float32 whatever the base's dtype, and
            rounds the output once to it, as `AdapterLayer`; g, A and B are kept in float32.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, dtype: torch.dtype | None = None):
        super().__init__()
        if config.method not in SERVABLE:
            raise ValueError(
                f"AdapterBank: config.method={config.method!r}; a bank serves {list(SERVABLE)} adapters (shared A and B)"
            )
        self.model, self.config, self.routing = model, config, _Routing()
        self.slots: dict[str, int] = {}
        self._free: list[int] = []
        self.fingerprints: dict[str, str] = {}
        self.layers: dict[str, BankLayer] = {}
        for name, module in find_targets(model, config):
            layer = wrap(name, module, config)
            initialize_layer(name, layer, config)  # the shared basis: the same SVD as svdadapt.apply
            bank_layer = BankLayer(layer, self.routing, dtype or torch.float32)
            self.fingerprints[name] = layer.base_fingerprint
            self.layers[name] = bank_layer
            replace_module(model, name, bank_layer)
        for p in model.parameters():
            p.requires_grad_(False)

    # --- adapters ---

    def add(self, name: str, source: str | os.PathLike | nn.Module) -> None:
        """Add adapter `name` from a saved adapter directory or an adapted model; others are untouched."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"AdapterBank.add: name={name!r} must be a non-empty string")
        if name in self.slots:
            raise ValueError(f"AdapterBank.add: an adapter named {name!r} is already in the bank; remove it first")
        if isinstance(source, nn.Module):
            cfg, where = adapter_config(source), f"model {type(source).__name__}"
            layers = {n: (lyr.base_fingerprint, lyr.factors()) for n, lyr in adapter_layers(source)}
            tensors = {f"{n}.{k}": v.detach() for n, (_, fs) in layers.items() for k, v in fs.items()}
            prints = {n: fp for n, (fp, _) in layers.items()}
        else:
            meta, cfg, tensors = read_adapter(source)
            where, prints = str(Path(source)), {n: info.get("fingerprint") for n, info in meta["layers"].items()}
        self._check(cfg, prints, tensors, where)
        self.add_tensors(name, self._in_bank_basis(tensors, where), cfg.method)

    @torch.no_grad()
    def add_tensors(self, name: str, tensors: dict[str, torch.Tensor], method: str) -> None:
        """Add adapter `name` from its tensors "<layer>.R" (r, r) and, for edora, "<layer>.magnitude" (out,)."""
        if method not in SERVABLE:
            raise ValueError(f"AdapterBank: method {method!r} cannot be served; only {list(SERVABLE)}")
        if name in self.slots:
            raise ValueError(f"AdapterBank.add: an adapter named {name!r} is already in the bank; remove it first")
        need = [f"{n}.R" for n in self.layers] + ([f"{n}.magnitude" for n in self.layers] if method == "edora" else [])
        if missing := [k for k in need if k not in tensors]:
            raise ValueError(f"AdapterBank.add({name!r}): tensors {missing[:3]} are missing ({len(missing)} in all)")
        scales = {n: layer.scale_for(tensors[f"{n}.R"], tensors.get(f"{n}.magnitude")) for n, layer in self.layers.items()}
        slot = self._free.pop() if self._free else len(self.slots) + 1
        for n, layer in self.layers.items():
            layer.set_slot(slot, tensors[f"{n}.R"], scales[n])
        self.slots[name] = slot

    def remove(self, name: str) -> None:
        """Drop adapter `name`; its slot is reused by a later `add`, no other slot moves."""
        if name not in self.slots:
            raise ValueError(f"AdapterBank.remove: no adapter named {name!r}; adapters: {sorted(self.slots)[:10]}")
        slot = self.slots.pop(name)
        for layer in self.layers.values():
            layer.set_slot(slot, torch.zeros(layer.r, layer.r), torch.ones(layer.out_features))
        self._free.append(slot)

    def names(self) -> list[str]:
        return sorted(self.slots)

    def bytes_per_adapter(self) -> int:
        """Bytes one adapter occupies: R and g of every wrapped layer."""
        return sum(
            lyr.R[0].numel() * lyr.R.element_size() + lyr.g[0].numel() * lyr.g.element_size() for lyr in self.layers.values()
        )

    def _check(self, cfg: AdapterConfig, prints: dict, tensors: dict, where: str) -> None:
        if cfg.method not in SERVABLE:
            raise ValueError(
                f"{where}: a {cfg.method} adapter cannot join a bank (only {list(SERVABLE)}, whose A and B are shared)"
            )
        for f in _BASIS_FIELDS + (("seed",) if self.config.frozen_factors == "random" else ()):
            if getattr(cfg, f) != getattr(self.config, f):
                raise ValueError(
                    f"{where}: its {f}={getattr(cfg, f)!r} differs from the bank's {getattr(self.config, f)!r}; it needs another bank"
                )
        for n, layer in self.layers.items():  # "auto" and the solver it picks for this shape are the same
            theirs, mine = (solver_for(c.svd_solver, (layer.out_features, layer.A.shape[1])) for c in (cfg, self.config))
            if theirs != mine:
                raise ValueError(
                    f"{where}: layer {n!r} was initialised with the {theirs} SVD solver (svd_solver={cfg.svd_solver!r}) and "
                    f"the bank's with the {mine} one (svd_solver={self.config.svd_solver!r}); it needs another bank"
                )
        if cfg.modules_to_save:
            raise ValueError(
                f"{where}: it trains whole modules {list(cfg.modules_to_save)}, which a bank cannot share; serve it alone"
            )
        if set(prints) != set(self.layers):
            raise ValueError(f"{where}: it wraps other layers than the bank ({sorted(set(prints) ^ set(self.layers))[:3]}...)")
        for n, fp in prints.items():
            layer = self.layers[n]
            if fp and not fingerprint_matches(layer.kind.weight(layer.base_layer), fp, self.fingerprints[n]):
                raise ValueError(f"{where}: layer {n!r} was trained on another base weight (fingerprint mismatch)")

    @torch.no_grad()
    def _in_bank_basis(self, tensors: dict, where: str) -> dict:
        """The adapter's R expressed in the bank's basis: the basis it was trained with (a compact file's check,
        or its A and B) is fitted to the bank's (`svdadapt.basis`); a rotated tie is realigned (R ← Tᵀ R T),
        another subspace refused. While the bank is empty, a layer that disagrees first rebuilds its basis
        without the SVD cache (whose entry may come from another machine)."""
        out, drift, unchecked = dict(tensors), [], 0
        for n in self.layers:
            if f"{n}.{CHECK}" in tensors:
                saved = tensors[f"{n}.{CHECK}"]
            elif f"{n}.A" in tensors and f"{n}.B" in tensors:
                saved = basis.sketch({"A": tensors[f"{n}.A"], "B": tensors[f"{n}.B"]}, ("A", "B"))
            else:
                unchecked += 1
                continue
            fit = self._fit(n, saved)
            if fit.unrotated > basis.SAME and not self.slots and self.config.svd_cache_dir != "":
                fit = self._rebuild_basis(n, saved, fit)
            if fit.error > basis.REFUSED:
                layer = self.layers[n]
                raise ValueError(
                    f"{where}: layer {n!r} was trained on another basis than the bank's (sketch error {fit.error:.1e} after "
                    f"realignment; {basis.gap(layer.kind.weight(layer.base_layer), layer.r)}, so which direction is the "
                    f"{layer.r}-th depends on the machine's SVD). Serve it alone from a full save (svdadapt.load_adapter)"
                )
            if fit.error > basis.REALIGNED:
                drift.append((fit.error, n))
            if fit.unrotated > basis.SAME:
                t, r_mat = fit.rotation, tensors[f"{n}.R"]
                out[f"{n}.R"] = (t.T @ r_mat.to(t) @ t).to(r_mat.dtype)
        basis.warn_unchecked_and_drift(where, unchecked, drift, "the bank's basis")
        return out

    def _fit(self, name: str, saved: torch.Tensor) -> basis.Fit:
        layer = self.layers[name]
        return basis.fit(saved, {"A": layer.basis_A, "B": layer.basis_B}, ("A", "B"))

    def _rebuild_basis(self, name: str, saved: torch.Tensor, fit: basis.Fit) -> basis.Fit:
        """Recompute one layer's basis without the SVD cache (the bank holds no adapter yet); keep it if it
        fits `saved` better than the cached one's `fit`. Returns the fit of the basis kept."""
        old, fresh = self.layers[name], dataclasses.replace(self.config, svd_cache_dir="")
        layer = wrap(name, old.base_layer, fresh)
        initialize_layer(name, layer, fresh)
        new = BankLayer(layer, self.routing, old.R.dtype)
        if (again := basis.fit(saved, {"A": new.basis_A, "B": new.basis_B}, ("A", "B"))).error >= fit.error:
            return fit
        self.layers[name] = new
        replace_module(self.model, name, new)
        return again

    # --- running ---

    def _index(self, adapter_ids, batch: int) -> torch.Tensor:
        if len(adapter_ids) != batch:
            raise ValueError(
                f"adapter_ids has {len(adapter_ids)} entries for a batch of {batch}; give one per sequence (None: base model)"
            )
        unknown = sorted({a for a in adapter_ids if a is not None and a not in self.slots})
        if unknown:
            raise ValueError(f"unknown adapter ids {unknown[:5]}; the bank has {len(self.slots)}: {self.names()[:5]}...")
        device = next(iter(self.layers.values())).R.device
        return torch.tensor([0 if a is None else self.slots[a] for a in adapter_ids], device=device)

    def _run(self, fn, input_ids, adapter_ids, **kwargs):
        self.routing.index = self._index(list(adapter_ids), input_ids.shape[0])
        self.routing.version += 1
        try:
            return fn(input_ids=input_ids, **kwargs)
        finally:
            self.routing.index = None
            self.routing.selected.clear()  # drop the gathered tensors

    def forward(self, input_ids: torch.Tensor, adapter_ids, **kwargs):
        """The base model's forward; sequence b runs with adapter `adapter_ids[b]` (None: no adapter)."""
        return self._run(self.model, input_ids, adapter_ids, **kwargs)

    def generate(self, input_ids: torch.Tensor, adapter_ids, **kwargs):
        """`model.generate` with one adapter per prompt (beams and samples follow their prompt's)."""
        return self._run(self.model.generate, input_ids, adapter_ids, **kwargs)


# --- benchmark -----------------------------------------------------------------------------


def _paired(base_fn, bank_fn, pairs: int) -> tuple[float, float, float]:
    """Median base time, median bank time, and median of the per-pair ratios base/bank.

    Each pair runs both back to back (in alternating order), so a burst of load from other work hits
    both runs of a pair; the median over pairs discards the pairs it hit unevenly.
    """
    base_t, bank_t = [], []
    for k in range(pairs):
        for fn, out in ((base_fn, base_t), (bank_fn, bank_t))[:: 1 if k % 2 == 0 else -1]:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    ratios = sorted(tb / tk for tb, tk in zip(base_t, bank_t))
    return sorted(base_t)[pairs // 2], sorted(bank_t)[pairs // 2], ratios[pairs // 2]


def benchmark_bank(quick: bool = False, threads: int | None = 1) -> dict:
    """Throughput of a bank serving a batch whose every sequence has its own adapter, vs the base alone.

    Full: a Llama with 4 layers, hidden 512, 1,000 edora adapters (r = 16, all linear layers), a batch
    of 32 sequences of 128 tokens, each with a different adapter. Quick: 2 layers, hidden 128, 100
    adapters, 8 sequences of 32 tokens. Float32 under inference_mode. Prefill: one forward over the
    batch, 9 (quick: 5) pairs of base and bank runs. Decoding: greedy generation of 32 (quick: 8) new
    tokens from 8-token prompts, 5 pairs. Ratios are medians of per-pair ratios; tokens/s come from
    median times. `threads` sets torch's CPU threads for the run (restored after; None keeps the
    current number): one by default, because on a shared machine OpenMP barriers stall on busy cores
    and then time the scheduler, not the method.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _benchmark(quick)
    finally:
        torch.set_num_threads(before)


def _benchmark(quick: bool) -> dict:
    import transformers

    hidden, layers, n, batch, seq, r = (128, 2, 100, 8, 32, 16) if quick else (512, 4, 1000, 32, 128, 16)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=4096,
        max_position_embeddings=max(256, seq),
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    model = copy.deepcopy(base)
    config = AdapterConfig(method="edora", r=r, svd_cache_dir="")
    t0 = time.perf_counter()
    bank = AdapterBank(model, config).eval()
    gen = torch.Generator().manual_seed(1)
    for i in range(n):
        tensors = {}
        for name, layer in bank.layers.items():
            tensors[f"{name}.R"] = torch.randn(r, r, generator=gen) * 0.05
            n0 = layer._w_sq.sqrt()
            tensors[f"{name}.magnitude"] = n0 * (1 + 0.01 * torch.randn(n0.shape, generator=gen))
        bank.add_tensors(f"adapter-{i}", tensors, "edora")
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    names = [f"adapter-{i * (n // batch)}" for i in range(batch)]
    with torch.inference_mode():
        bank(ids, names), base(input_ids=ids)  # warm up
        base_s, bank_s, ratio = _paired(lambda: base(input_ids=ids), lambda: bank(ids, names), 5 if quick else 9)
        prompt, new = ids[:, :8], 8 if quick else 32  # decoding: one token per sequence per step, KV cache
        kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
        base_d, bank_d, decode_ratio = _paired(lambda: base.generate(prompt, **kw), lambda: bank.generate(prompt, names, **kw), 5)
    shapes = [(lyr.out_features, lyr.A.shape[1]) for lyr in bank.layers.values()]
    value_bytes = next(iter(bank.layers.values())).R.element_size()
    lora_values = sum(r * (o + i) for o, i in shapes)
    return {
        "adapters": n,
        "layers_wrapped": len(shapes),
        "model": f"Llama {layers} layers, hidden {hidden}, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}",
        "r": r,
        "batch": batch,
        "seq_len": seq,
        "distinct_adapters_in_batch": len(set(names)),
        "base_tokens_per_s": batch * seq / base_s,
        "bank_tokens_per_s": batch * seq / bank_s,
        "throughput_ratio": ratio,
        "decode_new_tokens": new,
        "base_decode_tokens_per_s": batch * new / base_d,
        "bank_decode_tokens_per_s": batch * new / bank_d,
        "decode_throughput_ratio": decode_ratio,
        "bytes_per_adapter": bank.bytes_per_adapter(),
        "expected_bytes_per_adapter": sum(r * r * value_bytes + o * 4 for o, _ in shapes),
        "lora_bytes_per_adapter": lora_values * value_bytes,
        "bank_build_s": build_s,
        "torch_threads": torch.get_num_threads(),
    }


__all__ = ["AdapterBank", "BankLayer", "SERVABLE", "benchmark_bank"]
