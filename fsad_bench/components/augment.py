"""Support-set augmentation of RegAD (Huang et al., ECCV 2022), shared by Gaussian-style methods.

Each support image ``(3, H, W)`` in [0, 1] yields 22 views, in this order (the official
code's list, each transform applied on its own):

1. the image itself;
2. 8 small rotations by ±π/16, ±π/8, ±3π/16, ±π/4 (reflection padding);
3. 8 translations by (±0.2, ±0.2) and (±0.1, ±0.1) of the half-width (reflection padding),
   i.e. 10% and 5% of the image size;
4. a horizontal flip;
5. a grey version (ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B, the weights of the official code's
   kornia ``rgb_to_grayscale``; torchvision's are rounded to 0.2989), repeated to 3 channels;
6. rotations by 90°, 180°, 270°.

The views are then shuffled with the caller's generator (the official code shuffles too;
the Gaussian fit does not depend on the order).
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as TF

from fsad_bench.components.affine import affine_warp

SMALL_ANGLES = tuple(s * a for a in (math.pi / 16, math.pi / 8, 3 * math.pi / 16, math.pi / 4) for s in (-1, 1))
SHIFTS = ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
N_VIEWS = 1 + len(SMALL_ANGLES) + len(SHIFTS) + 1 + 1 + 3


def _rotation(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0]])


#: luma weights of the grey view: ITU-R 601, as kornia's ``rgb_to_grayscale`` in the official RegAD code
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def grey(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> its luma (:data:`GREY_WEIGHTS`) repeated to ``(B, 3, H, W)``."""
    r, g, b = images.unbind(dim=-3)
    luma = GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b
    return luma.unsqueeze(-3).expand_as(images).contiguous()


def _translation(a: float, b: float) -> torch.Tensor:
    return torch.tensor([[1.0, 0.0, a], [0.0, 1.0, b]])


def augment_support(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """RegAD's support augmentation: ``(K, 3, H, W)`` -> ``(22 K, 3, H, W)`` (shuffled)."""
    k = images.shape[0]
    thetas = [_rotation(a) for a in SMALL_ANGLES] + [_translation(a, b) for a, b in SHIFTS]
    theta = torch.stack(thetas).to(images).repeat_interleave(k, dim=0)  # (16K, 2, 3)
    warped = affine_warp(images.repeat(len(thetas), 1, 1, 1), theta)
    views = [
        images,
        warped,
        TF.horizontal_flip(images),
        grey(images),
        *(torch.rot90(images, r, dims=(-2, -1)) for r in (1, 2, 3)),
    ]
    out = torch.cat(views)
    order = torch.randperm(out.shape[0], generator=generator)
    return out[order]
