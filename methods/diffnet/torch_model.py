"""DifferNet's networks in plain torch: the FrEIA flow (GLOW couplings, DifferNet's soft clamp,
fully connected subnets), its loss, the multi-scale AlexNet feature extractor, the random
views (rotation, colour jitter) and the scoring with gradient maps (our differentiable recipe,
:func:`score_views`, and the official one, :func:`official_grad_maps`).

Features are ``(B, n_feat)``; images ``(B, 3, S, S)`` in [0, 1]. See ``README.md`` for the
official code these follow.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from FrEIA.modules import GLOWCouplingBlock, PermuteRandom
from PIL import Image
from scipy import ndimage
from torch import nn
from torchvision.transforms.v2 import functional as TF

from fsad_bench.components.affine import rotate
from fsad_bench.components.backbone import IMAGENET_MEAN, IMAGENET_STD, TAPS, FeatureExtractor
from fsad_bench.components.maps import gaussian_blur

ALEXNET_CHANNELS = 256  # channels of AlexNet's last ``features`` map
ALEXNET_MIN_SIZE = 63  # smallest input size (px) AlexNet's ``features`` accept


# -- flow -----------------------------------------------------------------------------------
class AtanSoftClamp:
    """DifferNet's soft clamp, given to FrEIA as ``clamp_activation``: ``u ↦ 0.636 · atan(u / clamp)``.

    FrEIA multiplies by ``clamp``, so the log-scale is ``clamp · 0.636 · atan(u / clamp)`` as in
    the official ``glow_coupling_layer.log_e`` (≈ identity near 0, bounded by ±clamp).
    """

    def __init__(self, clamp: float):
        self.clamp = clamp

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return 0.636 * torch.atan(u / self.clamp)


class FullyConnectedSubnet(nn.Sequential):
    """Coupling subnet of DifferNet: 3 hidden ``Linear → Dropout → ReLU`` layers and a linear output,
    ``(B, dims_in)`` -> ``(B, dims_out)``."""

    def __init__(self, dims_in: int, dims_out: int, hidden: int, dropout: float = 0.0):
        layers: list[nn.Module] = []
        width = dims_in
        for _ in range(3):
            layers += [nn.Linear(width, hidden), nn.Dropout(dropout), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, dims_out))
        super().__init__(*layers)


def build_flow(
    n_feat: int, n_blocks: int = 8, hidden: int = 2048, clamp: float = 3.0, dropout: float = 0.0
) -> SequenceINN:
    """DifferNet's flow head as a FrEIA ``SequenceINN``: ``n_blocks`` × [PermuteRandom(seed=k), GLOW coupling].

    Maps ``(B, n_feat)`` to ``(z (B, n_feat), log|det J| (B,))``; invertible with ``rev=True``.
    Subnet weights come from torch's global RNG (seed it before calling).
    """
    flow = SequenceINN(n_feat)
    numpy_state = np.random.get_state()  # PermuteRandom reseeds numpy's global RNG
    try:
        for k in range(n_blocks):
            flow.append(PermuteRandom, seed=k)
            flow.append(
                GLOWCouplingBlock,
                clamp=clamp,
                clamp_activation=AtanSoftClamp(clamp),
                subnet_constructor=lambda c_in, c_out: FullyConnectedSubnet(c_in, c_out, hidden, dropout),
            )
    finally:
        np.random.set_state(numpy_state)
    return flow


def nll_per_sample(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """DifferNet's loss per sample: ``(0.5 · Σ z² − log|det J|) / D`` -> ``(B,)`` (nats per dimension,
    up to the constant of the standard normal)."""
    return (0.5 * z.pow(2).sum(dim=1) - log_jac_det) / z.shape[1]


# -- features -------------------------------------------------------------------------------
class AlexNetMultiScale(nn.Module):
    """Frozen AlexNet ``features`` (or the last default tap of another torchvision CNN ``arch``)
    at ``n_scales`` resolutions, average-pooled and concatenated.

    Input ``(B, 3, H, W)`` in [0, 1] (ImageNet normalisation inside); scale ``s`` is the input
    resized to ``H // 2**s`` (nearest, as the official code); output ``(B, C · n_scales)``, C = 256
    for AlexNet.
    """

    def __init__(self, weights: str = "imagenet", n_scales: int = 3, arch: str = "alexnet"):
        super().__init__()
        tap = TAPS[arch][-1:] if arch in TAPS else None
        self.backbone = FeatureExtractor(arch, weights, taps=tap, normalize=False)
        self.weights_tag, self.channels = self.backbone.weights_tag, self.backbone.channels[-1]
        self.n_scales = n_scales
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last tap's map ``(B, C, h, w)`` of normalised images ``x``."""
        return self.backbone(x)[-1]

    @property
    def n_feat(self) -> int:
        return self.channels * self.n_scales

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation ``(x − mean) / std`` of ``(B, 3, H, W)`` in [0, 1] (torchvision's ``Normalize``)."""
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.normalise(x))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(B, C · n_scales)`` of normalised images ``x`` ``(B, 3, H, W)``."""
        size = x.shape[-1]
        pooled = []
        for s in range(self.n_scales):
            xs = x if s == 0 else F.interpolate(x, size=size // 2**s)
            pooled.append(self.features(xs).mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


# -- augmentation ---------------------------------------------------------------------------
def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation of ``(B, 3, H, W)`` with per-image ``factors`` ``(B, 3)``
    (1 = unchanged), torchvision's formulas, applied in this order; output clamped to [0, 1]."""
    b, c, s = (factors[:, i].view(-1, 1, 1, 1).to(x) for i in range(3))
    x = (x * b).clamp(0, 1)
    grey = TF.rgb_to_grayscale(x)
    x = (c * x + (1 - c) * grey.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    grey = TF.rgb_to_grayscale(x)
    return (s * x + (1 - s) * grey).clamp(0, 1)


@lru_cache(maxsize=64)  # the fixed map rotations recur; 4·S² bytes each (0.8 MB at 448 px)
def _pil_nearest_index(size: int, degrees: float) -> torch.Tensor:
    """Source pixel (flat index, −1 = outside: black fill) of every output pixel of PIL's
    ``Image.rotate(degrees, NEAREST)`` (counter-clockwise, about the centre, same size) of a
    ``size`` x ``size`` image: PIL rotates an image of pixel indices, so the mapping is PIL's own."""
    index = Image.fromarray(np.arange(size * size, dtype=np.int32).reshape(size, size), mode="I")
    out = index.rotate(float(degrees), resample=Image.NEAREST, fillcolor=-1)
    return torch.from_numpy(np.array(out, dtype=np.int32).reshape(-1))


def rotate_nearest_uint8(x: torch.Tensor, degrees: list[float]) -> torch.Tensor:
    """DifferNet's rotation: ``(B, C, S, S)`` in [0, 1] quantised to 8 bits (``round(255 x) / 255`` in float32
    as ``ToTensor`` gives it: the PIL image the official loader rotates) and rotated by ``degrees`` (B values, counter-clockwise)
    exactly as PIL's ``rotate(NEAREST)`` with black fill (torchvision ``RandomRotation`` on a PIL image).
    A gather: differentiable w.r.t. ``x`` (the quantisation passes gradients straight through)."""
    b, c, h, w = x.shape
    if h != w:
        raise ValueError(f"rotate_nearest_uint8 needs square images, got {h}x{w}")
    q = x + ((torch.round(x * 255).float() / 255).to(x.dtype) - x).detach()  # ToTensor's float32 k / 255
    index = torch.stack([_pil_nearest_index(h, float(d)) for d in degrees]).to(x.device, torch.int64)
    inside = (index >= 0).to(x.dtype)[:, None]
    out = q.flatten(2).gather(2, index.clamp(min=0)[:, None].expand(b, c, -1)) * inside
    return out.view(b, c, h, w)


#: Rotation filters of :class:`DifferNetViews`: PIL nearest on the 8-bit image (official) or bilinear.
ROTATE_FILTERS = ("nearest", "bilinear")


class DifferNetViews:
    """DifferNet's random transforms: resize to ``img_size`` px, random rotation in ``±rotation``
    degrees, optional colour jitter (factors uniform in ``[1 − a, 1 + a]``). ``rotate_filter``:
    ``"nearest"`` (official: PIL nearest on the 8-bit image, :func:`rotate_nearest_uint8`) or
    ``"bilinear"`` (``grid_sample``, zero fill)."""

    def __init__(
        self,
        img_size: int,
        rotation: float = 180.0,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        rotate_filter: str = "bilinear",
    ):
        if rotate_filter not in ROTATE_FILTERS:
            raise ValueError(f"rotate_filter must be one of {ROTATE_FILTERS}, got {rotate_filter!r}")
        self.img_size = img_size
        self.rotation = rotation
        self.jitter = torch.tensor([brightness, contrast, saturation])
        self.rotate_filter = rotate_filter

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random transforms: angles ``(n,)`` in radians and jitter factors ``(n, 3)``."""
        angles = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(self.rotation)
        factors = 1 + (torch.rand(n, 3, generator=generator) * 2 - 1) * self.jitter
        return angles, factors

    def resized(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, 3, img_size, img_size)`` (bilinear, antialiased when shrinking; unchanged at that size)."""
        if images.shape[-1] != self.img_size or images.shape[-2] != self.img_size:
            images = F.interpolate(
                images,
                size=(self.img_size, self.img_size),
                mode="bilinear",
                align_corners=False,
                antialias=images.shape[-1] > self.img_size,
            )
        return images

    def rotated(self, images: torch.Tensor, degrees: list[float]) -> torch.Tensor:
        """``(B, 3, s, s)`` rotated by ``degrees`` (B values, counter-clockwise) with :attr:`rotate_filter`."""
        if self.rotate_filter == "nearest":
            return rotate_nearest_uint8(images, degrees)
        return rotate(images, torch.tensor([math.radians(d) for d in degrees]).to(images))

    def apply(self, images: torch.Tensor, angles: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in [0, 1] -> ``(B, 3, img_size, img_size)``; differentiable w.r.t. ``images``.
        ``angles`` ``(B,)`` in radians, ``factors`` ``(B, 3)``."""
        images = self.resized(images)
        if self.rotate_filter == "nearest":
            x = rotate_nearest_uint8(images, [math.degrees(float(a)) for a in angles.cpu()])
        else:
            x = rotate(images, angles.to(images.device))
        if bool((self.jitter > 0).any()):
            x = color_jitter(x, factors.to(images.device))
        return x

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random view per image."""
        return self.apply(images, *self.sample(images.shape[0], generator))


# -- scoring --------------------------------------------------------------------------------
def score_views(
    flow: SequenceINN,
    extractor: AlexNetMultiScale,
    views: DifferNetViews,
    images: torch.Tensor,
    angles: torch.Tensor,
    factors: torch.Tensor,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and gradient maps of ``images`` ``(b, 3, S, S)`` under ``T`` views: ``angles`` ``(T,)`` and
    ``factors`` ``(T, 3)`` shared by every image, or ``(b, T)`` and ``(b, T, 3)`` per image. Scores ``(b,)`` =
    mean z² over views and features; maps ``(b, S, S)`` = squared mean over channels and views of
    |∂ΣNLL/∂image| (the [0, 1] input image: rotation back is the adjoint of the differentiable rotation),
    each view's gradient blurred by a Gaussian of ``sigma`` px first (0: no blur; torch mirror border).
    Works under ``torch.no_grad`` too."""
    b, size = images.shape[0], images.shape[-1]
    n_views = angles.shape[-1]
    flat_angles = angles.reshape(-1) if angles.dim() == 2 else angles.repeat(b)
    flat_factors = factors.reshape(-1, 3) if factors.dim() == 3 else factors.repeat(b, 1)
    x = images.repeat_interleave(n_views, dim=0).requires_grad_(True)  # (b·T, 3, S, S)
    with torch.enable_grad():
        z, log_jac = flow(extractor(views.apply(x, flat_angles, flat_factors)))
        (grad,) = torch.autograd.grad(nll_per_sample(z, log_jac).sum(), x)
    if sigma > 0:
        grad = gaussian_blur(grad, sigma)
    grad_map = grad.abs().mean(dim=1).view(b, n_views, size, size).mean(dim=1) ** 2
    return z.detach().pow(2).view(b, -1).mean(dim=1), grad_map


@torch.no_grad()
def view_scores(
    flow: SequenceINN,
    extractor: AlexNetMultiScale,
    views: DifferNetViews,
    images: torch.Tensor,
    angles: torch.Tensor,
    factors: torch.Tensor,
) -> torch.Tensor:
    """Scores ``(b,)`` = mean z² over the ``T`` views and the features (official ``train.py``), views as in
    :func:`score_views` (``angles`` ``(T,)`` shared or ``(b, T)`` per image)."""
    b = images.shape[0]
    n_views = angles.shape[-1]
    flat_angles = angles.reshape(-1) if angles.dim() == 2 else angles.repeat(b)
    flat_factors = factors.reshape(-1, 3) if factors.dim() == 3 else factors.repeat(b, 1)
    z, _ = flow(extractor(views.apply(images.repeat_interleave(n_views, dim=0), flat_angles, flat_factors)))
    return z.pow(2).view(b, -1).mean(dim=1)


def fixed_degrees(n_views: int) -> list[float]:
    """The official map views' rotations ``i · 360 / T`` degrees, i = 0 … T−1 (``get_fixed``)."""
    return [i * 360.0 / n_views for i in range(n_views)]


def official_grad_maps(
    flow: SequenceINN,
    extractor: AlexNetMultiScale,
    views: DifferNetViews,
    images: torch.Tensor,
    n_views: int,
    sigma: float,
) -> torch.Tensor:
    """DifferNet's gradient maps (official ``localization.export_gradient_maps``) of ``images`` ``(b, 3, S, S)``:
    ``T`` views rotated by :func:`fixed_degrees` (with ``views``' filter; no colour jitter), the gradient
    of each image's mean NLL over its T views (the official batch-mean loss with its test batch of one
    image) w.r.t. the *normalised* views, each view's gradient rotated back by −i·360/T degrees with
    ``scipy.ndimage.rotate`` (cubic spline, zero fill) and blurred by ``scipy.ndimage.gaussian_filter``
    (σ = ``sigma`` px, border ``reflect``), per channel; map = (mean over channels and views of |·|)².
    Returns ``(b, img_size, img_size)`` on the CPU (the scipy part runs there)."""
    b, degrees = images.shape[0], fixed_degrees(n_views)
    with torch.no_grad():  # (b·T, 3, s, s) in [0, 1]
        v = views.rotated(views.resized(images).repeat_interleave(n_views, dim=0), degrees * b)
    xn = extractor.normalise(v).requires_grad_(True)
    with torch.enable_grad():
        z, log_jac = flow(extractor.pooled(xn))
        (grad,) = torch.autograd.grad(nll_per_sample(z, log_jac).sum() / n_views, xn)
    g = grad.detach().cpu().numpy().reshape(b, n_views, 3, *grad.shape[-2:])
    for i, deg in enumerate(degrees):
        for j in range(b):
            back = ndimage.rotate(np.transpose(g[j, i], (1, 2, 0)), -deg, reshape=False)
            g[j, i] = ndimage.gaussian_filter(np.transpose(back, (2, 0, 1)), (0, sigma, sigma))
    g = g.reshape(b, n_views * 3, *g.shape[-2:])
    return torch.from_numpy(np.abs(g).mean(axis=1) ** 2)
