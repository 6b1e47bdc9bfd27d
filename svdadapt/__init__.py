"""svdadapt: SVD-initialised, weight-decomposed adapters (DuDe, EDoRA, and relatives) on one code path."""

__version__ = "0.1.0"

from svdadapt.config import AdapterConfig
from svdadapt.io import export_peft, load_adapter, save_adapter
from svdadapt.layer import AdapterLayer, register_base_kind
from svdadapt.methods import Factors, InitContext, methods, register_method
from svdadapt.model import adapter_layers, apply, merge, trainable_parameters

__all__ = [
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

# registers the bitsandbytes layer kinds (imports no bitsandbytes itself)
from svdadapt import quant  # noqa: E402, F401
