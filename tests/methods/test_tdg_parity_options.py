"""TDG options found by benchmarks/parity/tdg.py: ``pyramid_sides`` and ``sample_forward`` (official by
default, the former behaviour labelled)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fsad_bench.adapter import AdapterConfig
from fsad_bench.errors import FsadError
from fsad_bench.methods.tdg.adapter import TDG, TDGPlus
from fsad_bench.methods.tdg.torch_model import (
    TDGHierarchy,
    dihedral_transformations,
    matlab_resize,
    official_scale_factor,
    pyramid_sizes,
)
from fsad_bench.methods.tdg.training import HierarchyTrainer


def official_sides(image_size: int, min_size: int, max_size: int, factor: float) -> list[int]:
    """An independent re-computation of ``functions.adjust_scales2image`` + ``creat_reals_pyramid``:
    SinGAN's ``imresize`` output side is ``ceil(side * scale)`` in float64."""
    num_scales = math.ceil(math.log(min_size / image_size, factor)) + 1
    stop = num_scales - math.ceil(math.log(min(max_size, image_size) / image_size, factor))
    top = math.ceil(image_size * min(max_size / image_size, 1))
    f = math.pow(min_size / top, 1 / stop)
    return [math.ceil(top * math.pow(f, stop - i)) for i in range(stop + 1)]


@pytest.mark.parametrize("image_size", [96, 128, 224, 256])
def test_default_sides_are_official(image_size):
    assert pyramid_sizes(image_size, 25, 64, 0.75) == official_sides(image_size, 25, 64, 0.75)


@pytest.mark.parametrize("cls", [TDG, TDGPlus])
def test_presets_default_to_official_and_exact_is_labelled(cls):
    for preset in ("paper", "cpu"):
        assert cls.presets[preset]["pyramid_sides"] == "official"
    a = cls(AdapterConfig(preset="paper", image_size=128))
    assert a.model.sizes == [26, 32, 41, 51, 64]
    assert "sides" not in a.label
    b = cls(
        AdapterConfig(preset="paper", image_size=128, options={"pyramid_sides": "exact", "pyramid_resize": "bicubic"})
    )
    assert b.model.sizes == [25, 32, 40, 51, 64]
    assert "sides=exact" in b.label and "pyramid_sides" not in b.label
    with pytest.raises(FsadError, match="pyramid_sides = 'official'"):
        cls(AdapterConfig(preset="paper", image_size=128, options={"pyramid_sides": "exact"}))


def test_invalid_sides_rejected():
    with pytest.raises(FsadError, match="pyramid_sides"):
        TDG.check_options({"pyramid_sides": "round"})


def _trained(sample_every: int, niter: int = 2, model=None, **trainer_options) -> TDGHierarchy:
    """A tiny hierarchy (``model()``, default two dihedral scales) trained ``niter`` iterations; torch seeded first."""
    torch.manual_seed(0)
    model = model() if model else TDGHierarchy([16, 20], dihedral_transformations()[:2], 8, 8)
    options = {"milestone_d": 500, "milestone_g": 1000, "d_steps": 1, "g_steps": 1, **trainer_options}
    trainer = HierarchyTrainer(
        lr_g=5e-4, lr_d=5e-4, beta1=0.5, gamma=0.1, alpha=10.0, noise_amp=0.1, sample_every=sample_every, **options
    )
    trainer.train(
        model,
        torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1)),
        niter,
        torch.Generator().manual_seed(2),
    )
    return model


def test_sample_forward_updates_only_generator_bn_statistics():
    """At the coarsest scale only G's BatchNorm statistics move; the next scale sees them (eval-mode chain)."""
    a, b = _trained(150), _trained(0)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if key.startswith(("generators.0.", "discriminators.0.")):
            moved = key.startswith("generators.") and key.endswith(
                ("running_mean", "running_var", "num_batches_tracked")
            )
            assert torch.equal(va, vb) != moved, key
    assert not torch.equal(a.generators[1].to_rgb[0].weight, b.generators[1].to_rgb[0].weight)


def test_sample_forward_is_official_and_off_is_labelled():
    for cls in (TDG, TDGPlus):
        assert all(p["sample_forward"] is True for p in cls.presets.values())
        a = cls(AdapterConfig(preset="cpu", image_size=64))
        assert a.trainer.sample_every == 150 and "sample_forward" not in a.label
        b = cls(AdapterConfig(preset="cpu", image_size=64, options={"sample_forward": False}))
        assert b.trainer.sample_every == 0 and "sample_forward=off" in b.label


