"""DifferNet's networks in plain torch: the FrEIA flow (GLOW couplings, DifferNet's soft clamp,
fully connected subnets), its loss, the multi-scale AlexNet feature extractor, the random
views (rotation, colour jitter) and the scoring with gradient maps.

Features are ``(B, n_feat)``; images ``(B, 3, S, S)`` in [0, 1]. See ``README.md`` for the
official code these follow.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from FrEIA.modules import GLOWCouplingBlock, PermuteRandom
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


def build_flow(n_feat: int, n_blocks: int = 8, hidden: int = 2048, clamp: float = 3.0,
               dropout: float = 0.0) -> SequenceINN:
    """DifferNet's flow head as a FrEIA ``SequenceINN``: ``n_blocks`` × [PermuteRandom(seed=k), GLOW coupling].

    Maps ``(B, n_feat)`` to ``(z (B, n_feat), log|det J| (B,))``; invertible with ``rev=True``.
    Subnet weights come from torch's global RNG (seed it before calling).
    """
    flow = SequenceINN(n_feat)
    numpy_state = np.random.get_state()  # PermuteRandom reseeds numpy's global RNG
    try:
        for k in range(n_blocks):
            flow.append(PermuteRandom, seed=k)
            flow.append(GLOWCouplingBlock, clamp=clamp, clamp_activation=AtanSoftClamp(clamp),
                        subnet_constructor=lambda c_in, c_out: FullyConnectedSubnet(c_in, c_out, hidden, dropout))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
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


class DifferNetViews:
    """DifferNet's random transforms: resize to ``img_size`` px, random rotation in ``±rotation``
    degrees, optional colour jitter (factors uniform in ``[1 − a, 1 + a]``)."""

    def __init__(self, img_size: int, rotation: float = 180.0, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0):
        self.img_size = img_size
        self.rotation = rotation
        self.jitter = torch.tensor([brightness, contrast, saturation])

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random transforms: angles ``(n,)`` in radians and jitter factors ``(n, 3)``."""
        angles = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(self.rotation)
        factors = 1 + (torch.rand(n, 3, generator=generator) * 2 - 1) * self.jitter
        return angles, factors

    def apply(self, images: torch.Tensor, angles: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in [0, 1] -> ``(B, 3, img_size, img_size)``; differentiable w.r.t. ``images``."""
        if images.shape[-1] != self.img_size or images.shape[-2] != self.img_size:
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bilinear",
                                   align_corners=False, antialias=images.shape[-1] > self.img_size)
        x = rotate(images, angles.to(images.device))
        if bool((self.jitter > 0).any()):
            x = color_jitter(x, factors.to(images.device))
        return x

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random view per image."""
        return self.apply(images, *self.sample(images.shape[0], generator))


# -- scoring --------------------------------------------------------------------------------
def score_views(flow: SequenceINN, extractor: AlexNetMultiScale, views: DifferNetViews, images: torch.Tensor,
                angles: torch.Tensor, factors: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and gradient maps of ``images`` ``(b, 3, S, S)`` under the same ``T`` views for every image
    (``angles`` ``(T,)``, ``factors`` ``(T, 3)``): scores ``(b,)`` = mean z² over views and features;
    maps ``(b, S, S)`` = squared mean over channels and views of |∂NLL/∂image|, each view's gradient
    blurred by a Gaussian of ``sigma`` px first (0: no blur). Works under ``torch.no_grad`` too."""
    b, size, n_views = images.shape[0], images.shape[-1], angles.shape[0]
    x = images.repeat_interleave(n_views, dim=0).requires_grad_(True)  # (b·T, 3, S, S)
    with torch.enable_grad():
        z, log_jac = flow(extractor(views.apply(x, angles.repeat(b), factors.repeat(b, 1))))
        (grad,) = torch.autograd.grad(nll_per_sample(z, log_jac).sum(), x)
    if sigma > 0:
        grad = gaussian_blur(grad, sigma)
    grad_map = grad.abs().mean(dim=1).view(b, n_views, size, size).mean(dim=1) ** 2
    return z.detach().pow(2).view(b, -1).mean(dim=1), grad_map
