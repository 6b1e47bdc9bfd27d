"""Adapter files: save, load (full or compact), and export to peft.

An adapter directory holds `adapter_config.json` (svdadapt version, the `AdapterConfig`, whether the
base weight is rewritten, and per wrapped layer its shape and base-weight fingerprint) and
`adapter.safetensors`. The full form stores every adapter tensor; the compact form stores only what
trained (R and m for edora) and rebuilds the frozen factors from the base weights on load.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from svdadapt.config import AdapterConfig
from svdadapt.methods import get_method
from svdadapt.model import CONFIG_ATTR, adapter_config, adapter_layers, apply, find_modules_to_save, find_targets, gathered
from svdadapt.svd import fingerprint, fingerprint_matches

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = 1


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike):
    """Yield a temporary directory that replaces `directory` only if the block succeeds."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f"{tmp.name}.old"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _version() -> str:
    from svdadapt.version import __version__

    return __version__


def adapter_state(model: nn.Module, compact: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and per-layer metadata `save_adapter` writes."""
    cfg = adapter_config(model)
    tensors, layers = {}, {}
    for name, layer in adapter_layers(model):
        with gathered(layer, modify=False):
            for factor, p in layer.factors().items():
                if p.requires_grad or not compact:
                    tensors[f"{name}.{factor}"] = p.detach()
            if layer.init_A is not None and not compact:
                tensors[f"{name}.init_A"], tensors[f"{name}.init_B"] = layer.init_A, layer.init_B
        layers[name] = {"shape": [layer.out_features, layer.in_features], "fingerprint": layer.base_fingerprint}
    for name, module in find_modules_to_save(model, cfg.modules_to_save):
        with gathered(module, modify=False):
            for pname, p in module.named_parameters():
                tensors[f"{name}.{pname}"] = p.detach()
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    return tensors, layers


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, compact: bool = False, base_model: str | None = None) -> Path:
    """Write the adapter of `model` to `directory` atomically (a temporary directory, then a rename).

    Args:
        model: a model `svdadapt.apply` adapted.
        directory: created or replaced.
        compact: store only trained tensors; frozen factors are rebuilt from the base weights on load.
        base_model: the base model's id or path, recorded for the reader.
    """
    cfg = adapter_config(model)
    tensors, layers = adapter_state(model, compact)
    meta = {
        "svdadapt_version": _version(),
        "format": FORMAT,
        "compact": compact,
        "base_model": base_model,
        "base_rewritten": get_method(cfg.method).residual,
        "config": cfg.to_dict(),
        "layers": layers,
        "modules_to_save": [n for n, _ in find_modules_to_save(model, cfg.modules_to_save)],
    }
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "svdadapt_version": _version()})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(directory)


def read_adapter_meta(directory: str | os.PathLike) -> tuple[dict, AdapterConfig]:
    """Read and check an adapter directory's config file (not its tensors); raises `ValueError` naming what is wrong."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"adapter directory {str(d)!r} does not exist; pass the directory save_adapter wrote")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / f).is_file():
            raise ValueError(f"adapter directory {str(d)!r} has no {f}; it is incomplete: save the adapter again")
    try:
        meta = json.loads((d / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{d / CONFIG_FILE} is not valid JSON ({e}); the file is damaged: save the adapter again") from None
    for key in ("config", "layers"):
        if key not in meta:
            raise ValueError(f"{d / CONFIG_FILE} has no {key!r} entry: it was not written by svdadapt.save_adapter")
    if meta.get("format", FORMAT) > FORMAT:
        raise ValueError(
            f"{d / CONFIG_FILE} has format {meta['format']} from svdadapt {meta.get('svdadapt_version')}; upgrade svdadapt to read it"
        )
    return meta, AdapterConfig.from_dict(meta["config"], source=str(d / CONFIG_FILE))


def read_adapter(directory: str | os.PathLike) -> tuple[dict, AdapterConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter directory's files; raises `ValueError` naming what is wrong."""
    d = Path(directory)
    meta, cfg = read_adapter_meta(d)
    try:
        tensors = load_file(str(d / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{d / WEIGHTS_FILE} is truncated or corrupted ({e}); save the adapter again") from None
    return meta, cfg, tensors


def check_layers(model: nn.Module, meta: dict, cfg: AdapterConfig, directory: str | os.PathLike) -> dict[str, nn.Module]:
    """The model's target modules, checked against the adapter's layer names and shapes (works on a
    meta-device model); a mismatch raises `ValueError` naming the base model the adapter records."""
    from svdadapt.kinds import base_kind

    trained_on = (
        f"the adapter was trained on base model {meta['base_model']!r}"
        if meta.get("base_model")
        else "is this the right base model?"
    )
    saved = meta["layers"]
    try:
        targets = dict(find_targets(model, cfg))
    except ValueError as e:
        raise ValueError(f"{directory}: {e}; {trained_on}") from None
    if missing := sorted(set(saved) - set(targets)):
        raise ValueError(
            f"{directory}: the adapter wraps layers the model does not have or does not target: {missing[:5]}; {trained_on}"
        )
    if extra := sorted(set(targets) - set(saved)):
        raise ValueError(f"{directory}: the model has target layers the adapter lacks: {extra[:5]}; {trained_on}")
    for name, module in targets.items():
        with gathered(module, modify=False):
            shape = tuple(base_kind(module).weight(module).shape)
        if list(shape) != list(saved[name]["shape"]):
            raise ValueError(
                f"{directory}: layer {name!r} has shape {shape} in the model but {tuple(saved[name]['shape'])} in the adapter; "
                f"wrong base model: {trained_on}"
            )
    return targets


def _expected_shapes(meta: dict, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    method, r, compact = get_method(cfg.method), cfg.r, meta.get("compact", False)
    shapes = {}
    for name, info in meta["layers"].items():
        out_f, in_f = info["shape"]
        full = {"A": (r, in_f), "B": (out_f, r), "R": (r, r), "magnitude": (out_f,)}
        for factor, shape in full.items():
            present = factor in ("A", "B") or (factor == "R" and method.has_R) or (factor == "magnitude" and method.magnitude)
            if present and (factor in method.trainable or not compact):
                shapes[f"{name}.{factor}"] = shape
        if method.residual and not compact:
            shapes[f"{name}.init_A"], shapes[f"{name}.init_B"] = full["A"], full["B"]
    return shapes


def _mismatch(directory: Path, name: str, w: torch.Tensor, saved: str) -> str:
    """The error for a base weight whose fingerprint differs: names the dtype the adapter was trained on
    when this weight, rounded to it, is the one (DeepSpeed with bf16 holds a float32 model in bfloat16)."""
    others = [t for t in (torch.bfloat16, torch.float16, torch.float32) if w.is_floating_point() and t != w.dtype]
    trained = next((t for t in others if fingerprint_matches(w.to(t), saved)), None)
    if trained is None:
        return (
            f"{directory}: the base weight of layer {name!r} differs from the one the adapter was trained on "
            f"(fingerprint mismatch; dtype here {w.dtype}). Load the same base model and dtype, or pass check_fingerprint=False"
        )
    short = str(trained).removeprefix("torch.")
    return (
        f"{directory}: the adapter was trained on this model's weights in {short} (layer {name!r}), and they are "
        f"{str(w.dtype).removeprefix('torch.')} here. Load the model in {short} (a recipe's model.dtype, `svdadapt eval "
        f"--dtype {short}`), or pass check_fingerprint=False to apply it to these weights (outputs then differ from "
        f"training's by {short} rounding)"
    )


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, check_fingerprint: bool = True) -> nn.Module:
    """Apply the adapter saved in `directory` to the unmodified base `model`, in place.

    Everything is checked before the model changes: the files, the layer names and shapes, the
    base weights' fingerprints, and every tensor's shape. Returns `model`.
    """
    meta, cfg, tensors = read_adapter(directory)
    d = Path(directory)
    targets = check_layers(model, meta, cfg, d)
    saved = meta["layers"]
    from svdadapt.kinds import base_kind

    prints = {name: info.get("fingerprint") for name, info in saved.items()}
    for name, module in targets.items() if check_fingerprint else ():
        with gathered(module, modify=False):
            w = base_kind(module).weight(module)
            if prints[name] is None:
                continue
            current = fingerprint(w)
            try:
                same = fingerprint_matches(w, prints[name], current)
            except ValueError as e:
                raise ValueError(f"{d / CONFIG_FILE}, layer {name!r}: {e}") from None
            if not same:
                raise ValueError(_mismatch(d, name, w, prints[name]))
            prints[name] = current  # a checked version-1 fingerprint is carried on in the current version
    shapes = _expected_shapes(meta, cfg)
    keep = {f"{n}.{p}": q for n, m in find_modules_to_save(model, cfg.modules_to_save) for p, q in m.named_parameters()}
    shapes.update({k: tuple(getattr(v, "ds_shape", v.shape)) for k, v in keep.items()})  # ZeRO-3: the whole shape
    if missing := sorted(set(shapes) - set(tensors)):
        raise ValueError(
            f"{d / WEIGHTS_FILE} lacks tensors {missing[:5]} ({len(missing)} in all); the file does not match its config"
        )
    for k, shape in shapes.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise ValueError(f"{d / WEIGHTS_FILE}: tensor {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(shape)}")
    apply(model, cfg, initialize=meta.get("compact", False))
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            layer.base_fingerprint = prints[name]
            prefix = f"{name}."
            with gathered(layer, modify=True):  # a full residual state rewrites the base weight
                layer.load_factors({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k in shapes})
        for name, module in find_modules_to_save(model, cfg.modules_to_save):
            with gathered(module, modify=True):
                for pname, p in module.named_parameters():
                    p.copy_(tensors[f"{name}.{pname}"])
    return model


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a directory `peft.PeftModel.from_pretrained(<unmodified base>, directory)` loads.

    Every method maps to LoRA (no magnitude) or DoRA (magnitude): lora_B = B R, lora_A = A; a
    residual method (pissa, dude) becomes rank 2r with lora_B = [B R, −B0], lora_A = [A; A0], which
    adds s·(B A − B0 A0) to the unmodified W0, i.e. exactly W_res + s·B A.
    """
    from peft import LoraConfig

    cfg = adapter_config(model)
    method = get_method(cfg.method)
    tensors, fan_in_fan_out, rank = {}, False, cfg.r * (2 if method.residual else 1)
    for name, layer in adapter_layers(model):
        with gathered(layer, modify=False), torch.no_grad():
            b, a = layer.direction(), layer.lora_A
            if method.residual:
                b, a = torch.cat([b, -layer.init_B.to(b)], 1), torch.cat([a, layer.init_A.to(a)], 0)  # B0, A0 live on the CPU
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
            if layer.magnitude is not None:
                tensors[f"{key}.lora_magnitude_vector"] = layer.magnitude
        fan_in_fan_out |= layer.kind.__name__ == "Conv1DKind"
    for name, module in find_modules_to_save(model, cfg.modules_to_save):
        for pname, p in module.named_parameters():
            tensors[f"base_model.model.{name}.{pname}"] = p
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    peft_cfg = LoraConfig(
        r=rank,
        lora_alpha=cfg.scaling * rank,
        target_modules=[n for n, _ in adapter_layers(model)],
        lora_dropout=cfg.dropout,
        use_dora=method.magnitude,
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=list(cfg.modules_to_save) or None,
        bias="none",
    )
    with atomic_directory(directory) as tmp:
        peft_cfg.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(directory)


__all__ = [
    "save_adapter",
    "load_adapter",
    "export_peft",
    "read_adapter",
    "read_adapter_meta",
    "check_layers",
    "atomic_directory",
    "CONFIG_ATTR",
]
