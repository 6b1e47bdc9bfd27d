"""svdadapt: SVD-initialised, weight-decomposed adapters (DuDe, EDoRA, and relatives) on one code path.

The public names and the submodules (`svdadapt.quant`, `svdadapt.serve`, ...) load on first use
(PEP 562), so `import svdadapt` and `svdadapt --help` import neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types

from svdadapt.version import __version__


class _NoOptionalKernelNotice(logging.Filter):
    """bitsandbytes (>= 0.49, on a CPU with AVX512-BF16) tries to fetch an optional faster 4-bit CPU kernel from
    the hub when it is imported and logs a warning when it cannot (offline, or the repository is not on the
    remote-code allowlist); it then uses its own kernels, with the same results. svdadapt drops that one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (
            msg.startswith("Failed to load CPU gemm_4bit_forward") or "kernels-community/quantization-bitsandbytes" in msg
        )


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):  # the notice, and its offline form
    logging.getLogger(_name).addFilter(_NoOptionalKernelNotice())

_EXPORTS = {
    "AdapterConfig": "svdadapt.config",
    "AdapterLayer": "svdadapt.layer",
    "Factors": "svdadapt.methods",
    "InitContext": "svdadapt.methods",
    "adapter_layers": "svdadapt.model",
    "apply": "svdadapt.model",
    "clear_gguf_quantizer": "svdadapt.model",
    "export_peft": "svdadapt.io",
    "load_adapter": "svdadapt.io",
    "merge": "svdadapt.model",
    "methods": "svdadapt.methods",
    "register_base_kind": "svdadapt.kinds",
    "register_method": "svdadapt.methods",
    "save_adapter": "svdadapt.io",
    "trainable_parameters": "svdadapt.model",
}

__all__ = ["__version__", *_EXPORTS]


class _Package(types.ModuleType):
    """The package module. Importing a submodule sets it as an attribute of the package; where a
    public function has the submodule's name (`svdadapt.methods()`), the function keeps the name."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    """A public name from its module, or a submodule (`svdadapt.quant`), imported on first use."""
    if name.startswith("_"):
        raise AttributeError(name)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"svdadapt.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"svdadapt.{name}":
            raise
        raise AttributeError(f"module 'svdadapt' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
