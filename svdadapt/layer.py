"""`AdapterLayer`: the one magnitude/direction layer every method runs through.

    V = W + s·B R A            (out, in)   effective direction; R = I for methods without R
    n = ‖V‖_row                (out,)      never materialised, see `row_norm`
    y = g ⊙ (x Wᵀ + s·((d(x) Aᵀ) Rᵀ) Bᵀ) + bias,   g = m / n   (g = 1 for methods without m)

DoRA: https://arxiv.org/abs/2402.09353 · PiSSA: https://arxiv.org/abs/2404.02948 ·
LoRA-XS: https://arxiv.org/abs/2405.17604 · EDoRA: https://arxiv.org/abs/2501.12067

The row norm comes from the factors in closed form, with P = B R (out, r), C = W Aᵀ (out, r) and
G = A Aᵀ (r, r):  n_i² = ‖W_i‖² + 2s·⟨C_i, P_i⟩ + s²·⟨P_i G, P_i⟩.  ‖W_i‖² is cached; when A is frozen
(loraxs, edora) C and G are cached too and a step costs O(out·r²). No (out, in) tensor is created
in forward or backward, for any method.
"""

from __future__ import annotations

import contextlib
import operator
import threading
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from svdadapt import norm
from svdadapt.kinds import Conv1DKind, LinearKind, base_kind
from svdadapt.methods import Factors, Method

_VERSION = operator.attrgetter("_version")  # a tensor's in-place change counter


class _Kept(NamedTuple):
    """An `AdapterLayer`'s eval-mode fold, and what it was folded from (`AdapterLayer.forward`)."""

    own: tuple  # the layer's parameters, checked by identity
    base_params: dict  # the base layer's parameter dict, and its values then, checked by identity
    base_own: tuple
    live: tuple  # the tensors among them, and the sum of their version counters then
    version: int
    ops: tuple  # (w, base_bias, a, b, g, bias): what the eval-mode forward computes with, unpacked at once
    # w: W of a plain nn.Linear base, for F.linear on it (else None: the kind's forward runs the base)
    # base_bias: its bias, added in the base GEMM when there is no magnitude
    # a: A' = R A (r, in), stored column-major: A'ᵀ is contiguous, so F.linear(x, a) is a plain GEMM
    # b: B' = s·g ⊙ B (out, r), likewise
    # g: m / n (out,), or None without a magnitude
    # bias: the base bias in the adapter's dtype, added after g ⊙ y (with a magnitude)
    device: str  # the factors' device type, for the autocast check


class _Calls(threading.local):
    """Per thread, one token for each model call in progress (innermost last); None for a call whose
    pre-hook checked nothing (gradients on, or compiling). See `FoldCheck`."""

    def __init__(self):
        self.tokens: list[object | None] = [None]


_CALLS = _Calls()
_UNCHECKED = object()  # an AdapterLayer's token while no call has checked its fold (never None)


class FoldCheck:
    """The forward pre-hook and hook `svdadapt.apply` puts on the model it returns.

    On a call with gradients off, the pre-hook checks every adapter layer's eval-mode fold once (the
    same check the layer makes itself) and gives each layer whose fold is current this call's token;
    a layer holding the current token skips its own check. Checked 210 times in one loop, warm, it
    costs far less than inside each layer after its base GEMM, cold (`scripts/decode_layers.py`).
    The pre-hook never folds (a sharded layer's weights exist only inside its own call); a layer
    without a current fold makes it in its call, and is checked by the pre-hook from the next call on.
    A factor changed inside the model's own forward is seen from the next call.
    """

    def __init__(self, layers):
        self.layers = tuple(layers)

    def install(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self.before)
        model.register_forward_hook(self.after, always_call=True)  # on an exception too

    @staticmethod
    def remove(model: nn.Module) -> None:
        for hooks in (model._forward_pre_hooks, model._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), FoldCheck)]:
                del hooks[key]

    def before(self, module, args) -> None:
        if torch.compiler.is_compiling():
            return
        token = None
        if not torch.is_grad_enabled():
            token = object()
            for layer in self.layers:
                if not layer.training and layer._kept is not None and layer._current(layer._kept):
                    layer.__dict__["_checked"] = token  # plain instance attribute, without Module.__setattr__
        _CALLS.tokens.append(token)

    def after(self, module, args, output) -> None:
        if not torch.compiler.is_compiling() and len(_CALLS.tokens) > 1:
            _CALLS.tokens.pop()


