"""TDG options found by benchmarks/parity/tdg.py: ``pyramid_sides`` and ``sample_forward`` (official by
default, the former behaviour labelled)."""

from __future__ import annotations

import math

import pytest
import torch

from fsad_bench.adapter import AdapterConfig
from fsad_bench.errors import FsadError
from fsad_bench.methods.tdg.adapter import TDG, TDGPlus
from fsad_bench.methods.tdg.torch_model import (
    TDGHierarchy,
    dihedral_transformations,
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
    b = cls(AdapterConfig(preset="paper", image_size=128, options={"pyramid_sides": "exact"}))
    assert b.model.sizes == [25, 32, 40, 51, 64]
    assert "sides=exact" in b.label and "pyramid_sides" not in b.label


def test_invalid_sides_rejected():
    with pytest.raises(FsadError, match="pyramid_sides"):
        TDG.check_options({"pyramid_sides": "round"})


def _trained(sample_every: int, niter: int = 2) -> TDGHierarchy:
    torch.manual_seed(0)
    model = TDGHierarchy([16, 20], dihedral_transformations()[:2], 8, 8)
    trainer = HierarchyTrainer(
        lr_g=5e-4,
        lr_d=5e-4,
        beta1=0.5,
        gamma=0.1,
        milestone_d=500,
        milestone_g=1000,
        d_steps=1,
        g_steps=1,
        alpha=10.0,
        noise_amp=0.1,
        sample_every=sample_every,
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
