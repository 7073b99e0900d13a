"""The house rules, checked on the source: layers only look down (the order is the table in
docs/architecture.md), no import circles, no method imports another."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: installed package name -> folder in the checkout
PACKAGE_DIRS = {
    "fsad_bench.methods": ROOT / "methods",
    "fsad_bench.protocols": ROOT / "protocols",
    "fsad_bench": ROOT / "fsad_bench",
}


def read_layers() -> list[tuple[str, list[str]]]:
    """(layer, [module or package prefixes]) lowest first, from docs/architecture.md's table."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("<!-- layers:", 1)[1].split("\n\n", 1)[0]
    out = []
    for line in table.splitlines()[3:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        out.append((cells[0], re.findall(r"`([\w.]+)`", cells[1])))
    return out


LAYERS = read_layers()


def layer_of(module: str) -> int | None:
    """Index of the layer holding ``module`` (longest matching prefix), None when none does."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def module_files() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "fsad_bench" and parts and parts[0] in ("methods", "protocols"):
                continue
            out[".".join([pkg, *parts])] = path
    return out


MODULES = module_files()


@cache
def imports_of(module: str) -> frozenset[str]:
    """fsad_bench modules imported by ``module`` anywhere in its file (lazy imports too)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if not base.startswith("fsad_bench"):
                continue
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            out |= set(subs) if subs else {base}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fsad_bench")}
    return frozenset(m for m in out if m != module)


def test_layer_table_is_read():
    names = [name for name, _ in LAYERS]
    assert names[0] == "leaves" and names[-1] == "cli" and len(names) >= 8


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_has_a_layer(module):
    assert layer_of(module) is not None, f"{module} is in no layer of docs/architecture.md: add it there"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_only_look_down(module):
    mine = layer_of(module)
    up = sorted(m for m in imports_of(module) if (layer_of(m) or 0) > (mine or 0))
    assert not up, f"{module} (layer {LAYERS[mine][0]!r}) imports higher layers: " + ", ".join(
        f"{m} ({LAYERS[layer_of(m)][0]})" for m in up
    )


def _method_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if module.startswith("fsad_bench.methods.") and len(parts) > 2 else None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _method_of(m)))
def test_no_method_imports_another(module):
    other = sorted(m for m in imports_of(module) if _method_of(m) and _method_of(m) != _method_of(module))
    assert not other, f"{module} imports another method ({other}); shared pieces belong in fsad_bench/components/"


def _resolve(name: str) -> str | None:
    """The module file a dotted import name refers to (a name inside a module counts as the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_no_import_circles():
    graph = {m: {r for r in map(_resolve, imports_of(m)) if r and r != m} for m in MODULES}
    # a package's __init__ that merely names its package is not an edge to every submodule
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_checker_catches_violations(tmp_path, monkeypatch):
    """The checker itself can fail: an upward import and a circle are found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from fsad_bench.cli import main\nfrom fsad_bench.b import x\n")
    b.write_text("from fsad_bench.a import y\n")
    monkeypatch.setitem(MODULES, "fsad_bench.data.a", a)
    monkeypatch.setitem(MODULES, "fsad_bench.data.b", b)
    imports_of.cache_clear()
    try:
        assert "fsad_bench.cli" in imports_of("fsad_bench.data.a")
        assert layer_of("fsad_bench.cli") > layer_of("fsad_bench.data.a")
    finally:
        imports_of.cache_clear()


def test_every_module_is_named_in_the_files_section():
    """docs/architecture.md has one line per file (a method folder counts as one line; a layer package's
    ``__init__.py`` is its docstring, named by the layer's heading)."""
    text = (ROOT / "docs" / "architecture.md").read_text().split("<!-- files:", 1)[1]
    missing = []
    for _, path in sorted(MODULES.items()):
        rel = path.relative_to(ROOT).as_posix()
        folder = path.parent.relative_to(ROOT).as_posix() + "/"
        if path.name == "__init__.py" and rel.startswith("fsad_bench/") and rel.count("/") == 2:
            continue
        if f"`{rel}`" not in text and not (rel.startswith("methods/") and f"`{folder}`" in text):
            missing.append(rel)
    assert not missing, f"docs/architecture.md names no line for {missing}"


def test_every_package_is_installed():
    """A non-editable install ships every package folder (pyproject's explicit ``packages`` list)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert packages <= listed, f"add {sorted(packages - listed)} to [tool.setuptools] packages in pyproject.toml"
