"""The model API: apply adapters to any `nn.Module`, count, merge.

model = svdadapt.apply(model, svdadapt.AdapterConfig(method="edora", r=16, target_modules=["q_proj", "v_proj"]))
print(svdadapt.trainable_parameters(model))
plain = svdadapt.merge(model)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from svdadapt.config import AdapterConfig
from svdadapt.kinds import base_kind, is_supported
from svdadapt.layer import AdapterLayer, FoldCheck
from svdadapt.methods import Factors, InitContext, get_method
from svdadapt.svd import fingerprint

CONFIG_ATTR = "svdadapt_config"
_HEAD_NAMES = ("lm_head", "embed_out", "output_projection")
logger = logging.getLogger("svdadapt")


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Every `AdapterLayer` in `model`, by name (the name of the layer it wraps)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The config `apply` used on `model`; raises if it has no adapters."""
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no svdadapt adapters: call svdadapt.apply(model, config) first")
    return cfg


def name_matches(name: str, suffixes) -> bool:
    """Whether a module name equals one of `suffixes` or ends in "." + one of them."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _inside(name: str, suffixes) -> bool:
    """Whether `name` or one of its ancestors matches a suffix."""
    parts = name.split(".")
    return any(name_matches(".".join(parts[:i]), suffixes) for i in range(1, len(parts) + 1))


def output_heads(model: nn.Module) -> set[int]:
    """ids of the model's output heads: `get_output_embeddings()` and modules named like one
    (lm_head, embed_out, output_projection). "all-linear" and quantization leave them alone."""
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        with contextlib.suppress(Exception):
            if (emb := get()) is not None:
                heads.add(id(emb))
    for name, module in model.named_modules():
        if name and name.rsplit(".", 1)[-1] in _HEAD_NAMES:
            heads.add(id(module))
    return heads


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The modules `config.target_modules` selects, checked; raises if none or unsupported."""
    tm, keep = config.target_modules, config.modules_to_save
    heads = output_heads(model)
    found = []
    for name, module in model.named_modules():
        if not name or _inside(name, keep):  # modules_to_save train in full: never wrapped
            continue
        if tm == "all-linear":
            hit = is_supported(module) and id(module) not in heads
        elif isinstance(tm, str):
            hit = re.fullmatch(tm, name) is not None
        else:
            hit = name_matches(name, tm)
        if hit:
            if isinstance(module, AdapterLayer) or any(isinstance(m, AdapterLayer) for m in module.modules()):
                raise ValueError(f"module {name!r} is already adapted: svdadapt.apply was called on this model before")
            base_kind(module, name)  # raises for an unsupported type, naming the module
            found.append((name, module))
    # a suffix may match both a container and its leaf (e.g. "output.dense" in BERT); keep leaves
    found = [(n, m) for n, m in found if not any(o.startswith(n + ".") for o, _ in found)]
    if not found:
        linear = [n for n, m in model.named_modules() if n and is_supported(m)]
        ends = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"target_modules={tm!r} matches no supported layer of {type(model).__name__}. "
            f'Supported layers end in: {ends[:20]}; e.g. {linear[:4]}. Pass suffixes like {ends[:2]} or "all-linear".'
        )
    return found


def find_modules_to_save(model: nn.Module, names) -> list[tuple[str, nn.Module]]:
    out = []
    for want in names:
        hits = [(n, m) for n, m in model.named_modules() if n and name_matches(n, [want])]
        if not hits:
            top = [n for n, _ in model.named_children()]
            raise ValueError(f"modules_to_save entry {want!r} matches no module; top-level modules: {top}")
        out += hits
    return out


def _layer_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")


def _check_rank(name: str, module: nn.Module, r: int) -> None:
    out_f, in_f = base_kind(module).weight(module).shape
    if r >= min(out_f, in_f):
        raise ValueError(
            f"AdapterConfig.r={r} is too large for module {name!r} of shape ({out_f}, {in_f}): "
            f"r must be below {min(out_f, in_f)}; lower r or leave this module out of target_modules"
        )


