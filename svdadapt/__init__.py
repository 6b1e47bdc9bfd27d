"""svdadapt: SVD-initialised, weight-decomposed adapters (DuDe, EDoRA, and relatives) on one code path.

The names below import on first use (PEP 562), so `import svdadapt` and `svdadapt --help` stay
fast: torch and transformers load only when a model is touched.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterConfig": "svdadapt.config",
    "AdapterLayer": "svdadapt.layer",
    "Factors": "svdadapt.methods",
    "InitContext": "svdadapt.methods",
    "adapter_layers": "svdadapt.model",
    "apply": "svdadapt.model",
    "export_peft": "svdadapt.io",
    "load_adapter": "svdadapt.io",
    "merge": "svdadapt.model",
    "methods": "svdadapt.methods",
    "register_base_kind": "svdadapt.layer",
    "register_method": "svdadapt.methods",
    "save_adapter": "svdadapt.io",
    "trainable_parameters": "svdadapt.model",
}
_SUBMODULES = ("bench", "config", "count", "data", "evaluate", "io", "layer", "methods", "model", "paths", "quant")
_SUBMODULES += ("quant_error", "recipe", "report", "serve", "svd", "sweep", "tasks", "train")

__all__ = sorted(_EXPORTS)


class _Package(types.ModuleType):
    """The package module. Importing a submodule sets it as an attribute of the package; where a
    public function has the submodule's name (`svdadapt.methods()`), the function keeps the name."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and name in _SUBMODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
