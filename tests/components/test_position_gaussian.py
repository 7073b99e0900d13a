import pytest
import torch

from fsad_bench.adapter import accepts
from fsad_bench.components.augment import N_VIEWS, augment_support
from fsad_bench.components.position_gaussian import PositionGaussian
from fsad_bench.errors import FsadError
from fsad_bench.methods.gaussian import GaussianAdapter
from fsad_bench.protocols import Suite
from fsad_bench.run.plan import validate_suite


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


@pytest.mark.parametrize("border,scipy_mode", [("reflect", "mirror"), ("symmetric", "reflect")])
@pytest.mark.parametrize(
    "shape,size,sigma", [((16, 16), 64, 4.0), ((7, 11), 40, 2.0), ((9, 9), 24, 4.0), ((5, 5), 20, 0.0)]
)
def test_smoothing_is_upsample_then_scipy_blur(border, scipy_mode, shape, size, sigma):
    """smooth_maps (two products with the composed per-axis operators) equals bilinear upsampling
    followed by scipy's Gaussian filter, for both borders, non-square maps, kernels wider than
    the map (radius 16 > 9 px: periodic reflection) and sigma = 0; and the separable-conv path."""
    import numpy as np
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    from fsad_bench.components.maps import gaussian_blur, smooth_maps

    maps = torch.rand(3, *shape, generator=torch.Generator().manual_seed(1))
    got = smooth_maps(maps, size, sigma, border)
    up = F.interpolate(maps[:, None].double(), size=(size, size), mode="bilinear", align_corners=False)
    ref = np.stack([gaussian_filter(u, sigma, mode=scipy_mode) if sigma else u for u in up[:, 0].numpy()])
    assert got.shape == (3, size, size) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=2e-6)
    if sigma and min(shape) * size // max(shape) > 4 * sigma:  # F.pad's reflect needs radius < side
        conv = gaussian_blur(up.float(), sigma, border)[:, 0]
        np.testing.assert_allclose(got.numpy(), conv.numpy(), rtol=0, atol=2e-6)


def _pyramid(b: int, g: torch.Generator, channels_last: bool) -> list[torch.Tensor]:
    maps = [
        torch.randn(b, 8, 12, 12, generator=g),
        torch.randn(b, 16, 6, 6, generator=g),
        torch.randn(b, 32, 3, 3, generator=g),
    ]
    return [m.contiguous(memory_format=torch.channels_last) for m in maps] if channels_last else maps


@pytest.mark.parametrize("channels_last", [False, True])
def test_pyramid_samples_equals_the_concat_path(channels_last):
    from fsad_bench.components.maps import concat_pyramid, pyramid_samples

    g = torch.Generator().manual_seed(3)
    batches = [_pyramid(4, g, channels_last), _pyramid(3, g, channels_last)]
    old = torch.cat([concat_pyramid(m) for m in batches])  # (7, 56, 12, 12)
    old = old.permute(2, 3, 0, 1).reshape(144, 7, 56)
    buf = torch.empty(144, 7, 56)
    pyramid_samples(batches[0], out=buf, offset=0)
    pyramid_samples(batches[1], out=buf, offset=4)
    assert torch.equal(buf, old)
    assert torch.equal(pyramid_samples(batches[1]), old[:, 4:])
    # the upsampling mode is a parameter (nearest: every coarse cell repeated)
    near = pyramid_samples(batches[0], mode="nearest").view(12, 12, 4, 56)
    assert torch.equal(
        near[:, :, :, 8:24], batches[0][1].repeat_interleave(2, 2).repeat_interleave(2, 3).permute(2, 3, 0, 1)
    )
    for mode in ("nearest", "bilinear"):  # nearest: the broadcast-view path equals F.interpolate's
        ref = concat_pyramid(batches[0], mode).permute(2, 3, 0, 1).reshape(144, 4, 56)
        assert torch.equal(pyramid_samples(batches[0], mode=mode), ref)
        mean = torch.randn(144, 56, generator=g)  # subtract: centred as written
        assert torch.equal(pyramid_samples(batches[0], mode=mode, subtract=mean), ref - mean[:, None])
    odd = [torch.randn(2, 8, 12, 12, generator=g), torch.randn(2, 16, 5, 5, generator=g)]  # 12/5: not integer
    assert torch.equal(
        pyramid_samples(odd, mode="nearest"), concat_pyramid(odd, "nearest").permute(2, 3, 0, 1).reshape(144, 2, 24)
    )
    with pytest.raises(ValueError, match="cannot hold"):
        pyramid_samples(batches[0], out=buf, offset=5)
    with pytest.raises(ValueError, match="subtract"):
        pyramid_samples(batches[0], subtract=torch.zeros(144, 55))


