"""The house rules, checked on the source: layers only look down, no method imports another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Layer of each module (lower = below); a module may import modules of its own layer or lower.
LAYERS = {
    # building blocks that know nothing of benchmarks
    "errors": 0, "maps": 0, "augment": 0, "gaussian_model": 0, "metrics": 0, "memory": 0,
    # data: readers, synthetic data, k-shot sampler; backbones and their feature cache
    "data": 1, "synthetic": 1, "sampler": 1, "backbone": 1, "features": 1, "image_cache": 1,
    "identity": 1,  # fingerprints of files, folders, weights and code (record identity)
    # adapter API and registry (what methods build on)
    "adapter": 2, "registry": 2,
    # protocols (which images reach fit) and suites
    "protocols": 3,
    # result store, and the optional MLflow sink of finished records
    "store": 4, "tracking": 4,
    # engine (cells, timing, metrics)
    "engine": 5, "workers": 5,
    # reporter
    "published": 6, "significance": 6, "costs": 6, "report": 6, "plots": 6, "export": 6,
    # command line
    "cli": 7,
}


def _imports(path: Path) -> set[str]:
    """fsad_bench module names imported by ``path`` (``fsad_bench.x.y`` and ``.x`` both give ``x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 and path.parent.name == "fsad_bench":
                names = [mod] if mod else [a.name for a in node.names]
                out |= {n.split(".")[0] for n in names}
            elif node.level == 1:  # relative import inside methods/ or protocols/
                out.add(f"<relative {mod or node.names[0].name}>")
            elif mod.startswith("fsad_bench."):
                out.add(mod.split(".")[1])
            elif mod == "fsad_bench":
                out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fsad_bench.")}
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "methods").glob("*.py")), ids=lambda p: p.name)
def test_no_method_imports_another(path):
    bad = {m for m in _imports(path) if m == "methods" or m.startswith("<relative")}
    assert not bad, f"{path.name} imports another method file ({bad}); shared pieces belong in fsad_bench/"


@pytest.mark.parametrize("path", sorted((ROOT / "fsad_bench").glob("*.py")), ids=lambda p: p.name)
def test_layers_only_look_down(path):
    name = path.stem
    if name == "__init__":
        return
    assert name in LAYERS, f"fsad_bench/{path.name} has no layer in tests/test_architecture.py: add it"
    up = {m for m in _imports(path) if m in LAYERS and LAYERS[m] > LAYERS[name]}
    assert not up, f"fsad_bench/{name} (layer {LAYERS[name]}) imports higher layers {sorted(up)}"


def test_methods_use_only_lower_layers():
    for path in sorted((ROOT / "methods").glob("*.py")):
        up = {m for m in _imports(path) if m in LAYERS and LAYERS[m] > LAYERS["adapter"]}
        assert not up, f"methods/{path.name} imports {sorted(up)} (adapters sit below protocols, engine, store)"
