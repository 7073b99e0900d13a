from importlib.metadata import EntryPoint

import pytest

from fsad_bench import registry
from fsad_bench.errors import FsadError
from fsad_bench.methods.random_scorer import RandomScorer


def test_builtin_methods_are_registered():
    names = registry.available()
    for name in ("random", "gaussian", "regad", "regad-l", "diffnet", "diffnet+", "tdg", "tdg+", "inctrl"):
        assert name in names
        assert registry.get(name).name == name


def test_third_party_adapter_through_entry_point(monkeypatch):
    eps = [EntryPoint("thirdparty", "fsad_bench.methods.random_scorer:RandomScorer", registry.ENTRY_POINT_GROUP),
           EntryPoint("broken", "fsad_bench.errors:FsadError", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: [e for e in eps if e.group == group])
    assert "thirdparty" in registry.available()
    assert registry.get("thirdparty") is RandomScorer
    with pytest.raises(FsadError, match="not an fsad_bench Adapter subclass"):
        registry.get("broken")


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(FsadError, match=r"unknown method 'nope' \(registered: .*gaussian"):
        registry.get("nope")
