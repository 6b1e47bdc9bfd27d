"""The package's layering (docs/architecture.md), checked on the source, imports inside functions
included: each core module imports only the core modules below it, a ring only itself and the rings
inside it, there is no import circle, and no module reaches into another's private names."""

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "svdadapt"
# the core, bottom up: a module may import only those before it
CORE = ["version", "svd", "norm", "methods", "basis", "config", "kinds", "layer", "model", "io"]
AROUND = {"quant", "serve", "quant_error", "paths", "prompts"}
JOBS = {
    "recipe",
    "data",
    "train",
    "trainer",
    "faults",
    "count",
    "plan",
    "evaluate",
    "tasks",
    "report",
    "sweep",
    "tune",
    "bench",
    "cli",
}
RING = {**{m: 0 for m in CORE}, **{m: 1 for m in AROUND}, **{m: 2 for m in JOBS}, "__main__": 2, "__init__": 2}


def imported(source: str) -> list[tuple[str, list[str]]]:
    """(svdadapt submodule, names taken from it) for every import of the package in a source, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "svdadapt":
            sub = node.module.split(".")[1] if "." in node.module else None
            for alias in node.names:
                out.append((sub or alias.name, [alias.name] if sub else []))
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], []) for a in node.names if a.name.startswith("svdadapt.")]
    return out


def top_module(path: Path) -> str:
    """The package-level module a file belongs to: "layer" for layer.py, "bench" for bench/model.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0] if len(parts) > 1 or parts[0] != "__init__" else "__init__"


def outward(module: str, source: str) -> list[str]:
    """The imports of `source` (the text of `module`) that go against the layering."""
    bad = []
    for sub, _ in imported(source):
        if sub == module or sub not in RING:
            continue
        if RING[sub] > RING[module]:
            bad.append(f"{sub} (a ring outside)")
        elif RING[module] == 0 and CORE.index(sub) > CORE.index(module):
            bad.append(f"{sub} (above it in the core)")
    return sorted(set(bad))


def graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        mod = top_module(path)
        out.setdefault(mod, set()).update(sub for sub, _ in imported(path.read_text()) if sub != mod and sub in RING)
    return out


def test_every_module_has_a_ring():
    assert set(graph()) <= set(RING), f"modules with no ring in this test: {sorted(set(graph()) - set(RING))}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_outward(path):
    mod = top_module(path)
    bad = outward(mod, path.read_text())
    assert not bad, f"svdadapt/{path.relative_to(PACKAGE)} imports {bad}: a module imports only its own ring and those inside"


def test_no_import_circle():
    deps, done, stack = graph(), set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m) :] + [m]))
        if m in done:
            return
        stack.append(m)
        for d in sorted(deps.get(m, ())):
            visit(d)
        stack.pop()
        done.add(m)

    for m in sorted(deps):
        visit(m)


def test_a_planted_lazy_import_from_the_core_is_caught():
    """The check reads imports inside functions: the lazy `import svdadapt.quant` layer.py once had fails it."""
    source = (PACKAGE / "layer.py").read_text() + textwrap.dedent(
        """
        def _register_known_kinds(module):
            import svdadapt.quant  # noqa: F401
        """
    )
    assert outward("layer", source) == ["quant (a ring outside)"]
    assert outward("layer", "def f():\n    from svdadapt.io import save_adapter\n") == ["io (above it in the core)"]
    assert outward("kinds", "def f():\n    from svdadapt.train import run\n") == ["train (a ring outside)"]


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for sub, names in imported(path.read_text()):
            bad += [f"{path.relative_to(PACKAGE)}: {sub}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, bad
