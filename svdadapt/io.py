"""Adapter files: save, load (full or compact), and export to peft.

An adapter directory holds `adapter_config.json` (svdadapt version, the `AdapterConfig`, whether the
base weight is rewritten, and per wrapped layer its shape and base-weight fingerprint) and
`adapter.safetensors`. The full form stores every adapter tensor; the compact form stores only what
trained (R and m for edora) and rebuilds the frozen factors from the base weights on load.

The config file also carries a checksum of every tensor (`tensor_checksums`) and of every field that
says how to read them (`field_checksums`: each config value, `compact`, `modules_to_save`, `layers`),
so a damaged tensor, an edited value or a deleted fingerprint is refused by name on load. They detect
damage and edits, not deliberate forgery. Files written before them load with one warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from svdadapt import basis
from svdadapt.config import AdapterConfig
from svdadapt.methods import get_method
from svdadapt.model import (
    CONFIG_ATTR,
    adapter_config,
    adapter_layers,
    apply,
    find_modules_to_save,
    find_targets,
    full_tensor,
    gathered,
    refuse_sharded,
    sharded,
    start_factors,
)
from svdadapt.svd import fingerprint, fingerprint_matches, solver_for

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
CHECK = "basis_check"  # a compact file's per-layer check of its rebuilt frozen factors (svdadapt.basis)
FORMAT = 1
META_KEYS = (
    "svdadapt_version",
    "format",
    "compact",
    "base_model",
    "base_rewritten",
    "config",
    "layers",
    "modules_to_save",
    "tensor_checksums",
    "field_checksums",
)
_SEALED = ("compact", "base_rewritten", "modules_to_save", "layers")  # with every config.<key>


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


def _digest(value) -> str:
    """A checksum of a JSON value (xxh3, 64 bits, of its canonical JSON text)."""
    import xxhash

    return xxhash.xxh3_64_hexdigest(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def _field_checksums(meta: dict) -> dict[str, str]:
    fields = {k: meta.get(k) for k in _SEALED}
    fields.update({f"config.{k}": v for k, v in (meta.get("config") or {}).items()})
    return {k: _digest(v) for k, v in fields.items()}


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` is an out-of-space error: ENOSPC or EDQUOT, or torch's writer reporting a short write."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("unexpected pos", "No space left", "file write failed"))


@contextlib.contextmanager
def reporting_disk_full(directory: str | os.PathLike):
    """Turn an out-of-space error in the block into a `ValueError` that says "disk full" and names `directory`."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        raise ValueError(
            f"disk full: saving to {str(directory)!r} failed ({type(e).__name__}: {str(e)[:100]}); what was being written "
            "is removed and nothing there counts as complete. Free space on that disk (or choose another output "
            "directory) and run again"
        ) from e


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(?P<old>\.old)?")  # atomic_directory's names


def is_temporary(path: Path) -> bool:
    """Whether `path` is what a cut-short save leaves: `atomic_directory`'s temporary or a `.NAME.tmp` file."""
    return bool(_TEMPORARY.fullmatch(path.name)) or (path.name.startswith(".") and path.name.endswith(".tmp"))


def remove_stale_saves(directory: str | os.PathLike) -> list[str]:
    """Clean up after saves that a kill cut short in `directory`: remove `atomic_directory`'s temporary
    directories and `.NAME.tmp` files, and put back a replaced directory the kill left renamed aside (the
    previous complete save) where nothing took its place. Returns what was done, one line per entry."""
    done = []
    for p in sorted(Path(directory).iterdir()) if Path(directory).is_dir() else ():
        m = _TEMPORARY.fullmatch(p.name)
        if m and p.is_dir() and m["old"] and not (p.parent / m["name"]).exists():
            os.rename(p, p.parent / m["name"])
            done.append(f"restored {m['name']}/ from {p.name} (a replacement cut short)")
        elif m and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name} (a save cut short)")
        elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink()
            done.append(f"removed {p.name} (a write cut short)")
    return done


def _version() -> str:
    from svdadapt.version import __version__

    return __version__