# --- the layer -----------------------------------------------------------------------------


class AdapterLayer(nn.Module):
    """Weight-decomposed low-rank adapter around a frozen linear layer.

    Args:
        base_layer: the layer to wrap (`nn.Linear`, GPT-2 `Conv1D`, or a registered kind).
        method: the registered method (what trains, magnitude or not, residual or not).
        r: rank.
        scaling: s = alpha / r.
        dropout: dropout on the input of the low-rank path only.
        exact_norm: let the gradient flow through the row norm n (else n is a constant, DoRA §4.3).

    The factors are allocated but not initialised: call `initialize(factors)` (or load a state).
    Adapter tensors are float32 (float64 for a float64 base), whatever the base's dtype.

    Precision (DESIGN.md §3). The base matmul runs as the base layer runs alone, in its own dtype or
    autocast's, and its output's dtype is the layer's output dtype. x Aᵀ, h Bᵀ, R, the norm and
    g = m / n are float32; g ⊙ (y + s·h Bᵀ) + bias is computed in float32 and rounded once, so a
    change of m by a part in 10⁴ moves a bfloat16 output (g rounded to bfloat16 first would not). The
    gradients of A and B (products over tokens) run in the base's dtype with float32 accumulation.
    """

    def __init__(
        self, base_layer: nn.Module, method: Method, r: int, scaling: float, dropout: float = 0.0, exact_norm: bool = False
    ):
        super().__init__()
        self.kind = base_kind(base_layer)
        self.base_layer = base_layer
        self.method, self.r, self.scaling, self.exact_norm = method, r, float(scaling), exact_norm
        w = self.kind.weight(base_layer)
        self.out_features, self.in_features = w.shape
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        dev = w.device if w.device.type != "meta" else "meta"

        def param(name, *shape):
            return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=dev), requires_grad=name in method.trainable)

        self.lora_A = param("A", r, self.in_features)
        self.lora_B = param("B", self.out_features, r)
        self.lora_R = param("R", r, r) if method.has_R else None
        self.magnitude = param("magnitude", self.out_features) if method.magnitude else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for name in ("init_magnitude", "_w_sq", "_C", "_G"):
            self.register_buffer(name, None, persistent=False)
        # start factors of a residual method (W = W0 − s·B0 A0), kept on the CPU: no step reads them
        self.init_A: torch.Tensor | None = None
        self.init_B: torch.Tensor | None = None
        self._a_version = -1  # lora_A._version when _C and _G were computed
        self._w_seen: tuple | None = None  # (weakref to the base weight, its _version) when _w_sq was computed
        self._kept: _Kept | None = None  # the eval-mode fold, see `forward`
        self._checked = _UNCHECKED  # the token of the model call that checked _kept (`FoldCheck`)
        self.base_fingerprint: str | None = None  # of W0, set by whoever initialises the layer

    # --- what the adapter owns (structural: model.py and io.py ask the layer) ---

    def factors(self) -> dict[str, nn.Parameter]:
        """Every adapter tensor by factor name ("A", "B", "R", "magnitude"), frozen or not."""
        out = {"A": self.lora_A, "B": self.lora_B, "R": self.lora_R, "magnitude": self.magnitude}
        return {k: v for k, v in out.items() if v is not None}

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight as (out, in): W0, or the residual for pissa/dude (dequantized for a quantized base)."""
        return self.kind.weight(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # --- initialisation ---

    @torch.no_grad()
    def initialize(self, factors: Factors) -> None:
        """Set start values; rewrite W to W0 − s·B A for residual methods; m = ‖V‖_row unless the factors give m."""
        if self.lora_A.is_meta:
            raise RuntimeError("AdapterLayer.initialize: the layer is on the meta device; materialise it first")
        self.lora_A.copy_(factors.A)
        self.lora_B.copy_(factors.B)
        if self.lora_R is not None:
            if factors.R is None:
                raise ValueError(f"method {self.method.name!r} registered has_R=True but its initialiser returned no R")
            self.lora_R.copy_(factors.R)
        if self.method.residual:
            self._rewrite_residual(self.lora_A, self.lora_B)
        self.refresh()
        if self.magnitude is not None:
            self.magnitude.copy_(self.row_norm() if factors.magnitude is None else factors.magnitude)
            self.init_magnitude = self.magnitude.detach().clone()  # to measure how far m moves in training

    def _rewrite_residual(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """W ← W − s·B0 A0 (in row blocks), and keep B0, A0 on the CPU for saving and export."""
        self.kind.set_weight(self.base_layer, _residual(self.weight, b0.to(self.lora_B), a0.to(self.lora_A), self.scaling))
        self.init_A, self.init_B = a0.detach().to("cpu", copy=True), b0.detach().to("cpu", copy=True)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the cached frozen quantities (after initialising or loading factors; after a change of the
        base weight the layer calls it itself, see `_follow_base`)."""
        self._w_sq = norm.row_sq(self.kind.row_blocks(self.base_layer, self.lora_A.dtype))
        w = getattr(self.base_layer, "weight", None)
        self._w_seen = None if w is None else (weakref.ref(w), w._version)
        self._C = self._G = None
        self._drop()
        self._c_and_g()  # caches C and G when A is frozen

    @torch.no_grad()
    def load_factors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set factors from a saved state (keys "A", "B", "R", "magnitude", "init_A", "init_B").

        A full state of a residual method carries init_A/init_B: W is rewritten to W0 − s·B0 A0.
        """
        for name, p in self.factors().items():
            if name in tensors:
                p.copy_(tensors[name])
        if "init_A" in tensors:
            if self.init_A is not None:
                raise RuntimeError("AdapterLayer.load_factors: the base weight was already rewritten")
            self._rewrite_residual(tensors["init_A"], tensors["init_B"])
        self.refresh()

    # --- the norm ---

    def direction(self) -> torch.Tensor:
        """P = B R (out, r), or B for methods without R."""
        return self.lora_B if self.lora_R is None else self.lora_B @ self.lora_R

    def _weight_times_at(self, a: torch.Tensor) -> torch.Tensor:
        """C = W Aᵀ (out, r) in A's dtype from W's row blocks, differentiable in A; for a bf16/fp16 W on
        CUDA outside autograd, one low-precision GEMM with float32 output (`norm.weight_times_at_cuda`)."""
        w = self.base_layer.weight
        if (
            self.kind in (LinearKind, Conv1DKind)
            and not (a.requires_grad and torch.is_grad_enabled())
            and a.dtype == torch.float32
            and norm.float_out_gemm(w.device, w.dtype)
        ):
            return norm.weight_times_at_cuda(self.weight, a)
        return norm.weight_times_at(lambda dtype: self.kind.row_blocks(self.base_layer, dtype), a)

    def _c_and_g(self) -> tuple[torch.Tensor, torch.Tensor]:
        """C = W Aᵀ and G = A Aᵀ for A's current value: cached while A is frozen and unchanged.

        A trainable A (dude, dora, or a frozen factor unfrozen by the user) is never served from the
        cache, so its gradient is right; a frozen A changed in place is recomputed and cached again.
        """
        a = self.lora_A
        if a.requires_grad:
            return self._weight_times_at(a), a @ a.T
        if torch.compiler.is_compiling():  # a compiled graph cannot read version counters: call refresh() after
            return (self._C, self._G) if self._C is not None else (self._weight_times_at(a), a @ a.T)  # changing A
        if self._C is None or self._a_version != a._version:
            with torch.no_grad():
                self._C, self._G, self._a_version = self._weight_times_at(a), a @ a.T, a._version
        return self._C, self._G

    def _norm_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """n (out,) and what its gradient needs: C = W Aᵀ, P = B R, P G (each (out, r)); differentiable
        in the factors that require grad when called with autograd on (the layer's step calls it without)."""
        if not torch.compiler.is_compiling():  # a compiled graph cannot read version counters: call refresh()
            self._follow_base()
        c, g = self._c_and_g()
        p = self.direction()
        pg = p @ g
        return norm.closed_form_norm(self._w_sq, c, p, pg, self.scaling), c, p, pg

    def _follow_base(self) -> None:
        """Recompute ‖W‖² and C (`refresh`) when the base weight was replaced or changed in place since they
        were computed, so n is W's: a new base loaded in place (`load_state_dict`) gives its own norms. Only
        for a whole, local W; a ZeRO-3 partition, an FSDP shard or a packed quantized W keeps the caches."""
        w, seen = getattr(self.base_layer, "weight", None), self._w_seen
        if w is None or (seen is not None and seen[0]() is w and seen[1] == w._version):
            return
        whole = w.numel() == self.in_features * self.out_features and not w.is_meta
        if whole and getattr(w, "full_tensor", None) is None:  # not a DTensor
            self.refresh()

    def row_norm(self) -> torch.Tensor:
        """n = ‖W + s·B R A‖_row (out,) in the adapter's dtype, in closed form; no (out, in) tensor."""
        return self._norm_parts()[0]

    @torch.no_grad()
    def scale(self) -> torch.Tensor | None:
        """g = m / n (out,), or None for methods without magnitude."""
        return None if self.magnitude is None else self.magnitude / self.row_norm()

    # --- forward ---

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), in the base layer's output dtype (autocast's under autocast).

        In eval mode with gradients off the step's forward runs without autograd, from factors folded
        once (`_Kept`): out = (g ⊙ y + bias) + (x A'ᵀ) B'ᵀ, y = x Wᵀ, A' = R A, B' = s·g ⊙ B, computed
        in the adapter's dtype and rounded once to y's, as in training; generation pays for the norm
        once, not per token. The fold is made again when a factor, the base weight or the bias is changed
        in place (version counters: each only grows, so their sum moves with any of them) or replaced
        by another tensor, on `refresh()`, on every return to train mode, and after `.to()` (a changed base
        weight also has ‖W‖² and C recomputed, `_follow_base`). Assigning `.data` moves no counter: call
        `refresh()` after it.

        That path is written for a decoding step, where each layer sees one token after its base GEMM
        has streamed the weights through the caches: every Python line and tensor op then runs cold
        (about 10 µs an op on a SmolLM2-shaped model), so it is three ops beyond the base GEMM, on 3-D
        input as given, from one unpacked tuple; for a plain nn.Linear base the output dtype of its GEMM
        tells whether autocast recast it, so torch is not asked. The check that the fold is current
        allocates nothing, and inside a call of the model `svdadapt.apply` returned it is made once for
        all layers, by the model's pre-hook (`FoldCheck`); a layer called on its own checks its fold itself.
        """
        if not torch.compiler.is_compiling() and self._checked is _CALLS.tokens[-1] and not torch.is_grad_enabled():
            k = self._kept  # checked by this model call's pre-hook (`FoldCheck`)
        else:
            if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
                return self._step_forward(x)
            k = self._kept
            if k is None or not self._current(k):
                k = self._keep()
        w, base_bias, a, b, g, bias = k.ops
        if w is not None:  # a plain nn.Linear: y's dtype says whether autocast recast it (no autocast query)
            y = F.linear(x, w, base_bias)
            if y.dtype is not a.dtype or x.dtype is not a.dtype:
                return self._mixed_inference_forward(x, k, y)
        elif x.dtype is not a.dtype or torch.is_autocast_enabled(k.device):
            return self._mixed_inference_forward(x, k)
        else:
            y = self.kind.forward(self.base_layer, x, g is None)
        z = F.linear(F.linear(x, a), b, bias)  # (..., out): (x A'ᵀ) B'ᵀ + bias, on 3-D input as given
        return z.add_(y) if g is None else z.addcmul_(y, g)

    def _current(self, k: _Kept) -> bool:
        """Whether fold `k` was made from the parameters the layer and its base hold now, unchanged."""
        return (
            len(self._parameters) == len(k.own)
            and all(map(operator.is_, self._parameters.values(), k.own))
            and len(k.base_params) == len(k.base_own)
            and all(map(operator.is_, k.base_params.values(), k.base_own))
            and sum(map(_VERSION, k.live)) == k.version
        )

    def _drop(self) -> None:
        """Forget the eval-mode fold: the next eval-mode call makes it again."""
        self._kept = None
        self._checked = _UNCHECKED

    def _step_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if base.weight.requires_grad:
            raise RuntimeError(
                f"the base weight under this {self.method.name} adapter has requires_grad=True; an adapter layer keeps "
                "it frozen (its row norms are cached). Train the adapter's factors, or list the module in modules_to_save"
            )
        y = self.kind.forward(base, x, bias=self.magnitude is None)  # (..., out): x Wᵀ (+ bias)
        args = (y, self.dropout(x), self.lora_A, self.lora_B, self.lora_R, self.magnitude, self.bias, self)
        dev = y.device.type
        if dev == "meta" or not torch.is_autocast_enabled(dev):
            return _AdapterStep.apply(*args)
        with torch.autocast(dev, enabled=False):  # the step casts explicitly: autocast must not recast its parts
            return _AdapterStep.apply(*args)

    def _mixed_inference_forward(self, x: torch.Tensor, k: _Kept, y: torch.Tensor | None = None) -> torch.Tensor:
        """The eval-mode path for x in another dtype than the adapter's, or under autocast: the base runs
        as it does alone (autocast's dtype under autocast; `y` when the caller ran it), the factors at
        their own precision."""
        base, dev = self.base_layer, k.device
        _, _, a, b, g, bias = k.ops
        amp = dev != "meta" and torch.is_autocast_enabled(dev)
        with torch.autocast(dev, enabled=False) if amp else contextlib.nullcontext():
            h = norm.times_at(x.reshape(-1, x.shape[-1]), a)  # (tokens, r), A at its own precision
        if y is None:
            y = self.kind.forward(base, x, bias=g is None)
        with torch.autocast(dev, enabled=False) if amp else contextlib.nullcontext():
            z = torch.mm(h, b.T) if bias is None else torch.addmm(bias, h, b.T)  # (tokens, out)
            z = z.add_(y.reshape(z.shape)) if g is None else z.addcmul_(y.reshape(z.shape), g)
            z = z.view(y.shape)
            return z if z.dtype == y.dtype else z.to(y.dtype)

    @torch.no_grad()
    def _keep(self) -> _Kept:
        """Fold g = m / n, A' = R A and B' = s·g ⊙ B, and note what they were folded from."""
        a, b, rr, m, bias = self.lora_A, self.lora_B, self.lora_R, self.magnitude, self.bias
        base, dev = self.base_layer, a.device.type
        with torch.autocast(dev, enabled=False) if dev != "meta" else contextlib.nullcontext():  # adapter's dtype
            g = None if m is None else m / self.row_norm()
            a_eff = a if rr is None else rr @ a
            b_eff = b * self.scaling if g is None else b * (self.scaling * g)[:, None]
        dtype = a_eff.dtype  # one dtype (ZeRO casts all)
        own, base_own = tuple(self._parameters.values()), tuple(base._parameters.values())
        live = tuple(t for t in (*own, *base_own) if t is not None)
        plain = self.kind is LinearKind
        a_col, b_col = (t.T.contiguous().T for t in (a_eff, b_eff.to(dtype)))  # column-major (`_Kept.ops`)
        self._kept = _Kept(
            own=own, base_params=base._parameters, base_own=base_own, live=live, version=sum(map(_VERSION, live)),
            ops=(base.weight if plain else None, bias if plain and g is None else None, a_col, b_col, g,
                 None if g is None or bias is None else bias.to(dtype)),
            device=dev,
        )  # fmt: skip
        return self._kept

    def train(self, mode: bool = True):
        self._drop()  # training may change factors behind the version counters (e.g. through .data)
        return super().train(mode)

    def __getstate__(self):  # pickle, deepcopy: a weakref does not copy; the copy checks its base weight once
        return {**super().__getstate__(), "_w_seen": None}

    def _apply(self, fn, recurse: bool = True):
        # .to(), .double(), .cuda() convert through `.data`, which moves no version counter: without this, the
        # next eval-mode call would reuse factors folded in the old dtype or on the old device, and C its old A
        self._drop()
        self._a_version = -1
        return super()._apply(fn, recurse)

    # --- merge ---

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """g[:, None] ⊙ (W + s·B R A), (out, in), in the adapter's dtype."""
        a = self.lora_A
        v = torch.addmm(self.weight.to(a.dtype), self.direction(), a, alpha=self.scaling)
        g = self.scale()
        return v if g is None else g[:, None] * v

    def merged_module(self) -> nn.Module:
        """A plain base-type layer computing what this layer computes."""
        return self.kind.merged(self.base_layer, self.merged_weight())

    def extra_repr(self) -> str:
        return f"method={self.method.name}, r={self.r}, scaling={self.scaling:g}, exact_norm={self.exact_norm}"


def _combine(y2: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: float, g, bias) -> torch.Tensor:
    """z = y + s·h Bᵀ, then g ⊙ z + bias with a magnitude, (N, out) in the adapter's dtype: y upcast once,
    the low-rank term s·h Bᵀ never rounded on its own; the caller rounds z once to the output dtype."""
    ad = h.dtype
    z = torch.addmm(y2, h, b.T, alpha=s) if y2.dtype == ad else y2.to(ad).addmm_(h, b.T, alpha=s)
    if g is not None:
        z.mul_(g)
        if bias is not None:
            z.add_(bias)
    return z


class _AdapterStep(torch.autograd.Function):
    """The adapter's part of `AdapterLayer`, forward and backward in one node, on the base matmul's output y.

    Forward, with cd = y's dtype and ad = the adapter's (float32, or float64 for a float64 base):

        h   = (d(x) Aᵀ) Rᵀ                         (N, r) in ad: A at its own precision (`norm.times_at`)
        out = g ⊙ (y + s·h Bᵀ) + bias,  g = m / n   in ad, rounded once to cd

    (without a magnitude y carries the bias and out = y + s·h Bᵀ): y is the base layer's own output,
    rounded once by the base as it is alone, so out carries that rounding and one more, as peft's DoRA
    with float32 adapter weights does. Out-of-place (a compiler fuses the elementwise passes); it saves
    what a LoRA saves (d(x) and h1 = d(x) Aᵀ) and, with a magnitude, y and n. Backward (DESIGN.md §3),
    with M = gradᵀ h (out, r):

        dL/dg = Σ_tokens grad ⊙ y + s·rowsum(B ⊙ M),   dL/dm = dL/dg / n,   dL/dy = g ⊙ grad,
        dL/dB = s·g ⊙ M,   dL/dh = s·grad (g ⊙ B),   then the low-rank chain rule; for norm="exact"
        the gradient of n through n² = ‖W‖² + 2s⟨C, P⟩ + s²⟨P G, P⟩:  dL/dP = 2s·dL/dn² ⊙ (C + s·P G),
        dL/dC = 2s·dL/dn² ⊙ P,  dL/dG = s²·Pᵀ (dL/dn² ⊙ P),  dL/dA = dL/dCᵀ W + (dL/dG + dL/dGᵀ) A.

    The gradient to y is returned to the base layer's own backward (which computes dL/dx through W), so
    the base runs exactly as it does alone: plain, quantized, under autocast or ZeRO-3. No (out, in) tensor.
    """

    @staticmethod
    def forward(ctx, y, xd, a, b, rr, m, bias, layer):
        s, cd = layer.scaling, y.dtype
        x2 = xd.reshape(-1, xd.shape[-1])  # (N, in), in d(x)'s own dtype: no copy
        h1 = norm.times_at(x2, a)  # (N, r)
        h = h1 if rr is None else h1 @ rr.T
        y2 = y.reshape(-1, y.shape[-1])  # (N, out)
        ctx.layer, ctx.xd_shape = layer, xd.shape
        if m is None:
            ctx.save_for_backward(x2, a, b, rr, h1)
            return _combine(y2, h, b, s, None, None).to(cd).view(y.shape)
        n, c, _, _ = layer._norm_parts()
        save_c = layer.exact_norm and layer.lora_A.requires_grad  # else C is cached, or not needed
        ctx.save_for_backward(x2, a, b, rr, h1, y2, n, m, bias, c if save_c else None)
        return _combine(y2, h, b, s, m / n, bias).to(cd).view(y.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        layer, s = ctx.layer, ctx.layer.scaling
        _, need_xd, need_a, need_b, need_r, need_m, need_bias, _ = ctx.needs_input_grad
        x2, a, b, rr, h1, *with_magnitude = ctx.saved_tensors
        cd, ad = grad.dtype, a.dtype
        gy = grad.reshape(-1, grad.shape[-1])  # (N, out)
        h = h1 if rr is None else h1 @ rr.T  # (N, r), recomputed: cheaper than keeping it
        grad_m = grad_bias = grad_g = None
        if with_magnitude:  # out = g ⊙ (y + s·h Bᵀ) + bias
            y2, n, m, bias, c = with_magnitude
            g = m / n
            grad_y = torch.mul(gy, g, out=torch.empty_like(gy))  # (N, out), g ⊙ grad rounded once
            if need_b or need_m or layer.exact_norm:
                gh = norm.mm_to(gy.T, h.to(cd), ad)  # M = gradᵀ h (out, r)
                grad_g = (gy * y2).sum(0, dtype=ad) + s * (b * gh).sum(1)  # (out,)
            grad_b = gh.mul_(g[:, None] * s) if need_b else None
            grad_m = grad_g / n if need_m else None
            grad_bias = gy.sum(0, dtype=bias.dtype) if need_bias else None
            grad_h = norm.mm_to(gy, (b * g[:, None]).to(cd), ad).mul_(s)  # (N, r)
        else:
            grad_y = gy
            grad_b = norm.mm_to(gy.T, h.to(cd), ad).mul_(s) if need_b else None  # (out, r)
            grad_h = norm.mm_to(gy, b.to(cd), ad).mul_(s)  # (N, r): d/dh of s·h Bᵀ
        grad_r = grad_h.T @ h1 if need_r else None  # (r, r)
        grad_h1 = grad_h if rr is None else grad_h @ rr  # (N, r)
        xdt = x2.dtype  # d(x)'s own: under autocast no low-precision (N, in) copy
        grad_a = norm.mm_to(grad_h1.to(xdt).T, x2, ad) if need_a else None  # (r, in)
        grad_xd = (grad_h1.to(xdt) @ a.to(xdt)).view(ctx.xd_shape) if need_xd else None
        if with_magnitude and layer.exact_norm:
            # C = W Aᵀ was kept from forward when A trains; else it is cached (A frozen): no product with W here
            c, gram = layer._c_and_g() if c is None else (c, a @ a.T)
            p = b if rr is None else b @ rr  # (out, r)
            pg = p @ gram
            grad_n2 = -grad_g * g / (2 * n * n)  # (out,): dL/dn² = dL/dn / (2n), dL/dn = −dL/dg · g / n
            grad_p = (c + s * pg).mul_((2 * s * grad_n2)[:, None])  # (out, r)
            if need_b:
                grad_b = grad_b + (grad_p if rr is None else grad_p @ rr.T)
            if need_r:
                grad_r = grad_r + b.T @ grad_p
            if need_a:
                grad_c = p * (2 * s * grad_n2)[:, None]  # (out, r)
                grad_gram = p.T @ (p * (s * s * grad_n2)[:, None])  # (r, r)
                blocks = layer.kind.row_blocks(layer.base_layer, ad)
                grad_a = grad_a + norm.weight_t_times(blocks, grad_c) + (grad_gram + grad_gram.T) @ a
        return grad_y.view(grad.shape), grad_xd, grad_a, grad_b, grad_r, grad_m, grad_bias, None


def _residual(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: float) -> torch.Tensor:
    """W − s·B A computed in the adapter's precision, returned in W's dtype (init time only).

    A block of rows at a time: no whole-W upcast copy, and each block is still in cache when it is
    rounded back (2.3x faster than one big addmm on a 14336 x 4096 bf16 weight)."""
    out, start = torch.empty_like(w), 0
    for blk in norm.row_blocks(w, a.dtype):
        rows = slice(start, start + blk.shape[0])
        out[rows] = torch.addmm(blk, b[rows], a, alpha=-s)
        start = rows.stop
    return out
