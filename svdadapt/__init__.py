"""svdadapt: SVD-initialised, weight-decomposed adapters (DuDe, EDoRA, and relatives) on one code path."""

from svdadapt.config import AdapterConfig
from svdadapt.io import export_peft, load_adapter, save_adapter
from svdadapt.layer import AdapterLayer, register_base_kind
from svdadapt.methods import Factors, InitContext, methods, register_method
from svdadapt.model import adapter_layers, apply, merge, trainable_parameters
from svdadapt.version import __version__

__all__ = [
    "__version__",
    "AdapterConfig",
    "AdapterLayer",
    "Factors",
    "InitContext",
    "adapter_layers",
    "apply",
    "export_peft",
    "load_adapter",
    "merge",
    "methods",
    "register_base_kind",
    "register_method",
    "save_adapter",
    "trainable_parameters",
]


def __getattr__(name: str):
    """`svdadapt.quant`, `svdadapt.serve`, ...: submodules load when first used, not on `import svdadapt`."""
    import importlib

    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"svdadapt.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"svdadapt.{name}":
            raise
        raise AttributeError(f"module 'svdadapt' has no attribute {name!r}") from None