@contextlib.contextmanager
def gathered(module: nn.Module, modify: bool):
    """Gather a ZeRO-3 partitioned module's parameters for the duration (no-op otherwise); with
    `modify`, what rank 0 writes is partitioned back to every rank on exit."""
    params = _partitioned(module)
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) has sharded any of `model`'s parameters (DTensors)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):  # FSDP2 needs a process group
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def refuse_sharded(model: nn.Module, what: str) -> None:
    """`what` needs whole parameters: refuse a model FSDP2 has already sharded, saying the order to use."""
    if sharded(model):
        raise ValueError(
            f"{what}: the model's parameters are already sharded by FSDP (fully_shard). Call apply, load_adapter "
            "and merge on the whole model: apply (or load_adapter) first, then fully_shard; to merge, save_adapter "
            "on every rank, load it onto a whole base model and merge that"
        )


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` detached and whole: an FSDP2-sharded tensor (a DTensor) is gathered from every rank (collective)."""
    t = t.detach()
    gather = getattr(t, "full_tensor", None)
    return t if gather is None else gather()


def _partitioned(module: nn.Module) -> list[nn.Parameter]:
    """The ZeRO-3 partitioned parameters of `module` (empty without DeepSpeed)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def _register_partitioned(layer: AdapterLayer) -> None:
    """Under ZeRO-3, let DeepSpeed gather the base layer's parameters whenever `layer` runs: the layer
    reads its base weight (the norm, the closed-form step) outside the base layer's own forward."""
    if params := _partitioned(layer.base_layer):
        from deepspeed import zero

        for p in params:
            zero.register_external_parameter(layer, p)


def wrap(name: str, module: nn.Module, config: AdapterConfig) -> AdapterLayer:
    """Construct (not initialise) the `AdapterLayer` for one base module."""
    return AdapterLayer(
        module, get_method(config.method), config.r, config.scaling, config.dropout, exact_norm=config.norm == "exact"
    )


def _check_finite(name: str, w: torch.Tensor) -> None:
    """Raise if w has a NaN or an Inf. min and max carry both (NaN propagates), and reading them is one
    pass with no (out, in) temporary: ~40x faster than `isfinite(w).all()` on a bf16 weight."""
    lo, hi = torch.aminmax(w.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"module {name!r}: its weight has NaN or Inf values; fix the checkpoint before adapting it")


def start_factors(name: str, module: nn.Module, config: AdapterConfig) -> tuple[Factors, str]:
    """The method's start values for the base `module` (left unchanged) and its weight's fingerprint.
    Under ZeRO-3, call it with the module's weight gathered."""
    w = base_kind(module).weight(module)
    _check_finite(name, w)
    key = fingerprint(w)
    gen = torch.Generator().manual_seed(_layer_seed(config.seed, name))
    with torch.no_grad():  # the weight in its stored dtype: the SVD upcasts what it needs
        return get_method(config.method).init(w.detach(), InitContext(config, gen, key)), key


def initialize_layer(name: str, layer: AdapterLayer, config: AdapterConfig) -> None:
    """Compute the method's start values from the base weight and set them (SVD in float32+)."""
    with gathered(layer.base_layer, modify=layer.method.residual), torch.no_grad():
        factors, layer.base_fingerprint = start_factors(name, layer.base_layer, config)
        layer.initialize(factors)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply(model: nn.Module, config: AdapterConfig, *, progress: bool | None = None, initialize: bool = True) -> nn.Module:
    """Wrap the layers `config` selects in `AdapterLayer`s, in place, and freeze everything else.

    Everything is checked before the model changes: targets exist and are supported, r fits,
    weights are finite. `modules_to_save` stay trainable. Returns `model`.

    Args:
        model: any `nn.Module` (HF transformers models included).
        config: the adapter to apply.
        progress: show a progress bar over layers; None shows one for more than 8 layers.
        initialize: compute start values (SVD etc.); False leaves them to a later load.
    """
    refuse_sharded(model, "apply")
    if getattr(model, CONFIG_ATTR, None) is not None or adapter_layers(model):
        raise ValueError(
            f"{type(model).__name__} already has svdadapt adapters; apply once per model "
            "(load a fresh base model, or svdadapt.merge(model) first to fold the adapter in)"
        )
    targets = find_targets(model, config)
    keep = find_modules_to_save(model, config.modules_to_save)
    for name, module in targets:
        with gathered(module, modify=False):  # under ZeRO-3 a partitioned weight has no shape until gathered
            _check_rank(name, module, config.r)
    if initialize:
        for name, module in targets:
            with gathered(module, modify=False), torch.no_grad():
                _check_finite(name, base_kind(module).weight(module))
    for p in model.parameters():
        p.requires_grad_(False)
    show = len(targets) > 8 if progress is None else progress
    for name, module in tqdm(targets, desc=f"svdadapt {config.method} r={config.r}", disable=not show, unit="layer"):
        with gathered(module, modify=False):
            layer = wrap(name, module, config)
        layer.train(module.training)  # a model in eval mode stays in eval mode (the folded inference path)
        if initialize:
            initialize_layer(name, layer, config)
        _register_partitioned(layer)
        replace_module(model, name, layer)
    for _, module in keep:
        for p in module.parameters():
            p.requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    FoldCheck([m for _, m in adapter_layers(model)]).install(model)
    clear_gguf_quantizer(model)
    return model


def _quant_method(model: nn.Module) -> str | None:
    """The name of the transformers quantization method marking `model` ("gguf", "bitsandbytes", ...), or None."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    method = method or getattr(model, "quantization_method", None)
    return None if method is None else str(getattr(method, "value", method))


def clear_gguf_quantizer(model: nn.Module) -> bool:
    """Remove the quantizer mark transformers leaves on a model loaded from a GGUF file.

    transformers dequantizes a GGUF file into plain float layers but still marks the model quantized,
    so the HF Trainer (and TRL's) refuses to fine-tune it and `save_pretrained` refuses to write it.
    Where the mark is GGUF's and every parameter is a plain float tensor, the mark and
    `config.quantization_config` are removed and True is returned; any other model (a truly quantized
    bitsandbytes base included) is left as it is and False is returned. `apply` calls this, so the
    model `merge` returns is unmarked too.
    """
    if _quant_method(model) != "gguf":
        return False
    if not all(type(p) is nn.Parameter and p.is_floating_point() for p in model.parameters()):
        return False  # some weights really are quantized: the mark stays true
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    logger.warning(
        "svdadapt: %s was loaded from GGUF into plain float weights; its quantized mark is cleared, so trainers "
        "fine-tune it and save_pretrained writes it",
        type(model).__name__,
    )
    return True


FULL_MODULE = "full module"  # what a modules_to_save row of ParameterCount.layers says


@dataclass
class ParameterCount:
    """Trainable and total parameter counts, with a per-layer breakdown."""

    trainable: int
    total: int
    layers: list[tuple[str, str, int]] = field(default_factory=list)  # (name, what, trainable count)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    @property
    def adapter(self) -> int:
        """Trainable parameters of the adapter layers alone (modules_to_save not counted)."""
        return sum(n for _, what, n in self.layers if what != FULL_MODULE)

    def __iter__(self):  # `trainable, total = svdadapt.trainable_parameters(model)`
        return iter((self.trainable, self.total))

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"

    def report(self) -> str:
        """A table: one row per adapted layer or saved module, then the totals."""
        width = max([len(n) for n, _, _ in self.layers] + [5])
        rows = [f"{'layer':<{width}}  {'what':<24}  {'trainable':>12}"]
        rows += [f"{n:<{width}}  {w:<24}  {c:>12,}" for n, w, c in self.layers]
        return "\n".join(rows + [str(self)])


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", None) or p.numel()


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable and total parameters (ZeRO-3 partitioned ones at full size)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += _numel(p)
        trainable += _numel(p) if p.requires_grad else 0
    rows = []
    for name, layer in adapter_layers(model):
        parts = [k for k, v in layer.factors().items() if v.requires_grad]
        rows.append((name, f"{layer.method.name}: {'+'.join(parts)}", sum(_numel(layer.factors()[k]) for k in parts)))
    cfg = getattr(model, CONFIG_ATTR, None)
    for name, module in find_modules_to_save(model, cfg.modules_to_save) if cfg else []:
        rows.append((name, FULL_MODULE, sum(_numel(p) for p in module.parameters() if p.requires_grad)))
    return ParameterCount(trainable, total, rows)


def count_plan(model: nn.Module, config: AdapterConfig) -> ParameterCount:
    """What `apply(model, config)` would train, from shapes only: works on a meta-device model."""
    method = get_method(config.method)
    rows, added = [], 0
    for name, module in find_targets(model, config):
        _check_rank(name, module, config.r)  # what apply refuses is not counted either
        out_f, in_f = base_kind(module).weight(module).shape
        rows.append((name, method.name, method.trainable_count(out_f, in_f, config.r)))
        added += method.parameter_count(out_f, in_f, config.r)  # frozen factors count in the total, as after apply
    for name, module in find_modules_to_save(model, config.modules_to_save):
        rows.append((name, FULL_MODULE, sum(p.numel() for p in module.parameters())))
    total = sum(p.numel() for p in model.parameters()) + added
    return ParameterCount(sum(c for _, _, c in rows), total, rows)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer: returns the model with plain layers, in place.

    The result has no svdadapt types left, so `save_pretrained` and a plain `from_pretrained` of the
    base class round-trip it (a GGUF-loaded base included: `apply` cleared its mark, see `clear_gguf_quantizer`).
    """
    adapter_config(model)
    refuse_sharded(model, "merge")
    for name, layer in adapter_layers(model):
        with gathered(layer, modify=False):
            replace_module(model, name, layer.merged_module())
    FoldCheck.remove(model)
    delattr(model, CONFIG_ATTR)
    return model
