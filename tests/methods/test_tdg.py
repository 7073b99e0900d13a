"""Tests of the TDG / TDG+ adapters (tiny sizes, cpu preset, synthetic data)."""

from __future__ import annotations

import re

import pytest
import torch

from fsad_bench.adapter import AdapterConfig
from fsad_bench.data.mvtec import MVTecDataset
from fsad_bench.data.synthetic import generate, render
from fsad_bench.data.torch_datasets import TensorImages
from fsad_bench.errors import FsadError
from fsad_bench.methods.tdg.adapter import TDG, TDGPlus
from fsad_bench.methods.tdg.torch_model import (
    PatchDiscriminator,
    Transformation,
    dihedral_transformations,
    official_transformations,
    pyramid_sizes,
)
from fsad_bench.protocols import training_data

FAST = {"niter": 6, "pretrain_niter": 6, "adapt_niter": 4, "pretrain_images_per_category": 3}


def synth(category: str, n: int, size: int, split: str = "train", defect: str | None = None) -> torch.Tensor:
    """``(n, 3, size, size)`` synthetic images in [0, 1]."""
    return torch.stack(
        [torch.from_numpy(render(category, 0, split, i, defect, size=size)[0]).permute(2, 0, 1) for i in range(n)]
    )


def ramp_images(n: int, size: int) -> torch.Tensor:
    """Images whose every patch shows its orientation: red grows to the right, green downwards."""
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([x, y, 0.5 * torch.ones_like(x)])
    return (base[None] + 0.03 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def test_official_transformation_set():
    ts = official_transformations()
    assert len(ts) == 54 and len(set(ts)) == 54  # official RGB count, all distinct
    assert Transformation(False, False, 0, 0, 0) in ts  # identity is one of the classes
    assert sum(t.gray for t in ts) == 12
    assert set(dihedral_transformations()) <= set(ts)


def test_transformations_exact_and_invertible():
    x = torch.rand(2, 3, 40, 40)
    for t in official_transformations():
        y = t.apply(x)
        assert y.shape == x.shape
        back = t.invert(y)
        # colour is not invertible: the geometric part is, onto the grey image
        ref = Transformation(True, False, 0, 0, 0).apply(x) if t.gray else x
        s = int(40 * 0.15)
        if t.tx or t.ty:  # symmetric padding loses the border that left the image
            assert torch.equal(back[..., s:-s, s:-s], ref[..., s:-s, s:-s])
        else:  # rotations / flips: bit-exact
            assert torch.equal(back, ref)
    # a non-trivial transformation changes the image
    assert not torch.equal(Transformation(False, True, 0, 0, 1).apply(x), x)


def test_inverse_maps_a_centred_patch_grid_back():
    """A 'discriminator' that returns the centre pixel of each 11x11 patch: its map on the
    transformed image, inverted, equals its map on the original wherever a vote exists."""
    x = torch.rand(1, 1, 32, 32)
    crop = lambda im: im[..., 5:-5, 5:-5]  # noqa: E731  (grid of a 5-layer, 3x3, unpadded net)
    for t in official_transformations():
        if t.gray:
            continue
        back = t.invert(crop(t.apply(x.expand(1, 3, 32, 32))[:, :1]), size=32, fill=float("nan"))
        valid = ~torch.isnan(back)
        assert valid.float().mean() > 0.5
        assert torch.equal(back[valid], crop(x)[valid])


def test_pyramid_matches_official_sizes():
    # SinGAN's imresize: ceil(64 * 0.390625000000000006) = 26 (benchmarks/parity/tdg.py measures it)
    assert pyramid_sizes(128, 25, 64, 0.75) == [26, 32, 41, 51, 64]  # paper preset, MVTec at 128 px
    assert pyramid_sizes(128, 16, 32, 0.5) == [17, 23, 32]  # cpu preset
    assert pyramid_sizes(128, 25, 64, 0.75, "exact") == [25, 32, 40, 51, 64]  # option pyramid_sides = "exact"


def test_discriminator_head_shape():
    d = PatchDiscriminator(num_transforms=54, width=32, min_width=32)
    assert d(torch.zeros(2, 3, 25, 25)).shape == (2, 55, 15, 15)


def test_transformation_head_learns():
    images = ramp_images(2, 64)
    torch.manual_seed(0)  # as the run layer does before it builds an adapter
    a = TDG(AdapterConfig(image_size=64, seed=0, options={"niter": 30}))
    untrained = a.model.transformation_accuracy(images, n=2)
    a.fit({"ramp": TensorImages(images)})
    acc = a.model.transformation_accuracy(images, n=2)
    assert acc > 0.4 > untrained + 0.1  # chance = 1/8


def test_predict_shapes_and_finite():
    sup = synth("grid", 2, 48)
    for cls in (TDG, TDGPlus):
        a = cls(AdapterConfig(image_size=48, seed=1, options=FAST))
        if cls is TDGPlus:
            a.fit({"stripes": TensorImages(synth("stripes", 3, 48))})
        a.adapt(sup)
        scores, maps = a.predict(synth("grid", 3, 48, "test"))
        assert scores.shape == (3,) and maps.shape == (3, 48, 48)
        assert torch.isfinite(scores).all() and torch.isfinite(maps).all()


def test_defect_scores_higher_than_normal():
    torch.manual_seed(0)
    size = 64
    a = TDG(AdapterConfig(image_size=size, seed=0))
    sup = synth("stripes", 2, size)  # stripes: 90-degree rotations are visible in every patch
    a.fit({"stripes": TensorImages(sup)})
    a.adapt(sup)
    normal = synth("stripes", 6, size, "test")
    defect = torch.cat([synth("stripes", 2, size, "test", d) for d in ("scratch", "hole", "stain", "missing")])
    s_normal, _ = a.predict(normal)
    s_defect, _ = a.predict(defect)
    assert s_defect.mean() > s_normal.mean()


def test_aggregated_pretraining_never_sees_held_out_category(tmp_path):
    root = generate(tmp_path / "synth", categories=3, seed=0, n_train=5, n_test_good=1, n_test_per_defect=1, size=48)
    ds = MVTecDataset(root)
    target = ds.categories[0]
    train = training_data("aggregated", ds, target, torch.empty(0), 48)
    seen: list[str] = []

    class Spy(torch.utils.data.Dataset):
        def __init__(self, cat, inner):
            self.cat, self.inner = cat, inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            seen.append(self.cat)
            return self.inner[i]

    a = TDGPlus(AdapterConfig(image_size=48, seed=0, options=FAST))
    a.fit({c: Spy(c, d) for c, d in train.items()})
    cats = {c for c, _ in a.pretrain_sources}
    assert target not in cats and target not in seen
    assert cats == set(ds.categories) - {target} == set(seen)
    assert len(a.pretrain_sources) == 3 * 2  # pretrain_images_per_category from each of the 2 others


def test_tdg_plus_adapts_from_the_same_pretrained_state():
    pool = {"stripes": TensorImages(synth("stripes", 3, 48)), "washer": TensorImages(synth("washer", 3, 48))}
    a = TDGPlus(AdapterConfig(image_size=48, seed=0, options=FAST))
    a.fit(pool)
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    support, test = synth("grid", 2, 48), synth("grid", 2, 48, "test", "hole")
    a.adapt(support)
    s1, m1 = a.predict(test)
    a.adapt(synth("grid", 2, 48, "test"))  # another cell in between
    a.adapt(support)
    s2, m2 = a.predict(test)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    after = a.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # pre-trained state untouched
    # the run layer's cache round trip gives the same adapted model
    b = TDGPlus(AdapterConfig(image_size=48, seed=0, options=FAST))
    b.load_state_dict(a.state_dict())
    b.adapt(support)
    s3, _ = b.predict(test)
    assert torch.equal(s1, s3)


@pytest.mark.parametrize("cls", [TDG, TDGPlus])
def test_presets(cls):
    assert {"cpu", "paper"} <= set(cls.presets)
    paper = cls.presets["paper"]
    assert (paper["niter"], paper["lr_g"], paper["lr_d"], paper["alpha"], paper["transforms"]) == (
        1000,
        5e-4,
        5e-4,
        100.0,
        "official54",
    )


@pytest.mark.parametrize("cls", [TDG, TDGPlus])
def test_every_option_is_declared_and_the_presets_satisfy_it(cls, presets_declared):
    presets_declared(cls)


def test_bad_options_fail_at_planning():
    TDGPlus.check_options({"pretrain_index": "raw", "transforms_per_step": None, "alpha": 0})
    for cls, key, value, valid in [
        (TDGPlus, "pretrain_index", "minmax", "'scaled', 'raw'"),
        (TDG, "transforms", "all", "'official54', 'dihedral8'"),
        (TDG, "scale_factor", 1.0, "(0, 1)"),
        (TDG, "niter", 0, ">= 1"),
    ]:
        with pytest.raises(FsadError, match=f"{key!r}.*{re.escape(valid)}"):
            cls.check_options({key: value})
