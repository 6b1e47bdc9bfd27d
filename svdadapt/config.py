"""`AdapterConfig`: what to adapt and how, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from svdadapt.svd import SKETCHES, SOLVERS, SVDSettings

_SVD = SVDSettings()

_CHOICES = {
    "singular_values_on": ("B", "A"),
    "frozen_factors": ("svd", "random"),
    "norm": ("detached", "exact"),
    "magnitude_start": ("adapted", "base"),
    "svd_solver": SOLVERS,
    "svd_dtype": ("float32", "float64"),
    "svd_sketch": SKETCHES,
}


@dataclass(frozen=True)
class AdapterConfig:
    """One adapter method applied to a set of linear layers.

    Attributes:
        method: a registered method name (`svdadapt.methods()`), e.g. "edora", "dude", "lora".
        r: rank of the low-rank factors; must be below min(out, in) of every wrapped layer.
        alpha: the low-rank path is scaled by s = alpha / r. None takes the method's default
            (16 for lora/dora/loraxs/edora; r, i.e. s = 1, for pissa/dude).
        target_modules: which layers to wrap: a list of module-name suffixes ("q_proj" matches
            "model.layers.0.self_attn.q_proj"), a regular expression matched against the full name,
            or "all-linear" (every linear layer but the output head).
        modules_to_save: modules (name suffixes) trained in full alongside the adapter and saved
            with it, e.g. ["classifier"] for a sequence-classification head.
        dropout: dropout probability on the input of the low-rank path (the frozen path never sees it).
        sigma: standard deviation of R's normal start values (loraxs, edora).
        singular_values_on: for loraxs/edora, "B" puts Σ in B (B = U_rΣ_r, A = V_rᵀ, as the EDoRA paper
            writes) and "A" puts it in A (A = Σ_rV_rᵀ, B = U_r, as the EDoRA authors' code does).
        frozen_factors: for loraxs/edora, "svd" or "random" (Kaiming-uniform frozen A and B: the EDoRA
            paper's ablation).
        norm: "detached" treats the row norm n as a constant in backward (DoRA §4.3); "exact" lets the
            gradient flow through it.
        magnitude_start: for edora, "adapted" starts m = ‖W0 + s·B R A‖_row, so that g = m / n = 1 and
            the layer starts as W0 + s·B R A; "base" starts m = ‖W0‖_row, as the EDoRA authors' code
            does (it builds peft's DoRA, whose m is ‖W0‖_row, then puts the SVD factors and R in), so
            g starts within about s·‖B R A‖ / ‖W0‖ of 1 (3.7e-5 at most on MiniLM's query and value, r = 8,
            σ = 1e-5).
        svd_solver: "auto" (full where min(out, in) <= 1024, else randomized; each layer's choice is
            recorded in the adapter file and kept on reload), "full" or "randomized".
        svd_dtype: precision of the SVD, "float32" or "float64", whatever the model's dtype.
        svd_oversample: randomized solver's extra directions.
        svd_niter: randomized solver's power iterations.
        svd_sketch: randomized solver's power-iteration precision: "weight" (bfloat16 for a bfloat16
            weight, float32 accumulation) or "dtype" (svd_dtype). See `svdadapt.svd.SVDSettings`.
        svd_cache_dir: SVD cache location; None for the user cache dir, "" to disable caching.
        seed: seeds every random start value (per layer, from the seed and the layer's name).
    """

    method: str
    r: int = 8
    alpha: float | None = None
    target_modules: str | Sequence[str] = "all-linear"
    modules_to_save: Sequence[str] = ()
    dropout: float = 0.0
    sigma: float = 1e-5
    singular_values_on: str = "B"
    frozen_factors: str = "svd"
    norm: str = "detached"
    magnitude_start: str = "adapted"
    svd_solver: str = _SVD.solver  # the SVD settings' defaults live in svdadapt.svd.SVDSettings alone
    svd_dtype: str = _SVD.dtype
    svd_oversample: int = _SVD.oversample
    svd_niter: int = _SVD.niter
    svd_sketch: str = _SVD.sketch
    svd_cache_dir: str | None = field(default=_SVD.cache_dir, compare=False)
    seed: int = 0

    def __post_init__(self) -> None:
        from svdadapt.methods import METHOD_OPTIONS, get_method, methods

        method = get_method(self.method)  # raises with the registered names
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in METHOD_OPTIONS:
            if method.options is not None and name not in method.options and getattr(self, name) != defaults[name]:
                users = [m for m in methods() if get_method(m).options is None or name in get_method(m).options]
                raise ValueError(
                    f"AdapterConfig.{name}={getattr(self, name)!r} has no effect on method {self.method!r}; it is an "
                    f"option of {users}. Leave it at its default ({defaults[name]!r}) or pick one of those methods"
                )
        _check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r", self.r, "a positive integer")
        if self.alpha is not None:
            _check(
                _is_real(self.alpha) and self.alpha > 0,
                "alpha",
                self.alpha,
                "a positive number, or None for the method's default",
            )
        _check(_is_real(self.dropout) and 0 <= self.dropout < 1, "dropout", self.dropout, "a probability in [0, 1)")
        _check(_is_real(self.sigma) and self.sigma >= 0, "sigma", self.sigma, "a standard deviation >= 0")
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            _check(value in allowed, name, value, f"one of {list(allowed)}")
        _check(
            isinstance(self.svd_oversample, int) and self.svd_oversample >= 0,
            "svd_oversample",
            self.svd_oversample,
            "an integer >= 0",
        )
        _check(isinstance(self.svd_niter, int) and self.svd_niter >= 0, "svd_niter", self.svd_niter, "an integer >= 0")
        _check(isinstance(self.seed, int), "seed", self.seed, "an integer")
        tm = self.target_modules
        ok = isinstance(tm, str) and tm != "" or _is_str_seq(tm) and len(tm) > 0
        _check(ok, "target_modules", tm, 'a non-empty list of module-name suffixes, a regex string, or "all-linear"')
        _check(_is_str_seq(self.modules_to_save), "modules_to_save", self.modules_to_save, "a list of module-name suffixes")

    @property
    def resolved_alpha(self) -> float:
        """alpha, or the method's default for this r."""
        from svdadapt.methods import get_method

        return float(self.alpha) if self.alpha is not None else float(get_method(self.method).default_alpha(self.r))

    @property
    def scaling(self) -> float:
        """s = alpha / r."""
        return self.resolved_alpha / self.r

    @property
    def svd(self) -> SVDSettings:
        return SVDSettings(
            self.svd_solver, self.svd_dtype, self.svd_oversample, self.svd_niter, self.svd_cache_dir, self.svd_sketch
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("svd_cache_dir")  # a machine-local path, not part of what the adapter is
        for k in ("target_modules", "modules_to_save"):
            if not isinstance(d[k], str):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> AdapterConfig:
        """Build from a dict; unknown keys are reported in a warning and ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(
                f"{source}: ignoring unknown AdapterConfig keys {unknown} (written by a newer svdadapt?); "
                f"known keys: {sorted(names)}",
                stacklevel=2,
            )
        if "method" not in d:
            raise ValueError(f"{source}: the key 'method' is required (one of the registered methods)")
        kept = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kept)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_str_seq(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and all(isinstance(v, str) for v in x)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"AdapterConfig.{name}={value!r} is invalid: it must be {allowed}")