@pytest.mark.parametrize("n,c", [(30, 48), (80, 16)])
def test_fit_and_score_in_the_position_major_layout(n, c):
    """fit_samples / score_samples (in place, what the adapters use) give the float64 loop's numbers."""
    from fsad_bench.components.position_gaussian import position_major

    g = torch.Generator().manual_seed(1)
    train = torch.randn(n, c, 4, 5, generator=g) * (torch.rand(1, c, 1, 1, generator=g) * 3) + 1
    test = torch.randn(6, c, 4, 5, generator=g) * 2
    model = PositionGaussian(eps=0.01, chunk=3).fit_samples(position_major(train), (4, 5))
    got = model.score_samples(position_major(test))
    assert got.shape == (6, 4, 5)
    assert torch.allclose(got.double(), _reference(train, test, 0.01), rtol=2e-4, atol=1e-5)
    if n < c:  # dual: the fitted buffer itself holds L⁻¹ X, no (P, N, N) factor is kept
        assert model.folded.shape == (20, n, c) and model.inv_chol is None
    with pytest.raises(ValueError, match="do not match"):
        model.score_samples(torch.zeros(19, 2, c))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("n,band", [(30, 24), (30, 1), (80, 1000)])  # dual / primal; bands of 1-4 rows / one band
def test_score_pyramid_equals_layout_then_score(mode, n, band):
    """The fused band-by-band scoring gives score_samples(pyramid_samples(...))'s numbers bit for
    bit: both forms, integer-ratio nearest (sliced coarse maps) and bilinear / non-integer ratios
    (upsampled once), bands that do not divide the grid; the scratch block stays band-sized."""
    from fsad_bench.components.maps import ScratchBuffer, pyramid_samples

    g = torch.Generator().manual_seed(5)
    model = PositionGaussian(eps=0.01)
    model.band_positions = band
    model.fit_samples(pyramid_samples(_pyramid(n, g, True), mode), (12, 12))
    assert model.used_form == ("dual" if n < 56 else "primal")
    for test in (_pyramid(5, g, True), [torch.randn(3, 8, 12, 12, generator=g), torch.randn(3, 48, 5, 5, generator=g)]):
        ref = model.score_samples(pyramid_samples(test, mode, subtract=model.mean), centred=True)
        scratch = ScratchBuffer()
        got = model.score_pyramid(test, mode, scratch)
        assert got.shape == (len(test[0]), 12, 12) and torch.equal(got, ref)
        if band < 144:
            assert scratch._flat.numel() < 144 * len(test[0]) * 56
    with pytest.raises(ValueError, match="grid"):
        model.score_pyramid([torch.randn(2, 8, 10, 10), torch.randn(2, 48, 5, 5)], mode)


def test_feature_cache_respects_its_bound():
    from fsad_bench.components.feature_cache import CachedBackbone

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return [self.conv(x), self.conv(x)[:, :, ::2, ::2]]

    per_image = (4 * 8 * 8 + 4 * 4 * 4) * 4  # bytes of one image's features
    cache = CachedBackbone(Tiny(), "tiny", max_memory_mb=10.5 * per_image / 2**20)
    images = torch.rand(30, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    first = cache(images[:4])
    cache(torch.cat([images[4:5], images[4:5]]))  # the same image twice
    assert cache.bytes == 5 * per_image
    for i in range(5, 30, 6):
        cache(images[i : i + 6])
        assert cache.bytes <= cache.max_bytes and len(cache.memory) == 10
    assert cache.bytes == sum(sum(t.numel() * t.element_size() for t in f) for f in cache.memory.values())
    again = cache(images[:4])  # evicted: recomputed, identical
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_every_option_is_declared_and_the_presets_satisfy_it():
    for preset in GaussianAdapter.presets.values():
        assert set(preset) == set(GaussianAdapter.option_constraints)
        for key, value in preset.items():
            assert any(accepts(c, value) for c in GaussianAdapter.option_constraints[key]), (key, value)


def test_bad_option_value_fails_at_planning():
    suite = Suite(
        name="t", dataset="synthetic", methods=["gaussian"], k=[1], options={"gaussian": {"upsample": "cubic"}}
    )
    with pytest.raises(
        FsadError, match="option 'upsample' of method 'gaussian' must be one of 'nearest', 'bilinear', got 'cubic'"
    ):
        validate_suite(suite)
    with pytest.raises(FsadError, match="'blur_border'.*'symmetric', 'reflect'"):
        GaussianAdapter.check_options({"blur_border": "wrap"})
    with pytest.raises(FsadError, match="'n_features'.*integer >= 1"):
        GaussianAdapter.check_options({"n_features": 0})
    GaussianAdapter.check_options({"upsample": "bilinear", "n_features": 100, "channel_seed": None})
