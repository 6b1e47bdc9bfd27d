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

import torch
import torch.nn.functional as F
from torch import nn

from svdadapt import norm
from svdadapt.methods import Factors, Method

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- base-layer kinds: first match wins ----------------------------------------------------


class LinearKind:
    """`torch.nn.Linear`: weight (out, in)."""

    dtypes = FLOAT_DTYPES

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @staticmethod
    def weight(module) -> torch.Tensor:  # (out, in), a view
        return module.weight

    @staticmethod
    def forward(module, x: torch.Tensor, bias: bool) -> torch.Tensor:
        return F.linear(x, module.weight, module.bias if bias else None)

    @staticmethod
    def set_weight(module, w: torch.Tensor) -> None:
        module.weight.data.copy_(w)

    @staticmethod
    def row_blocks(module, dtype: torch.dtype):
        return norm.row_blocks(module.weight, dtype)

    @staticmethod
    def merged(module, w: torch.Tensor) -> nn.Module:
        out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        out.weight = nn.Parameter(w.to(module.weight.dtype), requires_grad=False)
        if module.bias is not None:
            out.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return out


class Conv1DKind:
    """transformers' GPT-2 `Conv1D`: weight stored transposed, (in, out)."""

    dtypes = FLOAT_DTYPES

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2

    @staticmethod
    def weight(module) -> torch.Tensor:
        return module.weight.T

    @staticmethod
    def forward(module, x: torch.Tensor, bias: bool) -> torch.Tensor:
        return F.linear(x, module.weight.T, module.bias if bias else None)

    @staticmethod
    def set_weight(module, w: torch.Tensor) -> None:
        module.weight.data.copy_(w.T)

    @staticmethod
    def row_blocks(module, dtype: torch.dtype):
        return norm.row_blocks(module.weight.T, dtype)

    @staticmethod
    def merged(module, w: torch.Tensor) -> nn.Module:
        new = type(module)(w.shape[0], w.shape[1])
        new.weight = nn.Parameter(w.T.contiguous().to(module.weight.dtype), requires_grad=False)
        new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return new


BASE_KINDS: list[type] = [LinearKind, Conv1DKind]


def register_base_kind(kind: type, first: bool = True) -> None:
    """Teach the layer a new base-layer type (e.g. a quantized linear); first match wins."""
    BASE_KINDS.insert(0 if first else len(BASE_KINDS), kind)


def _register_known_kinds(module: nn.Module) -> None:
    """A bitsandbytes layer brings in `svdadapt.quant`, which registers its kinds (ahead of `LinearKind`,
    which its classes subclass): no import of svdadapt registers them as a side effect."""
    if type(module).__module__.startswith("bitsandbytes"):
        import svdadapt.quant  # noqa: F401


def base_kind(module: nn.Module, name: str = "") -> type:
    """The first registered kind that matches `module`; raises naming the module if none does, or if
    its weight has a dtype the kind cannot serve (e.g. float8 without a registered kind)."""
    _register_known_kinds(module)
    for kind in BASE_KINDS:
        if kind.matches(module):
            dtypes = getattr(kind, "dtypes", None)
            if dtypes is not None and (dt := kind.weight(module).dtype) not in dtypes:
                where = f"module {name!r}" if name else f"a {type(module).__name__}"
                raise ValueError(
                    f"{where} has {dt} weights; an adapter serves {type(module).__name__} weights in "
                    f"{[str(d).removeprefix('torch.') for d in dtypes]}. Load the model in one of those dtypes, "
                    "leave this module out of target_modules, or register a kind with svdadapt.layer.register_base_kind."
                )
            return kind
    supported = ", ".join(k.__doc__.split(":")[0].strip("` ") for k in BASE_KINDS)
    where = f"module {name!r} " if name else ""
    raise ValueError(
        f"{where}of type {type(module).__name__} cannot be adapted; supported layer types: {supported}. "
        "Pick other target_modules, or register a kind with svdadapt.layer.register_base_kind."
    )