def adapter_state(model: nn.Module, compact: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and per-layer metadata `save_adapter` writes."""
    cfg = adapter_config(model)
    tensors, layers = {}, {}
    for name, layer in adapter_layers(model):
        with gathered(layer, modify=False):
            factors = {k: full_tensor(p) for k, p in layer.factors().items()}  # under FSDP2: gathered
            for factor, p in layer.factors().items():
                if p.requires_grad or not compact:
                    tensors[f"{name}.{factor}"] = factors[factor]
            if layer.init_A is not None and not compact:
                tensors[f"{name}.init_A"], tensors[f"{name}.init_B"] = layer.init_A, layer.init_B
            if compact and (which := basis.rebuilt(layer.method)):
                start = {"A": layer.init_A, "B": layer.init_B} if layer.method.residual else factors
                tensors[f"{name}.{CHECK}"] = basis.sketch(start, which)
        layers[name] = {"shape": [layer.out_features, layer.in_features], "fingerprint": layer.base_fingerprint}
        if cfg.svd_solver == "auto":  # the solver "auto" chose: a reload rebuilds with it whatever "auto" means then
            layers[name]["svd_solver"] = solver_for("auto", (layer.out_features, layer.in_features))
    for name, module in find_modules_to_save(model, cfg.modules_to_save):
        with gathered(module, modify=False):
            for pname, p in module.named_parameters():
                tensors[f"{name}.{pname}"] = full_tensor(p)
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    if bad := [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
        raise ValueError(
            f"refusing to save an adapter with non-finite values (NaN or inf) in {bad[:3]} ({len(bad)} tensors in all): "
            "the training diverged. Save an earlier state, or train again with a lower learning rate"
        )
    return tensors, layers


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, compact: bool = False, base_model: str | None = None) -> Path:
    """Write the adapter of `model` to `directory` atomically (a temporary directory, then a rename).

    Args:
        model: a model `svdadapt.apply` adapted.
        directory: created or replaced.
        compact: store only trained tensors; frozen factors are rebuilt from the base weights on load.
        base_model: the base model's id or path, recorded for the reader.

    Under FSDP2 (`fully_shard`) every rank calls it: the tensors are gathered, rank 0 writes, and all
    return once the directory is complete.
    """
    cfg = adapter_config(model)
    tensors, layers = adapter_state(model, compact)
    fsdp = sharded(model)
    if fsdp and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()  # rank 0 writes
        return Path(directory)
    meta = {
        "svdadapt_version": _version(),
        "format": FORMAT,
        "compact": compact,
        "base_model": base_model,
        "base_rewritten": get_method(cfg.method).residual,
        "config": cfg.to_dict(),
        "layers": layers,
        "modules_to_save": [n for n, _ in find_modules_to_save(model, cfg.modules_to_save)],
        "tensor_checksums": {k: fingerprint(v) for k, v in sorted(tensors.items())},
    }
    meta["field_checksums"] = _field_checksums(meta)
    with reporting_disk_full(directory), atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "svdadapt_version": _version()})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if fsdp:
        torch.distributed.barrier()
    return Path(directory)


def read_adapter_meta(directory: str | os.PathLike) -> tuple[dict, AdapterConfig]:
    """Read and check an adapter directory's config file (not its tensors); raises `ValueError` naming what is wrong."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"adapter directory {str(d)!r} does not exist; pass the directory save_adapter wrote")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / f).is_file():
            raise ValueError(f"adapter directory {str(d)!r} has no {f}; it is incomplete: save the adapter again")
    path = d / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged: save the adapter again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a JSON {type(meta).__name__}, not an object: it was not written by svdadapt.save_adapter")
    _check_format(meta, path)
    if unknown := sorted(set(meta) - set(META_KEYS)):
        raise ValueError(
            f"{path} has unknown entries {unknown}; this svdadapt writes only {list(META_KEYS)}. "
            "Remove them if they were added by hand, or upgrade svdadapt if a newer one wrote the file"
        )
    for key, kind in (("config", dict), ("layers", dict)):
        if key not in meta:
            raise ValueError(f"{path} has no {key!r} entry: it was not written by svdadapt.save_adapter")
        if not isinstance(meta[key], kind):
            raise ValueError(
                f"{path}: {key!r} is {json.dumps(meta[key])[:40]}, it must be an object (as save_adapter writes it); "
                "the file was edited or damaged: save the adapter again"
            )
    for name, info in meta["layers"].items():
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list) or len(info["shape"]) != 2:
            raise ValueError(f"{path}: layers[{name!r}] must be an object with a two-entry 'shape'; save the adapter again")
        if info.get("svd_solver", "full") not in ("full", "randomized"):
            raise ValueError(
                f"{path}: layers[{name!r}].svd_solver is {info['svd_solver']!r}, not 'full' or 'randomized'; save the adapter again"
            )
    names = {f.name for f in dataclasses.fields(AdapterConfig)}
    if unknown := sorted(set(meta["config"]) - names):
        raise ValueError(
            f"{path}: the config has unknown keys {unknown}; known keys: {sorted(names)}. Remove them if they were "
            "added by hand, or upgrade svdadapt if a newer one wrote the file"
        )
    _check_fields(meta, path)
    return meta, AdapterConfig.from_dict(meta["config"], source=str(path))