# -- pyramid_resize: SinGAN's 8-bit Matlab-style imresize (official) vs F.interpolate (labelled) ---------------
def _quantised(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(255 * ((x + 1) / 2).clamp(0, 1))


def test_matlab_resize_at_scale_one_only_quantises():
    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = matlab_resize(x, 1.0)
    assert torch.equal(y, ((_quantised(x) / 255 - 0.5) * 2).clamp(-1, 1))
    assert not torch.equal(y, x)


@pytest.mark.parametrize("scale", [0.5, 0.75, 1 / 0.75])
def test_matlab_resize_keeps_a_constant_image_and_sizes_by_ceil(scale):
    x = torch.full((1, 3, 26, 26), 2 * 100 / 255 - 1 + 1e-6)
    y = matlab_resize(x, scale)
    assert y.shape[-1] == math.ceil(26 * scale)
    assert torch.allclose(y, torch.full_like(y, 2 * 100 / 255 - 1), atol=1e-6)


def test_matlab_resize_matches_pil_bicubic_away_from_the_far_border():
    """Downscaling by 1/2: PIL's antialiased bicubic (Keys a = -0.5, support stretched by 2, taps past a border
    dropped and the rest renormalised) computes the same weights, except near the far border, which Matlab
    mirrors. The 8-bit image is resized in float by both."""
    pil = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 32, 32, generator=g) * 2 - 1
    q = _quantised(x)[0, 0]
    ref = pil.fromarray(q.numpy().astype("float32"), mode="F").resize((16, 16), pil.Resampling.BICUBIC)
    ref = torch.tensor(np.array(ref, dtype="float32"))
    ours = (matlab_resize(x, 0.5)[0, 0] / 2 + 0.5) * 255
    assert torch.allclose(ours[:13, :13], ref[:13, :13], atol=2e-3)  # near border: both renormalise
    assert (ours[-1] - ref[-1]).abs().max() > 1e-2  # far border: mirrored taps


def test_official_pyramid_and_chain_sizes():
    f = official_scale_factor(128, 25, 64, 0.75)
    model = TDGHierarchy(
        pyramid_sizes(128, 25, 64, 0.75), dihedral_transformations()[:2], 8, 8, resize="official", factor=f
    )
    pyr = model.pyramid(torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    assert [p.shape[-1] for p in pyr] == [26, 32, 41, 51, 64]
    for n in range(4):
        assert model.up(pyr[n], n).shape[-1] == model.sizes[n + 1]
    # values are multiples of 2/255 only at scale 1 (the top level); the chain's crop is the top-left corner
    full = matlab_resize(pyr[0], 1 / f)
    assert full.shape[-1] == 33 and torch.equal(model.up(pyr[0], 0), full[..., :32, :32])


@pytest.mark.parametrize("cls", [TDG, TDGPlus])
def test_pyramid_resize_official_by_default_bicubic_labelled(cls):
    for preset in ("paper", "cpu"):
        assert cls.presets[preset]["pyramid_resize"] == "official"
    a = cls(AdapterConfig(preset="cpu", image_size=64))
    b = cls(AdapterConfig(preset="cpu", image_size=64, options={"pyramid_resize": "bicubic"}))
    assert a.model.resize == "official" and b.model.resize == "bicubic"
    assert "pyramid" not in a.label and "pyramid=bicubic" in b.label
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a.model.pyramid(x)[0], b.model.pyramid(x)[0])


def test_foreach_adam_is_bit_identical():
    """``HierarchyTrainer.foreach`` (a speed-up, not an option): the same weights as the per-tensor Adam."""

    def official():
        sizes, f = pyramid_sizes(24, 12, 24, 0.75), official_scale_factor(24, 12, 24, 0.75)
        return TDGHierarchy(sizes, dihedral_transformations()[:3], 8, 8, resize="official", factor=f)

    out = [
        _trained(2, 4, official, milestone_d=2, milestone_g=3, d_steps=2, g_steps=2, foreach=foreach).state_dict()
        for foreach in (False, True)
    ]
    assert out[0].keys() == out[1].keys()
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])