def is_supported(module: nn.Module) -> bool:
    _register_known_kinds(module)
    return any(kind.matches(module) for kind in BASE_KINDS)


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
    autocast's, and its output's dtype is the layer's output dtype. Products over tokens (x Aᵀ, h Bᵀ
    and their gradients) run in that dtype with float32 accumulation; R, the norm, g = m / n and the
    gradients of R and m are float32; g ⊙ ypre + bias is computed in float32 and rounded once, so a
    change of m by a part in 10⁴ moves a bfloat16 output (g rounded to bfloat16 first would not).
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
        """Set start values; rewrite W to W0 − s·B A for residual methods; m = ‖V‖_row."""
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
            self.magnitude.copy_(self.row_norm())
            self.init_magnitude = self.magnitude.detach().clone()  # to measure how far m moves in training

    def _rewrite_residual(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """W ← W − s·B0 A0 (in row blocks), and keep B0, A0 on the CPU for saving and export."""
        self.kind.set_weight(self.base_layer, _residual(self.weight, b0.to(self.lora_B), a0.to(self.lora_A), self.scaling))
        self.init_A, self.init_B = a0.detach().to("cpu", copy=True), b0.detach().to("cpu", copy=True)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the cached frozen quantities (after initialising or loading factors)."""
        self._w_sq = norm.row_sq(self.kind.row_blocks(self.base_layer, self.lora_A.dtype))
        self._C = self._G = None
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
        fast = _CUDA_OUT_DTYPE[0] and w.is_cuda and w.dtype in (torch.bfloat16, torch.float16)
        if fast and self.kind in (LinearKind, Conv1DKind) and not (a.requires_grad and torch.is_grad_enabled()):
            try:
                return norm.weight_times_at_cuda(self.weight, a)
            except (RuntimeError, TypeError, NotImplementedError):  # a torch without float32-output GEMMs
                _CUDA_OUT_DTYPE[0] = False
        return norm.weight_times_at(lambda dtype: self.kind.row_blocks(self.base_layer, dtype), a)

    def _c_and_g(self) -> tuple[torch.Tensor, torch.Tensor]:
        """C = W Aᵀ and G = A Aᵀ for A's current value: cached while A is frozen and unchanged.

        A trainable A (dude, dora, or a frozen factor unfrozen by the user) is never served from the
        cache, so its gradient is right; a frozen A changed in place is recomputed and cached again.
        """
        a = self.lora_A
        if a.requires_grad:
            return self._weight_times_at(a), a @ a.T
        if self._C is None or self._a_version != a._version:
            with torch.no_grad():
                self._C, self._G, self._a_version = self._weight_times_at(a), a @ a.T, a._version
        return self._C, self._G

    def _norm_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """n (out,) and what its gradient needs: C = W Aᵀ, P = B R, P G (each (out, r)); differentiable
        in the factors that require grad when called with autograd on (the layer's step calls it without)."""
        c, g = self._c_and_g()
        p = self.direction()
        pg = p @ g
        return norm.closed_form_norm(self._w_sq, c, p, pg, self.scaling), c, p, pg

    def row_norm(self) -> torch.Tensor:
        """n = ‖W + s·B R A‖_row (out,) in the adapter's dtype, in closed form; no (out, in) tensor."""
        return self._norm_parts()[0]

    @torch.no_grad()
    def scale(self) -> torch.Tensor | None:
        """g = m / n (out,), or None for methods without magnitude."""
        return None if self.magnitude is None else self.magnitude / self.row_norm()

    # --- forward ---

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), in the base layer's output dtype (autocast's under autocast)."""
        if self.base_layer.weight.requires_grad:
            raise RuntimeError(
                f"the base weight under this {self.method.name} adapter has requires_grad=True; an adapter layer keeps "
                "it frozen (its row norms are cached). Train the adapter's factors, or list the module in modules_to_save"
            )
        y = self.kind.forward(self.base_layer, x, bias=self.magnitude is None)  # (..., out): x Wᵀ (+ bias)
        xd = self.dropout(x)
        dev = y.device.type
        if dev != "meta" and torch.is_autocast_enabled(dev):  # the step casts explicitly: autocast must not recast its float32 parts
            with torch.autocast(dev, enabled=False):
                return _AdapterStep.apply(y, xd, self.lora_A, self.lora_B, self.lora_R, self.magnitude, self.bias, self)
        return _AdapterStep.apply(y, xd, self.lora_A, self.lora_B, self.lora_R, self.magnitude, self.bias, self)

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


_CUDA_OUT_DTYPE = [True]  # whether torch.mm(..., out_dtype=float32) is tried for low-precision CUDA weights


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b returned in `dtype`: float32 output straight from a low-precision GEMM on CUDA, else rounded once."""
    if a.dtype == dtype:
        return a @ b
    if a.is_cuda and _CUDA_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=dtype)
        except (RuntimeError, TypeError, NotImplementedError):
            _CUDA_OUT_DTYPE[0] = False
    return (a @ b).to(dtype)


