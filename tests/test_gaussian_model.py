import pytest
import torch

from fsad_bench.augment import N_VIEWS, augment_support
from fsad_bench.gaussian_model import PositionGaussian


def _reference(train: torch.Tensor, test: torch.Tensor, eps: float) -> torch.Tensor:
    """float64, one position at a time, explicit inverse (how the official RegAD code does it)."""
    n, c, h, w = train.shape
    x, t = train.double().reshape(n, c, -1), test.double().reshape(len(test), c, -1)
    out = torch.empty(len(test), h * w, dtype=torch.float64)
    for p in range(h * w):
        inv = torch.linalg.inv(torch.cov(x[:, :, p].T) + eps * torch.eye(c, dtype=torch.float64))
        d = t[:, :, p] - x[:, :, p].mean(0)
        out[:, p] = torch.einsum("bi,ij,bj->b", d, inv, d).sqrt()
    return out.reshape(len(test), h, w)


@pytest.mark.parametrize("n,c,form", [(30, 48, "dual"), (30, 48, "primal"), (80, 16, "primal"), (80, 16, "dual")])
def test_batched_mahalanobis_matches_float64_loop(n, c, form):
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(1, c, 1, 1, generator=g) * 3
    train = torch.randn(n, c, 5, 6, generator=g) * scale + torch.randn(1, c, 5, 6, generator=g)
    test = torch.randn(4, c, 5, 6, generator=g) * 2
    ref = _reference(train, test, 0.01)
    got = PositionGaussian(eps=0.01, form=form, chunk=7).fit(train).mahalanobis(test)
    assert got.shape == (4, 5, 6)
    assert torch.allclose(got.double(), ref, rtol=2e-4, atol=1e-5)


def test_auto_form_picks_dual_when_fewer_samples_than_channels():
    assert PositionGaussian().fit(torch.randn(10, 32, 2, 2)).used_form == "dual"
    assert PositionGaussian().fit(torch.randn(40, 32, 2, 2)).used_form == "primal"


def test_support_augmentation_views():
    x = torch.rand(3, 3, 32, 32)
    out = augment_support(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3 * N_VIEWS, 3, 32, 32) and N_VIEWS == 22
    # the originals and their exact 90° rotations are among the views
    for img in (x[1], torch.rot90(x[2], 2, dims=(-2, -1))):
        assert any(torch.equal(img, v) for v in out)
    # grey views have equal channels
    assert sum(bool(torch.allclose(v[0], v[1]) and torch.allclose(v[1], v[2])) for v in out) >= 3


def test_separable_smoothing_matches_scipy():
    from scipy.ndimage import gaussian_filter
    import numpy as np
    import torch.nn.functional as F

    from fsad_bench.maps import smooth_maps

    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    got = smooth_maps(maps, 64, 4.0)
    up = F.interpolate(maps[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0].numpy()
    ref = np.stack([gaussian_filter(u, 4.0, mode="mirror") for u in up])
    assert got.shape == (3, 64, 64)
    assert np.abs(got.numpy() - ref).max() < 1e-5
