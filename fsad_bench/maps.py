"""Anomaly-map operations shared by methods: feature pyramids, Gaussian smoothing, upsampling.

Maps are float tensors, higher = more anomalous. Shapes: feature maps ``(B, C, H, W)``,
anomaly maps ``(B, H, W)``; sizes and ``sigma`` in pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def concat_pyramid(maps: list[torch.Tensor], mode: str = "bilinear") -> torch.Tensor:
    """Upsample every map to the first one's grid and concatenate -> ``(B, ΣC, H1, W1)``.

    ``mode``: ``"bilinear"`` (``align_corners=False``) or ``"nearest"`` (each coarse cell
    repeated over the fine cells it covers: PaDiM's / RegAD's ``embedding_concat`` and
    anomalib's ``F.interpolate(mode="nearest")`` for integer size ratios).
    """
    size = maps[0].shape[-2:]
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return torch.cat([maps[0]] + [F.interpolate(m, size=size, mode=mode, **kw) for m in maps[1:]], dim=1)


def pyramid_samples(maps: list[torch.Tensor], mode: str = "bilinear", out: torch.Tensor | None = None,
                    offset: int = 0) -> torch.Tensor:
    """:func:`concat_pyramid` written straight into the layout the per-position Gaussian reads.

    ``maps``: feature maps ``(B, C_i, H_i, W_i)`` (any memory format; the first one's grid
    ``H1 x W1`` is the target); each map is upsampled with ``mode`` (``"bilinear"`` as
    :func:`concat_pyramid`, or ``"nearest"``, …; ``F.interpolate`` modes) and written once, as
    channels ``sum(C_<i) … sum(C_<=i)`` of samples ``offset … offset + B`` of the
    position-major buffer ``out`` ``(H1 W1, N, ΣC)`` (allocated with ``N = B`` when None).
    Returns ``out``. Equals ``concat_pyramid(maps).permute(2, 3, 0, 1).reshape(H1 W1, B, ΣC)``
    for ``mode="bilinear"``, without the concatenated copy and the permuted copy.
    """
    b, _, h, w = maps[0].shape
    total = sum(m.shape[1] for m in maps)
    if out is None:
        out = torch.empty(h * w, b, total, dtype=maps[0].dtype, device=maps[0].device)
    if out.shape[0] != h * w or out.shape[2] != total or offset + b > out.shape[1]:
        raise ValueError(f"buffer {tuple(out.shape)} cannot hold {b} samples at {offset} of a "
                         f"{h}x{w} grid with {total} channels")
    view = out.view(h, w, out.shape[1], total)[:, :, offset : offset + b]   # (H1, W1, B, ΣC)
    c0 = 0
    for i, m in enumerate(maps):
        if i and m.shape[-2:] != (h, w):
            kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
            m = F.interpolate(m, size=(h, w), mode=mode, **kw)
        view[..., c0 : c0 + m.shape[1]].copy_(m.permute(2, 3, 0, 1))
        c0 += m.shape[1]
    return out


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian taps with scipy.ndimage.gaussian_filter's support (radius 4σ)."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _pad_symmetric(y: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Pad ``r`` samples on both sides of ``dim`` by half-sample symmetric reflection (edge
    repeated: ``d c b a | a b c d | d c b a``, scipy.ndimage's ``"reflect"``)."""
    n = y.shape[dim]
    idx = torch.arange(-r, n + r, device=y.device) % (2 * n)
    idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
    return y.index_select(dim, idx)


def gaussian_blur(x: torch.Tensor, sigma: float, border: str = "reflect") -> torch.Tensor:
    """Blur every channel of ``(B, C, H, W)`` with a Gaussian of ``sigma`` px: separable (a row
    pass and a column pass) — torchvision's ``gaussian_blur`` with the same kernel, at
    2·(8σ+1) instead of (8σ+1)² multiply-adds per pixel.

    ``border``: ``"reflect"`` (``c b | a b c d | c b``, torch / kornia / anomalib, scipy's
    ``"mirror"``) or ``"symmetric"`` (edge repeated, scipy.ndimage.gaussian_filter's default
    ``"reflect"`` mode, used by RegAD's ``test.py``).
    """
    if border not in ("reflect", "symmetric"):
        raise ValueError(f"border must be 'reflect' or 'symmetric', got {border!r}")
    b, c, h, w = x.shape
    k = gaussian_kernel1d(sigma).to(x)
    r = len(k) // 2
    y = x.reshape(b * c, 1, h, w)
    if border == "reflect":
        y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    else:
        y = F.conv2d(_pad_symmetric(y, r, 3), k.view(1, 1, 1, -1))
        y = F.conv2d(_pad_symmetric(y, r, 2), k.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


def smooth_maps(maps: torch.Tensor, size: int, sigma: float, border: str = "reflect") -> torch.Tensor:
    """Upsample ``(B, h, w)`` maps to ``(B, size, size)`` (bilinear) and blur with a Gaussian of
    ``sigma`` px (:func:`gaussian_blur`, ``border`` as there)."""
    up = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return (gaussian_blur(up, sigma, border) if sigma > 0 else up)[:, 0]
