"""Anomaly-map operations shared by methods: feature pyramids, Gaussian smoothing, upsampling.

Maps are float tensors, higher = more anomalous. Shapes: feature maps ``(B, C, H, W)``,
anomaly maps ``(B, H, W)``; sizes and ``sigma`` in pixels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def concat_pyramid(maps: list[torch.Tensor], mode: str = "bilinear") -> torch.Tensor:
    """Upsample every map to the first one's grid and concatenate -> ``(B, ΣC, H1, W1)``.

    ``mode``: ``"bilinear"`` (``align_corners=False``) or ``"nearest"`` (each coarse cell
    repeated over the fine cells it covers: PaDiM's / RegAD's ``embedding_concat`` and
    anomalib's ``F.interpolate(mode="nearest")`` for integer size ratios).
    """
    size = tuple(maps[0].shape[-2:])
    return torch.cat([maps[0]] + [upsample(m, size, mode) for m in maps[1:]], dim=1)


def upsample(m: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``F.interpolate`` of ``(B, C, h, w)`` to ``size`` with ``mode`` (``align_corners=False`` for
    the modes that take it): how every feature pyramid brings a coarse map to the finest grid."""
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(m, size=size, mode=mode, **kw)


class ScratchBuffer:
    """One block of memory reused for tensors of any shape up to the largest asked for so far.

    A fresh ``torch.empty`` of a few hundred MB (a test batch's position-major samples) is
    mapped anew by the allocator on every call and its first write pays a page fault per
    page, which costs more than writing the features themselves; a predict loop asks for the
    same size every batch. :meth:`get` returns a contiguous tensor that is only valid until
    the next :meth:`get` (scoring consumes it within the call)."""

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        flat = self._flat
        if flat is None or flat.numel() < numel or flat.dtype != dtype or flat.device != torch.device(device):
            flat = self._flat = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)


def pyramid_samples(
    maps: list[torch.Tensor],
    mode: str = "bilinear",
    out: torch.Tensor | None = None,
    offset: int = 0,
    subtract: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`concat_pyramid` written straight into the layout the per-position Gaussian reads.

    ``maps``: feature maps ``(B, C_i, H_i, W_i)`` (any memory format; the first one's grid
    ``H1 x W1`` is the target); each map is upsampled with ``mode`` (``"bilinear"`` as
    :func:`concat_pyramid`, or ``"nearest"``, …; ``F.interpolate`` modes) and written once, as
    channels ``sum(C_<i) … sum(C_<=i)`` of samples ``offset … offset + B`` of the
    position-major buffer ``out`` ``(H1 W1, N, ΣC)`` (allocated with ``N = B`` when None).
    ``"nearest"`` at an integer ratio (each coarse cell repeated over an ``r x r`` block) is
    written from a broadcast view of the coarse map, without an upsampled copy. ``subtract``
    ``(H1 W1, ΣC)`` (a fitted mean): written minus it, in the same pass (centred samples).
    Returns ``out``. Equals ``concat_pyramid(maps).permute(2, 3, 0, 1).reshape(H1 W1, B, ΣC)``
    for ``mode="bilinear"``, without the concatenated copy and the permuted copy.
    """
    b, _, h, w = maps[0].shape
    total = sum(m.shape[1] for m in maps)
    if out is None:
        out = torch.empty(h * w, b, total, dtype=maps[0].dtype, device=maps[0].device)
    if out.shape[0] != h * w or out.shape[2] != total or offset + b > out.shape[1]:
        raise ValueError(
            f"buffer {tuple(out.shape)} cannot hold {b} samples at {offset} of a {h}x{w} grid with {total} channels"
        )
    if subtract is not None and tuple(subtract.shape) != (h * w, total):
        raise ValueError(f"subtract {tuple(subtract.shape)} does not match {h * w} positions x {total} channels")
    view = out.view(h, w, out.shape[1], total)[:, :, offset : offset + b]  # (H1, W1, B, ΣC)
    mean = subtract.view(h, w, 1, total) if subtract is not None else None
    c0 = 0
    for i, m in enumerate(maps):
        c1 = c0 + m.shape[1]
        hi, wi = m.shape[-2:]
        src = m.permute(2, 3, 0, 1)  # (Hi, Wi, B, Ci) view
        dst, mu = view[..., c0:c1], mean[..., c0:c1] if mean is not None else None
        if i and (hi, wi) != (h, w):
            if mode == "nearest" and h % hi == 0 and w % wi == 0:  # block repetition
                rh, rw = h // hi, w // wi
                src = src[:, None, :, None].expand(hi, rh, wi, rw, b, c1 - c0)
                dst = dst.view(hi, rh, wi, rw, b, c1 - c0)
                mu = mu.view(hi, rh, wi, rw, 1, c1 - c0) if mu is not None else None
            else:
                src = upsample(m, (h, w), mode).permute(2, 3, 0, 1)
        if mu is None:
            dst.copy_(src)
        else:
            torch.sub(src, mu, out=dst)
        c0 = c1
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


def _reflect_index(i: torch.Tensor, n: int, border: str) -> torch.Tensor:
    """Fold indices outside ``0 .. n-1`` back in: ``"reflect"`` (edge not repeated) or
    ``"symmetric"`` (edge repeated), as :func:`gaussian_blur` pads."""
    if border == "reflect":
        period = max(2 * n - 2, 1)
        i = i % period
        return torch.where(i >= n, period - i, i)
    i = i % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


@functools.lru_cache(maxsize=32)
def smoothing_matrix(n: int, size: int, sigma: float, border: str = "reflect") -> torch.Tensor:
    """The linear operator of :func:`smooth_maps` along one axis, float64 ``(size, n)``: bilinear
    upsampling ``n -> size`` (``align_corners=False``) followed by the Gaussian blur with
    ``border`` padding. ``A @ M @ Aᵀ`` upsamples and blurs an ``(n, n)`` map ``M``."""
    up = F.interpolate(torch.eye(n, dtype=torch.float64)[:, None], size=size, mode="linear", align_corners=False)[
        :, 0
    ].T  # (size, n)
    if sigma <= 0:
        return up
    k = gaussian_kernel1d(sigma).double()
    r = len(k) // 2
    rows = torch.arange(size)[:, None] + torch.arange(-r, r + 1)[None, :]  # (size, taps)
    blur = torch.zeros(size, size, dtype=torch.float64)
    blur.scatter_add_(1, _reflect_index(rows, size, border), k.expand(size, -1).contiguous())
    return blur @ up


def smooth_maps(maps: torch.Tensor, size: int, sigma: float, border: str = "reflect") -> torch.Tensor:
    """Upsample ``(B, h, w)`` maps to ``(B, size, size)`` (bilinear) and blur with a Gaussian of
    ``sigma`` px (:func:`gaussian_blur`, ``border`` as there), as two small matrix products
    ``A_h M A_wᵀ`` with the composed per-axis operators of :func:`smoothing_matrix` (the
    upsample-then-convolve result to float32 round-off, at ``size · h · (h + size)`` multiply-adds
    per map instead of an upsampled image and two convolution passes)."""
    if border not in ("reflect", "symmetric"):
        raise ValueError(f"border must be 'reflect' or 'symmetric', got {border!r}")
    _, h, w = maps.shape
    a_h = smoothing_matrix(h, size, float(sigma), border).to(maps)
    a_w = a_h if w == h else smoothing_matrix(w, size, float(sigma), border).to(maps)
    return torch.matmul(torch.matmul(a_h, maps), a_w.T)
