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
    eps = [
        EntryPoint("thirdparty", "fsad_bench.methods.random_scorer:RandomScorer", registry.ENTRY_POINT_GROUP),
        EntryPoint("broken", "fsad_bench.errors:FsadError", registry.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: [e for e in eps if e.group == group])
    assert "thirdparty" in registry.available()
    assert registry.get("thirdparty") is RandomScorer
    with pytest.raises(FsadError, match="not an fsad_bench Adapter subclass"):
        registry.get("broken")


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(FsadError, match=r"unknown method 'nope' \(registered: .*gaussian"):
        registry.get("nope")


def test_suite_option_overrides_are_labelled():
    """An option a suite overrides (``[options.<method>]``) shows in the table label, so two
    configurations never share a row; options that cannot change a number are not labelled, and
    an option the adapter labels in its own words is labelled once."""
    from fsad_bench.adapter import AdapterConfig

    diffnet_plus, gaussian, patchcore = (registry.get(n) for n in ("diffnet+", "gaussian", "patchcore"))
    base = diffnet_plus(AdapterConfig(weights="none")).label
    longer = diffnet_plus(AdapterConfig(weights="none", options={"finetune_epochs": 192})).label
    assert base == "diffnet+ [cpu, alexnet, random-init]"
    assert longer == "diffnet+ [cpu, alexnet, random-init, finetune_epochs=192]"
    assert diffnet_plus(AdapterConfig(weights="none", options={"view_chunk": 8})).label == base
    assert (
        gaussian(AdapterConfig(weights="none", options={"batch_size": 4})).label
        == "gaussian [paper, resnet18, random-init]"
    )
    assert (
        gaussian(AdapterConfig(weights="none", options={"upsample": "bilinear", "channel_seed": 3})).label
        == "gaussian [paper, resnet18, random-init, upsample=bilinear, channel_seed=3]"
    )
    assert patchcore(AdapterConfig(weights="none", options={"coreset_ratio": 0.5, "chunk": 64})).label == (
        "patchcore [paper, wide_resnet50_2, random-init, coreset_ratio=0.5]"
    )
