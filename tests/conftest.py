"""Shared fixtures: a small synthetic dataset, a private cache, and spy adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsad_bench import registry
from fsad_bench.adapter import Adapter
from fsad_bench.protocols import Suite
from fsad_bench.data.synthetic import generate

SIZE = 64


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own model/data cache (no state leaks between tests)."""
    monkeypatch.setenv("FSAD_BENCH_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Three synthetic categories at 64 px: 12 train, 6 good + 8 defective test images each."""
    return generate(tmp_path_factory.mktemp("synth") / "data", categories=3, seed=0, n_train=12,
                    n_test_good=6, n_test_per_defect=2, size=SIZE)


@pytest.fixture
def make_suite(synth_root):
    def make(**overrides) -> Suite:
        kw = dict(name="t", dataset="synthetic", data_root=str(synth_root), methods=["random"], k=[1, 2],
                  runs=2, image_size=SIZE, weights="none", seed=0)
        kw.update(overrides)
        return Suite(**kw)

    return make


class MeanDiff(Adapter):
    """Tiny real scorer for engine tests: |image - mean support image|, channel-averaged."""

    name = "meandiff"
    protocol = "training-free"
    fit_calls: list[dict] = []

    def fit(self, train):
        type(self).fit_calls.append({c: ds for c, ds in train.items()})

    def adapt(self, support):
        self.mean = support.mean(0)

    def predict(self, images):
        maps = (images - self.mean).abs().mean(1)
        return maps.flatten(1).max(1).values, maps


class AggregatedSpy(MeanDiff):
    name = "spy-agg"
    protocol = "aggregated"
    fit_calls: list[dict] = []

    def state_dict(self):
        return {"n": torch.tensor(1)}

    def load_state_dict(self, state):
        pass


class IndividualSpy(MeanDiff):
    name = "spy-ind"
    protocol = "individual"
    fit_calls: list[dict] = []


@pytest.fixture
def spies():
    """Register the spy adapters for one test."""
    classes = (MeanDiff, AggregatedSpy, IndividualSpy)
    for cls in classes:
        cls.fit_calls.clear()
        registry.register(cls)
    yield {cls.name: cls for cls in classes}
    for cls in classes:
        registry.unregister(cls.name)
