"""InCTRL adapter: residuals, anomaly synthesis and training batches (plain torch), tiny-CLIP pipeline,
weight and dependency errors (those need open_clip)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from fsad_bench.adapter import AdapterConfig
from fsad_bench.components import clip
from fsad_bench.data.mvtec import MVTecDataset
from fsad_bench.data.synthetic import generate
from fsad_bench.data.torch_datasets import TensorImages
from fsad_bench.errors import FsadError
from fsad_bench.methods.inctrl import InCTRL, cutpaste, patch_residuals
from fsad_bench.methods.inctrl.training import TrainingPool
from fsad_bench.protocols import training_data

needs_open_clip = pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None, reason="open_clip not installed (pip install 'fsad-bench[inctrl]')"
)


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
    return generate(
        tmp_path_factory.mktemp("syn"), categories=2, seed=3, n_train=4, n_test_good=3, n_test_per_defect=1, size=64
    )


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


def _changed_rectangle(image: torch.Tensor, out: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the pixels where ``out`` differs from ``image``, which must fill that rectangle."""
    changed = (out != image).any(0)
    ys, xs = changed.nonzero(as_tuple=True)
    y1, x1, h, w = int(ys.min()), int(xs.min()), int(ys.max()) - int(ys.min()) + 1, int(xs.max()) - int(xs.min()) + 1
    assert changed[y1 : y1 + h, x1 : x1 + w].all() and int(changed.sum()) == h * w
    return y1, x1, h, w


@pytest.mark.parametrize("seed", range(5))
def test_cutpaste_pastes_one_scaled_rectangle(seed):
    g = torch.Generator().manual_seed(seed)
    image = 0.25 + 0.25 * torch.rand(3, 64, 64, generator=g)  # gains in [0.6, 1.4] never clamp these
    original = image.clone()
    out = cutpaste(image, g)
    assert torch.equal(image, original) and out.shape == image.shape
    y1, x1, h, w = _changed_rectangle(image, out)
    assert 6 <= h <= 19 and 6 <= w <= 19  # 10-30 % of the side
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[y1 : y1 + h, x1 : x1 + w] = False
    assert torch.equal(out[:, outside], image[:, outside])  # equal elsewhere
    # the rectangle is another h x w rectangle of the input, each channel scaled by one gain in [0.6, 1.4]
    pasted = out[:, y1 : y1 + h, x1 : x1 + w]
    sources = []
    for y0 in range(64 - h + 1):
        for x0 in range(64 - w + 1):
            ratio = pasted / image[:, y0 : y0 + h, x0 : x0 + w]
            gain = ratio.flatten(1).median(1).values
            if torch.allclose(ratio, gain[:, None, None], rtol=1e-4) and ((gain >= 0.6) & (gain <= 1.4)).all():
                sources.append((y0, x0))
    assert len(sources) == 1