class _AdapterStep(torch.autograd.Function):
    """The adapter's part of `AdapterLayer`, forward and backward in one node, on the base matmul's output y.

    Forward, with cd = y's dtype and every small product in the adapter's dtype (float32):

        ypre = y + s·((d(x) Aᵀ) Rᵀ) Bᵀ              (N, out), in cd: one rounding
        out  = g ⊙ ypre + bias,   g = m / n          in float32, rounded once to cd

    (without a magnitude, y already carries the bias and out = ypre). It saves what a LoRA saves (d(x)
    and h1 = d(x) Aᵀ) and, with a magnitude, ypre and n; it writes `out` into y's storage. Backward
    (DESIGN.md §3):

        dL/dg = Σ_tokens grad ⊙ ypre,   dL/dm = dL/dg / n,   dL/dypre = g ⊙ grad  (= dL/dy)
        then the low-rank chain rule, and for norm="exact" the gradient of n through
        n² = ‖W‖² + 2s⟨C, P⟩ + s²⟨P G, P⟩:  dL/dP = 2s·dL/dn² ⊙ (C + s·P G),  dL/dC = 2s·dL/dn² ⊙ P,
        dL/dG = s²·Pᵀ (dL/dn² ⊙ P),  dL/dA = dL/dCᵀ W + (dL/dG + dL/dGᵀ) A.

    The gradient to y is returned to the base layer's own backward (which computes dL/dx through W), so
    the base runs exactly as it does alone: plain, quantized, under autocast or ZeRO-3. No (out, in) tensor.
    """

    @staticmethod
    def forward(ctx, y, xd, a, b, rr, m, bias, layer):
        s, cd, ad = layer.scaling, y.dtype, a.dtype
        x2 = xd.reshape(-1, xd.shape[-1]).to(cd)  # (N, in); a copy only under autocast
        h1 = x2 @ a.to(cd).T  # (N, r)
        h = h1 if rr is None else (h1.to(ad) @ rr.T).to(cd)  # (N, r)
        ctx.layer, ctx.xd_shape, ctx.xd_dtype = layer, xd.shape, xd.dtype
        y2 = y.reshape(-1, y.shape[-1])  # (N, out)
        if y._is_view():  # e.g. bitsandbytes' int8 output: a view that must not be written in place
            out = torch.empty_like(y)
        else:  # write the result into y's storage: no second (N, out) tensor
            out = y
            ctx.mark_dirty(y)
        out2 = out.view(-1, out.shape[-1])
        if m is None:
            torch.addmm(y2, h, b.to(cd).T, alpha=s, out=out2)  # y + s·h Bᵀ
            ctx.save_for_backward(x2, a, b, rr, h1)
            return out
        ypre = torch.addmm(y2, h, b.to(cd).T, alpha=s)  # (N, out)
        n, c, _, _ = layer._norm_parts()
        g = m.detach() / n  # (out,)
        if bias is None:
            torch.mul(ypre, g, out=out2)
        else:
            torch.addcmul(bias.detach(), ypre, g, out=out2)
        save_c = layer.exact_norm and layer.lora_A.requires_grad  # else C is cached, or not needed
        ctx.save_for_backward(x2, a, b, rr, h1, ypre, n, m, bias, c if save_c else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        layer, s = ctx.layer, ctx.layer.scaling
        _, need_xd, need_a, need_b, need_r, need_m, need_bias, _ = ctx.needs_input_grad
        x2, a, b, rr, h1, *with_magnitude = ctx.saved_tensors
        cd, ad = h1.dtype, a.dtype
        gy = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_m = grad_bias = None
        if with_magnitude:  # out = g ⊙ ypre + bias
            ypre, n, m, bias, c = with_magnitude
            g = m / n
            grad_g = (gy * ypre).sum(0, dtype=ad)  # (out,)
            grad_bias = gy.sum(0, dtype=bias.dtype) if need_bias else None
            grad_m = grad_g / n if need_m else None
            grad_ypre = torch.mul(gy, g, out=torch.empty_like(gy))  # (N, out), g ⊙ grad rounded once
        else:
            grad_ypre = gy
        h = h1 if rr is None else (h1.to(ad) @ rr.T).to(cd)  # (N, r), recomputed: cheaper than keeping it
        grad_h = _mm(grad_ypre, b.to(cd), ad).mul_(s)  # (N, r): d/dh of s·h Bᵀ
        grad_b = _mm(grad_ypre.T, h, ad).mul_(s) if need_b else None  # (out, r)
        grad_r = grad_h.T @ h1.to(ad) if need_r else None  # (r, r)
        grad_h1 = grad_h if rr is None else grad_h @ rr  # (N, r)
        grad_a = _mm(grad_h1.to(cd).T, x2, ad) if need_a else None  # (r, in)
        xdt = ctx.xd_dtype  # in d(x)'s own dtype: under autocast no low-precision (N, in) copy to upcast
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
        return grad_ypre.view(grad.shape), grad_xd, grad_a, grad_b, grad_r, grad_m, grad_bias, None


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
