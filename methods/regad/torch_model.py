"""RegAD's networks in plain torch: spatial transformer, registration net (CNN blocks + STNs),
Siamese encoder, predictor, SimSiam loss, and the official image-frame warp of the STN outputs.

Every map is ``(B, C, h, w)``; affine matrices ``θ`` are ``(B, 2, 3)`` in normalised coordinates
(:mod:`fsad_bench.components.affine`). See ``README.md`` for the official code these follow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsad_bench.components.affine import IDENTITY_PARAMS, N_PARAMS, affine_from_params, affine_warp, invert_affine
from fsad_bench.components.backbone import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor


def _halved(n: int) -> int:
    """Output length of ``MaxPool2d(3, stride=2, padding=1)`` on length ``n``."""
    return (n - 1) // 2 + 1


class SpatialTransformer(nn.Module):
    """STN on a feature map ``(B, C, H, W)`` -> (warped map ``(B, C, H, W)``, θ ``(B, 2, 3)``).

    ``grid_size``: ``(H, W)`` of the maps it will see (sets the fc input size); ``mode``: a key of
    :data:`~fsad_bench.components.affine.N_PARAMS`. Reflection padding, bilinear sampling,
    ``align_corners=False``. Starts as the identity transform (zero last weights, identity bias).
    """

    def __init__(self, in_channels: int, grid_size: tuple[int, int], mode: str = "rotation_scale"):
        super().__init__()
        if mode not in N_PARAMS:
            raise ValueError(f"unknown stn_mode {mode!r} (known: {', '.join(N_PARAMS)})")
        self.mode = mode
        self.localisation = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(64, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        h, w = (_halved(_halved(s)) for s in grid_size)
        self.regressor = nn.Sequential(nn.Linear(16 * h * w, 1024), nn.ReLU(), nn.Linear(1024, N_PARAMS[mode]))
        with torch.no_grad():
            self.regressor[2].weight.zero_()
            self.regressor[2].bias.copy_(torch.tensor(IDENTITY_PARAMS[mode]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.regressor(self.localisation(x).flatten(1))
        theta = affine_from_params(params, self.mode)
        return affine_warp(x, theta), theta


class RegistrationNet(nn.Module):
    """ResNet layer1..layer3 (or the stages of ``TAPS[arch]`` of another torchvision CNN; the first
    block includes the stem) with an STN after each block: the next block sees the registered map.

    ``weights`` as :class:`~fsad_bench.components.backbone.FeatureExtractor`; ``image_size`` (px)
    sets the STNs' fc sizes; ``imagenet_norm``: normalise the input with ImageNet mean / std.
    Input ``(B, 3, S, S)`` in [0, 1]; output: the three registered maps ``(B, 64, S/4, S/4)``,
    ``(B, 128, S/8, S/8)``, ``(B, 256, S/16, S/16)`` (ResNet-18) and their θ ``(B, 2, 3)`` each.
    """

    def __init__(self, arch: str, weights: str, image_size: int, stn_mode: str, imagenet_norm: bool = False):
        super().__init__()
        backbone = FeatureExtractor(arch, weights, normalize=False, trainable=True)  # taps: TAPS[arch]
        self.weights_tag = backbone.weights_tag
        self.blocks = backbone.stages  # block i: previous tap (stage 0: the image) -> tap i
        self.imagenet_norm = imagenet_norm
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():  # block output sizes for this image size
            x = torch.zeros(1, 3, image_size, image_size)
            shapes = []
            for block in self.blocks:
                x = block(x)
                shapes.append(x.shape[1:])
        self.channels = [s[0] for s in shapes]
        self.stns = nn.ModuleList([SpatialTransformer(c, (h, w), stn_mode) for c, h, w in shapes])

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.imagenet_norm:
            x = (x - self.mean) / self.std
        maps, thetas = [], []
        for block, stn in zip(self.blocks, self.stns):
            x, theta = stn(block(x))
            maps.append(x)
            thetas.append(theta)
        return maps, thetas


class SiameseEncoder(nn.Sequential):
    """Three 1x1 convs (BN + ReLU after the first two): ``(B, C, h, w)`` -> ``(B, C, h, w)``."""

    def __init__(self, channels: int = 256):
        super().__init__(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )


class Predictor(nn.Sequential):
    """Two 1x1 convs (BN + ReLU after the first): ``(B, C, h, w)`` -> ``(B, C, h, w)``."""

    def __init__(self, channels: int = 256):
        super().__init__(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``-cos(p, stopgrad(z))`` over channels, averaged over batch and positions; ``(B, C, h, w)``."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def simsiam_loss(p1: torch.Tensor, z1: torch.Tensor, p2: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric SimSiam loss ``½ D(p1, z2) + ½ D(p2, z1)`` (range [-1, 1])."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


def to_image_frame(maps: list[torch.Tensor], thetas: list[torch.Tensor]) -> list[torch.Tensor]:
    """The official ``stn{i}_output``: registered map ``i`` ``(B, C_i, h_i, w_i)`` warped by
    ``θ_i⁻¹``, then ``θ_{i-1}⁻¹``, …, ``θ_1⁻¹`` (one bilinear, reflection-padded ``grid_sample``
    per STN, in that order), i.e. sampled at ``(θ_1 … θ_i)⁻¹ q`` for image position ``q``."""
    inverses = [invert_affine(t) for t in thetas]
    out = []
    for i, m in enumerate(maps):
        for inv in reversed(inverses[: i + 1]):
            m = affine_warp(m, inv)
        out.append(m)
    return out
