"""The method registry: every method is one initialiser feeding the one `AdapterLayer`.

A method says, from the frozen weight W0 (out, in), what the factors A (r, in), B (out, r) and
optionally R (r, r) start as; its registration says which of A, B, R and the magnitude m train,
and whether the frozen base becomes the residual W0 − s·B A (PiSSA-style). Add one from user code:

    @svdadapt.register_method("mine", trainable=("B",), magnitude=True)
    def mine(weight, ctx):  # weight: W0 in its stored dtype (upcast it before arithmetic)
        U, S, Vh = ctx.svd(weight)
        return svdadapt.Factors(A=Vh, B=torch.zeros_like(U))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from svdadapt import norm
from svdadapt.svd import truncated_svd

FACTORS = ("A", "B", "R", "magnitude")
# AdapterConfig fields that only some methods read (the SVD settings are not among them: they say how
# an SVD is computed, for whichever method takes one, so one recipe serves every method)
METHOD_OPTIONS = ("sigma", "singular_values_on", "frozen_factors", "norm", "magnitude_start")


@dataclass(frozen=True)
class Factors:
    """Start values of one layer's low-rank factors, in float32 or wider."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    R: torch.Tensor | None = None  # (r, r)
    magnitude: torch.Tensor | None = None  # (out,): m's start; None: ‖W + s·B (R) A‖_row, so that g = 1


