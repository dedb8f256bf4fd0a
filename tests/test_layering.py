"""Import directions (../shared/STYLE.md): config knows nothing internal; models and data know only
config; training knows models, data and config; the sweep uses training through its entry
(helix_sweep.training); only the sweep imports Ray; only the sweep and the
report's loading module import MLflow; nothing imports the entry points. Every import counts, also one
inside a function (a lazy import is still a dependency)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "helix_sweep"
ENTRY_POINTS = {"helix_sweep.run", "helix_sweep.plan", "helix_sweep.report.__main__"}
# internal layer -> the internal layers it may import (besides itself)
ALLOWED = {
    "config": set(),
    "models": {"config"},
    "data": {"config"},
    "training": {"config", "models", "data"},
    "sweep": {"config", "models", "data", "training"},
    "report": {"config", "sweep"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, named: bool = True) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved); named=False leaves
    out the modules named inside `from package import module` (only `package` counts then)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            if named:  # `from package import module`
                out.update(f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}"))
    return out


def is_module(name: str) -> bool:
    """An internal module or package (not a function or class imported from one)."""
    if not name.startswith("helix_sweep."):
        return False
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "helix_sweep" and len(parts) > 1 else None


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_import_directions(path):
    me = module_name(path)
    mine = layer(me)
    found = imports(path)
    wrong = []
    for name in found:
        other = layer(name)
        if name in ENTRY_POINTS and not me.startswith(name):
            wrong.append(f"{name} (an entry point)")
        if mine in ALLOWED and other and other != mine and other in ALLOWED and other not in ALLOWED[mine]:
            wrong.append(f"{name} ({mine} may import only {sorted(ALLOWED[mine]) or 'nothing internal'})")
        top = name.split(".")[0]
        if top == "ray" and mine != "sweep":
            wrong.append(f"{name} (only helix_sweep.sweep imports Ray)")
        if top == "mlflow" and mine != "sweep" and me != "helix_sweep.report.loading":
            wrong.append(f"{name} (only helix_sweep.sweep and helix_sweep.report.loading import MLflow)")
    if mine == "sweep":
        wrong += [f"{name} (the sweep uses training through its entry, helix_sweep.training)"
                  for name in imports(path, named=False)
                  if layer(name) == "training" and name != "helix_sweep.training"]
    assert not wrong, f"{me} imports " + "; ".join(sorted(set(wrong)))


def test_the_rules_see_imports():
    """The checker itself: it resolves relative and lazy imports (a checker that sees nothing passes all)."""
    found = imports(PACKAGE / "sweep" / "driver.py")
    assert "ray" in found and any(n.startswith("helix_sweep.sweep") for n in found)
    assert is_module("helix_sweep.training.loop") and not is_module("helix_sweep.training.run_training")
