"""InCTRL adapter: residuals, tiny-CLIP pipeline, weight and dependency errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")

from fsad_bench.adapter import AdapterConfig  # noqa: E402
from fsad_bench.data.mvtec import MVTecDataset  # noqa: E402
from fsad_bench.data.torch_datasets import TensorImages  # noqa: E402
from fsad_bench.errors import FsadError  # noqa: E402
from fsad_bench.data.synthetic import generate  # noqa: E402
from fsad_bench.methods import inctrl  # noqa: E402
from fsad_bench.methods.inctrl import InCTRL, patch_residuals  # noqa: E402
from fsad_bench.protocols import training_data  # noqa: E402


def cross_dataset_training_data(dataset, image_size):
    return training_data("cross-dataset", dataset, "", torch.empty(0), image_size)

TINY = {"clip_model": "tiny", "epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "train_shots": 2}


def brute_force_residuals(query: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """0.5 * (1 - max cosine similarity) by explicit loops over queries, layers and patches."""
    b, l, p, _ = query.shape
    out = torch.zeros(b, l, p)
    for i in range(b):
        for j in range(l):
            bank = prompts[i, j] if prompts.dim() == 4 else prompts[j]
            for k in range(p):
                best = max(float(torch.nn.functional.cosine_similarity(query[i, j, k], m, dim=0)) for m in bank)
                out[i, j, k] = 0.5 * (1 - best)
    return out


@pytest.mark.parametrize("per_query", [False, True])
def test_patch_residuals_match_brute_force(per_query):
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 5, 8, generator=g)
    prompts = torch.randn(2, 3, 7, 8, generator=g) if per_query else torch.randn(3, 7, 8, generator=g)
    if not per_query:
        prompts[:, 0, :] = query[0, :, 0, :] * 2.0  # same direction as query 0, patch 0, every layer
    got = patch_residuals(query, prompts)
    assert got.shape == (2, 3, 5)
    assert torch.allclose(got, brute_force_residuals(query, prompts), atol=1e-5)
    if not per_query:
        assert torch.allclose(got[0, :, 0], torch.zeros(3), atol=1e-6)  # same direction -> no residual


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), categories=2, seed=3, n_train=4, n_test_good=3,
                    n_test_per_defect=1, size=64)


def test_cross_dataset_training_data_labels(synthetic_root):
    ds = MVTecDataset(synthetic_root, name="synthetic")
    train = cross_dataset_training_data(ds, 64)
    assert set(train) == set(ds.categories)
    c = ds.categories[0]
    split = ds.split(c)
    labels = train[c].labels
    assert len(labels) == len(split.train) + len(split.test)  # train/good + every test image
    assert sum(labels) == split.n_anomalous > 0
    image, label = train[c][len(labels) - 1]
    assert image.shape == (3, 64, 64) and label == 1


def test_tiny_pipeline_fit_adapt_predict(synthetic_root):
    ds = MVTecDataset(synthetic_root, name="synthetic")
    a = InCTRL(AdapterConfig(weights="none", image_size=64, seed=1, options=TINY))
    assert a.weights_tag == "random-init" and a.clip.layers == [1, 2, 3]
    before = {k: v.clone() for k, v in a.head.state_dict().items()}
    a.fit(cross_dataset_training_data(ds, 64))
    after = a.head.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].dtype.is_floating_point)

    a.category = ds.categories[0]
    support = torch.rand(2, 3, 64, 64)
    a.adapt(support)
    images = torch.rand(5, 3, 64, 64)
    scores, maps = a.predict(images)
    assert scores.shape == (5,) and maps.shape == (5, 64, 64)
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    # a support image is its own nearest prompt: zero patch residual everywhere
    _, own = a.predict(support[:1])
    assert float(own.abs().max()) < 1e-4

    # the cached state (head only) reproduces the predictions in a fresh adapter
    b = InCTRL(AdapterConfig(weights="none", image_size=64, seed=1, options=TINY))
    b.load_state_dict(a.state_dict())
    b.category = a.category
    b.adapt(support)
    assert torch.allclose(b.predict(images)[0], scores, atol=1e-6)


def test_fit_on_normal_only_data_synthesises_anomalies():
    a = InCTRL(AdapterConfig(weights="none", image_size=64, seed=0, options=TINY))
    a.fit({"x": TensorImages(torch.rand(4, 3, 64, 64))})
    a.adapt(torch.rand(2, 3, 64, 64))
    scores, _ = a.predict(torch.rand(3, 3, 64, 64))
    assert np.isfinite(scores.numpy()).all()


def test_missing_weights_file_is_fsad_error(tmp_path):
    with pytest.raises(FsadError, match="does not exist"):
        InCTRL(AdapterConfig(weights=str(tmp_path / "nope.pt"), image_size=64, options={"clip_model": "ViT-B-32"}))


def test_required_weights_not_cached_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FsadError, match="vit_b_16_plus_240-laion400m_e32-699c4b84.pt"):
        inctrl.resolve_clip_weights("ViT-B-16-plus-240", "laion400m_e32", "clip")
    with pytest.warns(UserWarning, match="random init"):
        assert inctrl.resolve_clip_weights("ViT-B-16-plus-240", "laion400m_e32", "auto") is None


def test_open_clip_absent_is_fsad_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(FsadError, match="inctrl needs open_clip"):
        InCTRL(AdapterConfig(weights="none", image_size=64, options=TINY))
