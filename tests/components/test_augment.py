"""RegAD's support augmentation (fsad_bench.components.augment): the grey view uses the official code's
weights (kornia's ``rgb_to_grayscale``, when kornia is installed), and the 22 views are what the module
docstring lists."""

from __future__ import annotations

import pytest
import torch

from fsad_bench.components.augment import N_VIEWS, augment_support, grey


def test_grey_is_the_official_kornia_grey():
    kornia = pytest.importorskip("kornia")
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = grey(images)
    theirs = kornia.color.rgb_to_grayscale(images).expand_as(images)
    assert ours.shape == images.shape
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-7)


def test_grey_weights_are_itu_601():
    images = torch.zeros(1, 3, 2, 2)
    images[0, 0] = 1.0  # pure red
    assert torch.allclose(grey(images), torch.full((1, 3, 2, 2), 0.299))


def test_augment_support_has_every_view_once():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    views = augment_support(images, generator=torch.Generator().manual_seed(2))
    assert views.shape == (N_VIEWS * 2, 3, 8, 8) and N_VIEWS == 22
    for expected in (images, grey(images), torch.rot90(images, 2, dims=(-2, -1))):
        for img in expected:
            assert any(torch.equal(img, v) for v in views)
