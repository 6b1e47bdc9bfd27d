"""The package's layering (docs/architecture.md), checked on the source: the core never imports a job,
and no module reaches into another's private names."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "svdadapt"
CORE = ["config", "methods", "svd", "norm", "layer", "model", "io", "version"]
JOBS = {"train", "evaluate", "sweep", "report", "bench", "cli", "data", "recipe", "tasks"}


def imported(path: Path) -> list[tuple[str, list[str]]]:
    """(svdadapt submodule, names taken from it) for every import of the package in a file, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "svdadapt":
            sub = node.module.split(".")[1] if "." in node.module else None
            for alias in node.names:
                out.append((sub or alias.name, [alias.name] if sub else []))
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], []) for a in node.names if a.name.startswith("svdadapt.")]
    return out


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_no_job(module):
    bad = sorted({sub for sub, _ in imported(PACKAGE / f"{module}.py") if sub in JOBS})
    assert not bad, f"svdadapt/{module}.py imports {bad}: the core must not depend on the jobs around it"


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for sub, names in imported(path):
            bad += [f"{path.relative_to(PACKAGE)}: {sub}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, bad
