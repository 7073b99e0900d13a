"""Shared fixtures: a small synthetic dataset, a private cache, a test-set loader, and spy adapters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fsad_bench import registry
from fsad_bench.adapter import Adapter
from fsad_bench.data.dataset import CategorySplit
from fsad_bench.data.images import load_images, load_mask
from fsad_bench.data.synthetic import generate
from fsad_bench.protocols import Suite

SIZE = 64


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own model/data cache (no state leaks between tests)."""
    monkeypatch.setenv("FSAD_BENCH_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Three synthetic categories at 64 px: 12 train, 6 good + 8 defective test images each."""
    return generate(
        tmp_path_factory.mktemp("synth") / "data",
        categories=3,
        seed=0,
        n_train=12,
        n_test_good=6,
        n_test_per_defect=2,
        size=SIZE,
    )


@dataclass
class TestSet:
    """A category's test set in memory: images ``(N,3,S,S)``, labels ``(N,)``, masks ``(N,S,S)``."""

    __test__ = False  # not a test class

    images: torch.Tensor
    labels: np.ndarray
    masks: torch.Tensor
    paths: list[Path]
    defects: list[str]


def _load_test_set(split: CategorySplit, size: int) -> TestSet:
    """Load every test image and mask of a category at ``size``x``size`` (each mask checked
    against its image's size)."""
    images = load_images([s.path for s in split.test], size)
    masks = torch.stack([load_mask(s.mask_path, size, s.path) for s in split.test])
    labels = np.array([s.label for s in split.test], dtype=np.int64)
    return TestSet(images, labels, masks, [s.path for s in split.test], [s.defect for s in split.test])


@pytest.fixture(scope="session")
def load_test_set():
    """``load_test_set(split, size)`` -> :class:`TestSet` (a whole category's test set in memory)."""
    return _load_test_set


@pytest.fixture
def make_suite(synth_root):
    def make(**overrides) -> Suite:
        kw = dict(
            name="t",
            dataset="synthetic",
            data_root=str(synth_root),
            methods=["random"],
            k=[1, 2],
            runs=2,
            image_size=SIZE,
            weights="none",
            seed=0,
        )
        kw.update(overrides)
        return Suite(**kw)

    return make


class MeanDiff(Adapter):
    """Tiny real scorer for run-layer tests: |image - mean support image|, channel-averaged."""

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