def _check_format(meta: dict, path: Path) -> None:
    fmt = meta.get("format", FORMAT)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise ValueError(
            f"{path}: format {fmt!r} is not a format number (a whole number >= 1; this svdadapt writes {FORMAT}); "
            "the file was edited or damaged: save the adapter again"
        )
    if fmt > FORMAT:
        raise ValueError(f"{path} has format {fmt} from svdadapt {meta.get('svdadapt_version')}; upgrade svdadapt to read it")


def _check_fields(meta: dict, path: Path) -> None:
    """Refuse config values, flags and layer entries changed since the save (their checksums differ)."""
    saved = meta.get("field_checksums")
    if saved is None:
        if "tensor_checksums" in meta:
            raise ValueError(f"{path} has tensor_checksums but no field_checksums: the file was edited; save the adapter again")
        warnings.warn(
            f"{path} has no checksums (saved by svdadapt before they were written): damaged tensors, edited config "
            "values and deleted fingerprints cannot be detected. Save the adapter again to add them",
            stacklevel=3,
        )
        return
    now = _field_checksums(meta)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if not changed:
        return
    if "layers" in changed and (gone := [n for n, info in meta["layers"].items() if info.get("fingerprint") is None]):
        raise ValueError(
            f"{path}: the base-model fingerprints of layers {gone[:3]} ({len(gone)} in all) were deleted after saving, so the "
            "base model could not be checked. Restore the file from its source or save the adapter again"
        )
    what = "; ".join(f"{k} = {json.dumps(_field(meta, k))[:60]}" if k in now else f"{k} was removed" for k in changed)
    raise ValueError(
        f"{path}: {what}: changed after the adapter was saved (the value does not match its checksum), so the tensors "
        "would be read with settings they were not trained with. Restore the saved value, or save the adapter again"
    )


def _field(meta: dict, key: str):
    return meta["config"].get(key[len("config.") :]) if key.startswith("config.") else meta.get(key)


