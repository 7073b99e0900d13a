"""Affine maths on images and feature maps (normalised coordinates, the ``F.affine_grid`` convention:
``out(p) = in(θ [p; 1])`` for output position ``p`` in [-1, 1]², ``θ`` ``(B, 2, 3)``).

Warps, the spatial-transformer parameterisations (RegAD's ``N_PARAMS`` families), homogeneous
form, composition, inversion, rotation of images and random small moves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Parameters predicted by a spatial transformer for each transformation family (RegAD's official N_PARAMS).
N_PARAMS = {
    "affine": 6,
    "translation": 2,
    "rotation": 1,
    "scale": 2,
    "shear": 2,
    "rotation_scale": 3,
    "translation_scale": 4,
    "rotation_translation": 3,
    "rotation_translation_scale": 5,
}

#: Parameters giving the identity transform in each family (RegAD's official initialisation).
IDENTITY_PARAMS = {
    "affine": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "translation": (0.0, 0.0),
    "rotation": (0.0,),
    "scale": (1.0, 1.0),
    "shear": (0.0, 0.0),
    "rotation_scale": (0.0, 1.0, 1.0),
    "translation_scale": (0.0, 0.0, 1.0, 1.0),
    "rotation_translation": (0.0, 0.0, 0.0),
    "rotation_translation_scale": (0.0, 0.0, 0.0, 1.0, 1.0),
}


def affine_warp(x: torch.Tensor, theta: torch.Tensor, padding_mode: str = "reflection") -> torch.Tensor:
    """Warp ``x`` ``(B, C, H, W)`` by affine matrices ``theta`` ``(B, 2, 3)`` in normalised
    coordinates (the spatial-transformer convention), bilinear; ``padding_mode`` as ``grid_sample``."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def affine_from_params(params: torch.Tensor, mode: str) -> torch.Tensor:
    """Build ``θ`` ``(B, 2, 3)`` from spatial-transformer parameters ``params`` ``(B, N_PARAMS[mode])``.

    RegAD's official parameterisation: angle ``a`` in radians, scales multiply only the diagonal
    (``rotation_scale``: ``[[sx cos a, -sin a, 0], [sin a, sy cos a, 0]]``), shear fills the
    off-diagonal. Built with ``torch.stack`` (no in-place writes), differentiable.
    """
    if params.shape[1] != N_PARAMS[mode]:
        raise ValueError(f"stn mode {mode!r} takes {N_PARAMS[mode]} parameters, got {params.shape[1]}")
    if mode == "affine":
        return params.view(-1, 2, 3)
    one, zero = torch.ones_like(params[:, 0]), torch.zeros_like(params[:, 0])
    a00, a01, a10, a11, tx, ty = one, zero, zero, one, zero, zero
    p = params.unbind(dim=1)
    if mode in ("rotation", "rotation_scale", "rotation_translation", "rotation_translation_scale"):
        cos, sin = torch.cos(p[0]), torch.sin(p[0])
        a00, a01, a10, a11 = cos, -sin, sin, cos
    if mode == "translation":
        tx, ty = p[0], p[1]
    elif mode == "scale":
        a00, a11 = p[0], p[1]
    elif mode == "shear":
        a01, a10 = p[0], p[1]
    elif mode == "rotation_scale":
        a00, a11 = a00 * p[1], a11 * p[2]
    elif mode == "translation_scale":
        tx, ty, a00, a11 = p
    elif mode == "rotation_translation":
        tx, ty = p[1], p[2]
    elif mode == "rotation_translation_scale":
        tx, ty, a00, a11 = p[1], p[2], a00 * p[3], a11 * p[4]
    return torch.stack([torch.stack([a00, a01, tx], dim=1), torch.stack([a10, a11, ty], dim=1)], dim=1)


def homogeneous(theta: torch.Tensor) -> torch.Tensor:
    """``(B, 2, 3)`` affine matrices -> ``(B, 3, 3)`` with last row ``[0, 0, 1]``."""
    last = torch.tensor([0.0, 0.0, 1.0], dtype=theta.dtype, device=theta.device).expand(theta.shape[0], 1, 3)
    return torch.cat([theta, last], dim=1)


def compose_affine(*thetas: torch.Tensor) -> torch.Tensor:
    """Product ``θ_1 θ_2 … θ_n`` of ``(B, 2, 3)`` matrices: warping by ``θ_1``, then the result by
    ``θ_2``, … samples the original at ``θ_1 θ_2 … θ_n p``."""
    out = homogeneous(thetas[0])
    for t in thetas[1:]:
        out = out @ homogeneous(t)
    return out[:, :2]


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """Inverse transforms ``(B, 2, 3)`` (computed in float64, returned in ``theta``'s dtype)."""
    return torch.linalg.inv(homogeneous(theta.double()))[:, :2].to(theta.dtype)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``(B, C, H, W)`` by ``angles`` ``(B,)`` in radians about the centre; bilinear, zero
    (black) fill like torchvision's ``RandomRotation``. Differentiable w.r.t. ``x``."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return affine_warp(x, theta.to(x), padding_mode="zeros")


def random_small_affine(
    n: int, generator: torch.Generator, angle: float = math.pi / 8, shift: float = 0.2
) -> torch.Tensor:
    """``n`` random rotations in [-angle, angle] (radians) and shifts in [-shift, shift] (normalised
    units, 0.2 = 10 % of the side), ``(n, 2, 3)``."""
    a = (torch.rand(n, generator=generator) * 2 - 1) * angle
    t = (torch.rand(n, 2, generator=generator) * 2 - 1) * shift
    return torch.stack([torch.stack([a.cos(), -a.sin(), t[:, 0]], 1), torch.stack([a.sin(), a.cos(), t[:, 1]], 1)], 1)
