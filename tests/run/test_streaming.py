"""Engine I/O: per-adapter input size, streamed test set, exact scores, cold vs warm inference time,
and the decoded-image cache."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from torch import nn

from fsad_bench import registry
from fsad_bench.adapter import Adapter
from fsad_bench.components.feature_cache import CachedBackbone
from fsad_bench.data.image_cache import load_cached_image
from fsad_bench.data.images import load_image
from fsad_bench.data.mvtec import MVTecDataset
from fsad_bench.metrics import image_auroc
from fsad_bench.run import cell, predict
from fsad_bench.run.schedule import run_suite


class MeanDiff(Adapter):
    """|image - mean support image|, channel-averaged (as the conftest spies)."""

    name = "spy-meandiff"
    protocol = "training-free"

    def adapt(self, support):
        self.mean = support.mean(0)

    def predict(self, images):
        maps = (images - self.mean).abs().mean(1)
        return maps.flatten(1).max(1).values, maps


class AggregatedSpy(MeanDiff):
    protocol = "aggregated"

    def state_dict(self):
        return {"n": torch.tensor(1)}

    def load_state_dict(self, state):
        pass


class Hires(AggregatedSpy):
    """Aggregated spy that wants its images at 96 px and returns 96-px maps."""

    name = "spy-hires"
    seen: list[tuple[str, tuple[int, ...]]] = []

    @property
    def input_size(self):
        return 96

    def fit(self, train):
        for ds in train.values():
            type(self).seen.append(("train", tuple(ds[0].shape)))

    def adapt(self, support):
        type(self).seen.append(("support", tuple(support.shape[1:])))
        super().adapt(support)

    def predict(self, images):
        type(self).seen.append(("test", tuple(images.shape)))
        return super().predict(images)


class Ties(MeanDiff):
    """Scores 1 + j·ulp: distinct float32 values that agree to 7 significant digits."""

    name = "spy-ties"

    def predict(self, images):
        _, maps = super().predict(images)
        key = images.mean(dim=(1, 2, 3))  # deterministic, image-dependent order
        rank = key.argsort().argsort().float()
        return 1 + rank * float(np.finfo(np.float32).eps), maps


class TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return [self.conv(x)]


class Cached(MeanDiff):
    """Training-free scorer with a frozen 'backbone' behind a feature cache (like gaussian)."""

    name = "spy-cached"
    reads: list[tuple[bool, int]] = []

    def __init__(self, config=None):
        super().__init__(config)
        self.cache = CachedBackbone(TinyBackbone(), "spy")

    def predict(self, images):
        before = self.cache.hits
        feats = self.cache(images)[0]
        type(self).reads.append((self.cache.read_enabled, self.cache.hits - before))
        maps = feats.mean(1)
        return maps.flatten(1).max(1).values, maps


@pytest.fixture
def extra():
    classes = (Hires, Ties, Cached)
    for cls in classes:
        registry.register(cls)
    Hires.seen.clear()
    Cached.reads.clear()
    yield
    for cls in classes:
        registry.unregister(cls.name)


def test_images_loaded_at_the_adapter_input_size_and_maps_resized(make_suite, extra, tmp_path):
    store = run_suite(make_suite(methods=["spy-hires"], k=[2], runs=1, image_size=64), tmp_path / "r")
    kinds = {kind for kind, _ in Hires.seen}
    assert kinds == {"train", "support", "test"}
    assert all(shape[-2:] == (96, 96) for _, shape in Hires.seen)  # never the suite's 64 px
    for r in store.records():
        assert r["image_size"] == 64 and r["input_size"] == 96 and 0 <= r["pixel_auroc"] <= 1
    with np.load(next((tmp_path / "r" / "maps").glob("*.npz"))) as z:
        assert z["maps"].shape[1:] == (64, 64) and z["masks"].shape[1:] == (64, 64)  # suite size


def test_test_set_streamed_in_batches(make_suite, extra, tmp_path, monkeypatch):
    """A spy adapter sees batches, never the whole test set; no loader call asks for more than a batch."""
    monkeypatch.setattr(predict, "PREDICT_BATCH", 4)
    asked = []
    original = predict.load_cached_images
    for module in (predict, cell):  # test batches, support sets
        monkeypatch.setattr(
            module, "load_cached_images", lambda paths, *a: (asked.append(len(paths)), original(paths, *a))[1]
        )
    run_suite(make_suite(methods=["spy-hires"], k=[1], runs=1, operating_point=False), tmp_path / "r")
    n_test = len(MVTecDataset(make_suite().data_root).split("grid").test)
    batches = [shape[0] for kind, shape in Hires.seen if kind == "test"]
    assert n_test == 14 and batches == [4, 4, 4, 2] * 3  # 3 categories
    assert max(asked) <= 4


def test_scores_stored_exactly_float32(make_suite, extra, tmp_path):
    """Scores that agree to 7 digits stay distinct: AUROC recomputed from the record equals the stored one."""
    store = run_suite(make_suite(methods=["spy-ties"], k=[1], runs=2), tmp_path / "r")
    for r in store.records():
        scores = np.array(r["scores"])
        assert len(set(r["scores"])) == len(scores)  # 7-digit rounding would make them all 1.0
        assert np.array_equal(scores.astype(np.float32).astype(np.float64), scores)  # float32 values exactly
        assert image_auroc(np.array(r["labels"]), scores) == r["image_auroc"]


def test_cold_time_bypasses_feature_caches_and_warm_reuses_them(make_suite, extra, tmp_path, monkeypatch):
    store = run_suite(make_suite(methods=["spy-cached"], k=[1, 2], runs=1), tmp_path / "r")
    cold = [hits for enabled, hits in Cached.reads if not enabled]
    warm = [hits for enabled, hits in Cached.reads if enabled]
    assert cold and all(h == 0 for h in cold)  # the cold pass read nothing from the cache
    assert sum(warm) > 0  # later cells of a category reuse the cached test features
    for r in store.records():
        assert r["infer_seconds_per_image"] > 0 and r["infer_warm_seconds_per_image"] > 0
    # the extra cold pass changes no number: same scores as a run without it
    monkeypatch.setattr(predict, "_feature_caches", lambda adapter: [])
    plain = run_suite(make_suite(methods=["spy-cached"], k=[1, 2], runs=1), tmp_path / "plain")
    assert {r["cell_id"]: r["scores"] for r in store.records()} == {r["cell_id"]: r["scores"] for r in plain.records()}


def test_image_cache_is_bit_identical_and_follows_the_file(synth_root, tmp_path):
    src = next((synth_root / "grid" / "test" / "good").glob("*.png"))
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes())
    first = load_cached_image(path, 48, tmp_path / "c")
    files = list((tmp_path / "c").glob("48/*/*.npy"))
    assert len(files) == 1 and files[0].stat().st_size < 3 * 48 * 48 + 200  # uint8 on disk
    assert torch.equal(first, load_image(path, 48)) and torch.equal(load_cached_image(path, 48, tmp_path / "c"), first)
    other = next((synth_root / "washer" / "test" / "good").glob("*.png"))
    path.write_bytes(other.read_bytes())
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert torch.equal(load_cached_image(path, 48, tmp_path / "c"), load_image(other, 48))  # edited file: re-decoded