@dataclass
class InitContext:
    """What an initialiser may use besides the weight."""

    config: object  # AdapterConfig
    generator: torch.Generator  # seeded from config.seed and the layer's name
    weight_hash: str | None = None

    @property
    def r(self) -> int:
        return self.config.r

    @property
    def scaling(self) -> float:
        return self.config.scaling

    def svd(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached, sign-canonical top-r SVD of `weight`: U (out, r), S (r,), Vh (r, in), in
        `config.svd_dtype` whatever the weight's dtype."""
        return truncated_svd(weight, self.r, self.config.svd, self.weight_hash)

    def kaiming_uniform(self, rows: int, cols: int, dtype=torch.float32) -> torch.Tensor:
        """nn.Linear's default init for a (rows, cols) weight: U(-1/√cols, 1/√cols)."""
        bound = 1.0 / math.sqrt(cols)
        return (torch.rand(rows, cols, generator=self.generator, dtype=dtype) * 2 - 1) * bound

    def normal(self, rows: int, cols: int, std: float, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(rows, cols, generator=self.generator, dtype=dtype) * std


@dataclass(frozen=True)
class Method:
    """A registered method: its initialiser and what trains."""

    name: str
    init: Callable[[torch.Tensor, InitContext], Factors]
    trainable: frozenset[str]
    magnitude: bool
    residual: bool
    has_R: bool
    default_alpha: Callable[[int], float]
    options: frozenset[str] | None = None  # the method-specific AdapterConfig fields it reads; None: any

    def trainable_count(self, out_features: int, in_features: int, r: int) -> int:
        """Trainable parameters this method adds to one (out, in) layer, in closed form."""
        sizes = self._sizes(out_features, in_features, r)
        return sum(sizes[name] for name in self.trainable)

    def parameter_count(self, out_features: int, in_features: int, r: int) -> int:
        """Every parameter (trainable or frozen) the layer allocates for this method: A, B, R, m as it has them."""
        sizes = self._sizes(out_features, in_features, r)
        return sizes["A"] + sizes["B"] + sizes["R"] * self.has_R + sizes["magnitude"] * self.magnitude

    @staticmethod
    def _sizes(out_features: int, in_features: int, r: int) -> dict[str, int]:
        return {"A": r * in_features, "B": out_features * r, "R": r * r, "magnitude": out_features}


_REGISTRY: dict[str, Method] = {}


def register_method(
    name: str,
    *,
    trainable: tuple[str, ...],
    magnitude: bool = False,
    residual: bool = False,
    has_R: bool = False,
    default_alpha: float | Callable[[int], float] = 16.0,
    options: tuple[str, ...] | None = None,
    replace: bool = False,
):
    """Register an initialiser under `name` (decorator).

    The initialiser is called as `fn(weight, ctx)` with the frozen base weight W0 (out, in) in its
    stored dtype (bfloat16 for a bfloat16 model: upcast it before doing arithmetic with it) and an
    `InitContext`; it returns `Factors` in float32 or wider.

    Args:
        name: the method's name, as used in `AdapterConfig(method=...)`.
        trainable: which of "A", "B", "R", "magnitude" train; the rest stay frozen.
        magnitude: whether the layer rescales rows to a learned magnitude m (DoRA-style).
        residual: whether the frozen base weight becomes W0 − s·B A at initialisation (PiSSA-style).
        has_R: whether the initialiser returns an (r, r) R between A and B.
        default_alpha: alpha when the config gives none: a number, or a function of r.
        options: which method-specific `AdapterConfig` fields (`METHOD_OPTIONS`) the method reads;
            a config that sets another one away from its default is refused. None accepts them all.
        replace: replace a method already registered under `name` (a built-in included).
    """
    bad = set(trainable) - set(FACTORS)
    if bad or not trainable:
        raise ValueError(f"register_method({name!r}): trainable={trainable!r} must be a non-empty subset of {FACTORS}")
    if "magnitude" in trainable and not magnitude:
        raise ValueError(f"register_method({name!r}): 'magnitude' is trainable but magnitude=False")
    if "R" in trainable and not has_R:
        raise ValueError(f"register_method({name!r}): 'R' is trainable but has_R=False")
    if residual and has_R:
        raise ValueError(f"register_method({name!r}): residual=True needs a method without R")
    if not isinstance(name, str) or not name:
        raise ValueError("register_method: name must be a non-empty string")
    if name in _REGISTRY and not replace:
        raise ValueError(
            f"register_method({name!r}): a method of that name is registered already; pass replace=True to replace it"
        )
    if options is not None and (bad := set(options) - set(METHOD_OPTIONS)):
        raise ValueError(
            f"register_method({name!r}): options {sorted(bad)} are not method options; choose from {list(METHOD_OPTIONS)}"
        )
    alpha = default_alpha if callable(default_alpha) else (lambda r, a=float(default_alpha): a)

    def decorator(fn):
        opts = None if options is None else frozenset(options)
        _REGISTRY[name] = Method(name, fn, frozenset(trainable), magnitude, residual, has_R, alpha, opts)
        return fn

    return decorator


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; registered methods: {methods()}") from None


def methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


# --- built-in methods (DESIGN §2) ---------------------------------------------------------


def _kaiming_lowrank(weight: torch.Tensor, ctx: InitContext) -> Factors:
    out_f, in_f = weight.shape
    return Factors(A=ctx.kaiming_uniform(ctx.r, in_f), B=torch.zeros(out_f, ctx.r))


def _principal(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """PiSSA: B = U√S/√s, A = √S Vᵀ/√s, so that s·B A is the top-r part of W0."""
    u, s, vh = ctx.svd(weight)
    root = (s / ctx.scaling).sqrt()
    return Factors(A=root[:, None] * vh, B=u * root)


def _frozen_basis(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """LoRA-XS/EDoRA: frozen B, A from the SVD (Σ on B or A) or random; R ~ N(0, σ²)."""
    cfg, r = ctx.config, ctx.r
    out_f, in_f = weight.shape
    if cfg.frozen_factors == "random":
        a, b = ctx.kaiming_uniform(r, in_f), ctx.kaiming_uniform(out_f, r)
    else:
        u, s, vh = ctx.svd(weight)
        a, b = (vh, u * s) if cfg.singular_values_on == "B" else (s[:, None] * vh, u)
    m = None
    if cfg.magnitude_start == "base":  # the EDoRA authors' start: ‖W0‖_row, before R and the factors enter
        wide = torch.promote_types(weight.dtype, a.dtype)
        m = torch.cat([torch.linalg.vector_norm(blk, dim=1) for blk in norm.row_blocks(weight, wide)])
    return Factors(A=a, B=b, R=ctx.normal(r, r, cfg.sigma, dtype=a.dtype), magnitude=m)


_BASIS = ("sigma", "singular_values_on", "frozen_factors")
register_method("lora", trainable=("A", "B"), options=())(_kaiming_lowrank)
register_method("dora", trainable=("A", "B", "magnitude"), magnitude=True, options=("norm",))(_kaiming_lowrank)
register_method("pissa", trainable=("A", "B"), residual=True, default_alpha=float, options=())(_principal)
register_method("dude", trainable=("A", "B", "magnitude"), magnitude=True, residual=True, default_alpha=float, options=("norm",))(
    _principal
)
register_method("loraxs", trainable=("R",), has_R=True, options=_BASIS)(_frozen_basis)
register_method("edora", trainable=("R", "magnitude"), magnitude=True, has_R=True, options=(*_BASIS, "norm", "magnitude_start"))(
    _frozen_basis
)