def read_adapter(directory: str | os.PathLike) -> tuple[dict, AdapterConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter directory's files; raises `ValueError` naming what is wrong.

    Every tensor must match its checksum (when the file has them) and be finite."""
    d = Path(directory)
    meta, cfg = read_adapter_meta(d)
    f = d / WEIGHTS_FILE
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{f} is truncated or corrupted ({e}); save the adapter again") from None
    sums = meta.get("tensor_checksums")
    if sums is not None:
        if missing := sorted(set(sums) - set(tensors)):
            raise ValueError(
                f"{f} lacks tensors {missing[:5]} ({len(missing)} in all) that {CONFIG_FILE} lists; save the adapter again"
            )
        if extra := sorted(set(tensors) - set(sums)):
            raise ValueError(
                f"{f} holds tensors {extra[:5]} ({len(extra)} in all) that {CONFIG_FILE} does not list: added after saving. "
                "Remove them, or save the adapter again"
            )
        if bad := [k for k in sorted(tensors) if fingerprint(tensors[k]) != sums[k]]:
            raise ValueError(
                f"{f}: tensor {bad[0]!r} ({len(bad)} in all) does not match its checksum: the file is damaged. "
                "Copy it again from its source, or save the adapter again"
            )
    for k in sorted(tensors):
        if tensors[k].is_floating_point() and not (finite := torch.isfinite(tensors[k])).all():
            raise ValueError(
                f"{f}: tensor {k!r} has {int((~finite).sum())} non-finite values (NaN or inf), so the model would output "
                "NaN. The training that wrote it diverged: use an earlier checkpoint, or train again with a lower learning rate"
            )
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
        if compact and (which := basis.rebuilt(method)):
            shapes[f"{name}.{CHECK}"] = (r, len(which) * (r + basis.EXTRA_COLUMNS))
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


def _extra_tensors(d: Path, meta: dict, cfg: AdapterConfig, extra: list[str]) -> str:
    """The error for tensors the config does not account for: says which config entry contradicts them."""
    f = d / WEIGHTS_FILE
    frozen = [k for k in extra if k.rsplit(".", 1)[0] in meta["layers"]]
    if frozen and meta.get("compact"):
        return (
            f"{f} holds {frozen[:3]} ({len(frozen)} in all), the frozen factors a full save stores, but {CONFIG_FILE} says "
            "compact: true, so they would be ignored and rebuilt. Set compact to false, or save the adapter again"
        )
    if frozen:
        return f"{f} holds tensors {frozen[:3]} that method {cfg.method!r} does not have; save the adapter again"
    return (
        f"{f} holds tensors {extra[:3]} ({len(extra)} in all) of no wrapped layer and no module of modules_to_save "
        f"(config.modules_to_save = {list(cfg.modules_to_save)}), so a trained head would be dropped. Restore "
        "modules_to_save to the modules these tensors belong to, or save the adapter again"
    )


def rebuilt_starts(
    targets: dict[str, nn.Module], cfg: AdapterConfig, tensors: dict, directory: Path, solvers: dict[str, str]
) -> dict:
    """The start factors of a compact adapter's layers, rebuilt from the base weights (each with the SVD
    solver `solvers` records for it, if any) and checked against the file's `basis_check` (see
    `svdadapt.basis`): realigned where a tie was rotated, recomputed without the SVD cache where a cache
    entry disagrees, refused (`ValueError`, naming the layer and the gap at σ_r) where the rebuilt subspace
    is another one. Changes nothing in the model."""
    which = basis.rebuilt(get_method(cfg.method))
    starts, drift, unchecked = {}, [], []
    base_cfg = cfg
    for name, module in targets.items():
        cfg = dataclasses.replace(base_cfg, svd_solver=solvers[name]) if name in solvers else base_cfg
        with gathered(module, modify=False), torch.no_grad():
            factors, _ = start_factors(name, module, cfg)
            saved = tensors.get(f"{name}.{CHECK}")
            if not which or saved is None:
                unchecked += [name] if which else []
                starts[name] = factors
                continue
            fit = basis.fit(saved, vars(factors), which)
            if fit.unrotated > basis.SAME and cfg.svd_cache_dir != "":  # a cache entry from another machine?
                fresh, _ = start_factors(name, module, dataclasses.replace(cfg, svd_cache_dir=""))
                if (again := basis.fit(saved, vars(fresh), which)).error < fit.error:
                    factors, fit = fresh, again
            if fit.error > basis.REFUSED:
                raise ValueError(_other_basis(directory, name, module, cfg, fit.error))
            if fit.error > basis.REALIGNED:
                drift.append((fit.error, name))
            if fit.unrotated > basis.SAME:
                factors = dataclasses.replace(factors, **basis.realigned({"A": factors.A, "B": factors.B}, fit.rotation))
            starts[name] = factors
    basis.warn_unchecked_and_drift(str(directory), len(unchecked), drift, "the basis this machine's SVD rebuilt")
    return starts


def _other_basis(directory: Path, name: str, module: nn.Module, cfg: AdapterConfig, error: float) -> str:
    """The refusal for rebuilt factors that span another subspace than the saved ones; names the gap at σ_r."""
    from svdadapt.kinds import base_kind

    why = "random frozen factors came out differently (another torch version?)"
    if cfg.frozen_factors == "svd" or get_method(cfg.method).residual:
        why = f"{basis.gap(base_kind(module).weight(module), cfg.r)}, so which direction is the {cfg.r}-th depends on the machine's SVD"
    return (
        f"{directory}: layer {name!r}: the frozen factors rebuilt from the base weight span another subspace than the "
        f"ones the adapter was trained with (sketch error {error:.1e} after realignment; {why}). The reloaded model "
        "would differ from the saved one. Save the adapter in full (save_adapter(..., compact=False)) and load that"
    )


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, check_fingerprint: bool = True) -> nn.Module:
    """Apply the adapter saved in `directory` to the unmodified base `model`, in place.

    Everything is checked before the model changes: the files, the layer names and shapes, the
    base weights' fingerprints, and every tensor's shape. Returns `model`.
    """
    refuse_sharded(model, "load_adapter")
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
    unchecked = not any(k.endswith(f".{CHECK}") for k in tensors)  # a compact file saved before the checks
    if missing := sorted(k for k in set(shapes) - set(tensors) if not (unchecked and k.endswith(f".{CHECK}"))):
        raise ValueError(
            f"{d / WEIGHTS_FILE} lacks tensors {missing[:5]} ({len(missing)} in all); the file does not match its config"
        )
    if extra := sorted(set(tensors) - set(shapes)):
        raise ValueError(_extra_tensors(d, meta, cfg, extra))
    for k, shape in shapes.items():
        if k in tensors and tuple(tensors[k].shape) != tuple(shape):
            raise ValueError(f"{d / WEIGHTS_FILE}: tensor {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(shape)}")
    solvers = {n: info["svd_solver"] for n, info in saved.items() if "svd_solver" in info}
    starts = rebuilt_starts(targets, cfg, tensors, d, solvers) if meta.get("compact", False) else {}
    apply(model, cfg, initialize=False)
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            prefix = f"{name}."
            with gathered(layer, modify=True):  # a start or a full residual state rewrites the base weight
                if name in starts:
                    layer.initialize(starts[name])
                layer.load_factors({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k in shapes})
            layer.base_fingerprint = prints[name]
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
    with reporting_disk_full(directory), atomic_directory(directory) as tmp:
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
    "is_disk_full",
    "reporting_disk_full",
    "remove_stale_saves",
    "is_temporary",
    "CONFIG_ATTR",
]