def _flat_encoder(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features that are the pixels: cls (N, 3·S·S), patches (N, 1 layer, 1 patch, 3·S·S)."""
    flat = images.flatten(1)
    return flat, flat[:, None, None, :]


@pytest.mark.parametrize("labelled", [False, True])
def test_training_batches_label_queries_and_prompts(labelled):
    """Labels: normal queries (0) are normal images, anomalous ones (1) are the labelled anomalies or,
    without any, CutPaste of a normal image; prompts are normal images of the query's category."""
    g = torch.Generator().manual_seed(0)
    images = {"a": torch.rand(5, 3, 16, 16, generator=g), "b": torch.rand(4, 3, 16, 16, generator=g)}
    labels = {"a": [0, 0, 0, 1, 1], "b": [0, 0, 1, 0]}

    class Labelled(torch.utils.data.Dataset):
        def __init__(self, c):
            self.c, self.labels = c, labels[c]

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return images[self.c][i], self.labels[i]

    train = {c: Labelled(c) if labelled else TensorImages(images[c]) for c in images}
    pool = TrainingPool(train, _flat_encoder, torch.Generator().manual_seed(1), bytes_per_image=4, cache_mb=1)
    assert pool.synthesise is not labelled and (pool.cache is not None) is labelled
    q_cls, q_patch, p_cls, p_patch, cats, y = pool.sample(3, 4, shots=2)
    assert y.tolist() == [0.0] * 3 + [1.0] * 4 and len(cats) == 7
    assert q_patch.shape == (7, 1, 1, 768) and p_cls.shape == (7, 2, 768) and p_patch.shape == (7, 1, 2, 768)
    assert torch.equal(q_patch[:, 0, 0], q_cls) and torch.equal(p_patch[:, 0].reshape(7, 2, 768), p_cls)
    for q, prompts, c, label in zip(q_cls, p_cls, cats, y.tolist()):
        flat = images[c].flatten(1)
        normal = [flat[i] for i, v in enumerate(labels[c]) if v == 0 or not labelled]
        anomalous = [flat[i] for i, v in enumerate(labels[c]) if v == 1 and labelled]
        assert all(any(torch.equal(p, n) for n in normal) for p in prompts)
        if label == 0:
            assert any(torch.equal(q, n) for n in normal)
        elif labelled:
            assert any(torch.equal(q, a) for a in anomalous)
        else:  # CutPaste of one of the category's images: equal to it outside one rectangle
            q_img = q.view(3, 16, 16)
            close = [n.view(3, 16, 16) for n in normal if (q_img != n.view(3, 16, 16)).any(0).float().mean() < 0.5]
            assert len(close) == 1 and not torch.equal(q_img, close[0])
            _changed_rectangle(close[0], q_img)


@needs_open_clip
def test_tiny_pipeline_fit_adapt_predict(synthetic_root):
    ds = MVTecDataset(synthetic_root, name="synthetic")
    torch.manual_seed(1)  # as the run layer does before constructing an adapter (the CLIP is random init)
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
    torch.manual_seed(1)
    b = InCTRL(AdapterConfig(weights="none", image_size=64, seed=1, options=TINY))
    b.load_state_dict(a.state_dict())
    b.category = a.category
    b.adapt(support)
    assert torch.allclose(b.predict(images)[0], scores, atol=1e-6)


@needs_open_clip
def test_fit_on_normal_only_data_synthesises_anomalies():
    a = InCTRL(AdapterConfig(weights="none", image_size=64, seed=0, options=TINY))
    a.fit({"x": TensorImages(torch.rand(4, 3, 64, 64))})
    a.adapt(torch.rand(2, 3, 64, 64))
    scores, _ = a.predict(torch.rand(3, 3, 64, 64))
    assert np.isfinite(scores.numpy()).all()


def test_option_constraints():
    for preset in InCTRL.presets.values():
        InCTRL.check_options(preset)
    with pytest.raises(FsadError, match="loss_on.*one of 'as_logits', 'probability'"):
        InCTRL.check_options({"loss_on": "logits"})
    with pytest.raises(FsadError, match="layers"):
        InCTRL.check_options({"layers": [6, -1]})
    with pytest.raises(FsadError, match="batch_size"):
        InCTRL.check_options({"batch_size": 1})


@needs_open_clip
def test_missing_weights_file_is_fsad_error(tmp_path):
    with pytest.raises(FsadError, match="does not exist"):
        InCTRL(AdapterConfig(weights=str(tmp_path / "nope.pt"), image_size=64, options={"clip_model": "ViT-B-32"}))


@needs_open_clip
def test_required_weights_not_cached_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FsadError, match="vit_b_16_plus_240-laion400m_e32-699c4b84.pt"):
        clip.resolve_clip_weights("ViT-B-16-plus-240", "laion400m_e32", "clip")
    with pytest.warns(UserWarning, match="random init"):
        assert clip.resolve_clip_weights("ViT-B-16-plus-240", "laion400m_e32", "auto") is None


def test_open_clip_absent_is_fsad_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(FsadError, match="inctrl needs open_clip"):
        InCTRL(AdapterConfig(weights="none", image_size=64, options=TINY))
