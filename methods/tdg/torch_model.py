"""TDG's torch model: image transformations, OpenCV-style CLAHE, the patch generator and
discriminator of one scale, pyramid sizes and :class:`TDGHierarchy` (the per-scale nets, the
generator chains and the scoring). Pure torch; training lives in :mod:`.training`."""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TRANSLATION_RATIO = 0.15  # official augments_transform_color.translation
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # kornia.rgb_to_grayscale


# ----------------------------------------------------------------------------------------
# Transformations
# ----------------------------------------------------------------------------------------
def _symmetric_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices folded into [0, n) by symmetric reflection (edge pixel repeated)."""
    period = 2 * n
    idx = idx % period
    return torch.where(idx >= n, period - 1 - idx, idx)


def shift(x: torch.Tensor, dx: int, dy: int, fill: float | None = None) -> torch.Tensor:
    """Translate ``(..., H, W)`` by ``dx`` px right and ``dy`` px down.

    ``fill=None``: uncovered pixels are taken by symmetric reflection (official padding);
    otherwise they are set to ``fill`` (used to map score maps back, e.g. NaN = no vote).
    """
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device) - dy
    cols = torch.arange(w, device=x.device) - dx
    out = x.index_select(-2, _symmetric_index(rows, h)).index_select(-1, _symmetric_index(cols, w))
    if fill is not None:
        bad_r = (rows < 0) | (rows >= h)
        bad_c = (cols < 0) | (cols >= w)
        out = out.masked_fill(bad_r[:, None] | bad_c[None, :], fill)
    return out


@dataclass(frozen=True)
class Transformation:
    """One of TDG's image transformations: ``flip`` -> translate (``tx``, ``ty`` in
    {-1, 0, 1} x 15 % of the side) -> rotate by ``rot`` x 90 deg -> grayscale if ``gray``."""

    gray: bool
    flip: bool
    tx: int
    ty: int
    rot: int

    def offsets(self, size: int) -> tuple[int, int]:
        """Translation in px for an image of side ``size``."""
        s = int(size * TRANSLATION_RATIO)
        return self.tx * s, self.ty * s

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> transformed ``(B, 3, H, W)`` (square images)."""
        if self.flip:
            x = x.flip(-1)
        if self.tx or self.ty:
            x = shift(x, *self.offsets(x.shape[-1]))
        if self.rot:
            x = torch.rot90(x, self.rot, dims=(-2, -1))
        if self.gray:
            w = x.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True).expand_as(x).contiguous()
        return x

    def invert(self, y: torch.Tensor, size: int | None = None, fill: float | None = None) -> torch.Tensor:
        """Undo the geometric part on ``(..., H, W)`` (grayscale is not invertible).

        ``size``: side of the image the translation was computed for (default: ``H``);
        the map of a patch discriminator (a centred crop of the image grid) is inverted
        with the image's ``size``. ``fill``: value for positions with no source (see :func:`shift`).
        """
        size = y.shape[-1] if size is None else size
        if self.rot:
            y = torch.rot90(y, -self.rot, dims=(-2, -1))
        if self.tx or self.ty:
            dx, dy = self.offsets(size)
            y = shift(y, -dx, -dy, fill=fill)
        if self.flip:
            y = y.flip(-1)
        return y


def official_transformations() -> list[Transformation]:
    """The official 54 RGB transformations (``mvtec_loader.py``'s six product groups)."""
    groups = [
        itertools.product((0,), (False, True), (-1, 1, 0), (-1,), (0,)),
        itertools.product((0,), (False, True), (0, 1), (0, 1), (0, 1, 2, 3)),
        itertools.product((1,), (False, True), (0,), (0,), (0, 1, 2, 3)),
        itertools.product((0,), (False, True), (-1,), (1, 0), (0,)),
        itertools.product((1,), (False,), (1, -1), (0,), (0,)),
        itertools.product((1,), (False,), (0,), (1, -1), (0,)),
    ]
    return [Transformation(bool(c), f, tx, ty, r) for c, f, tx, ty, r in itertools.chain(*groups)]


def dihedral_transformations() -> list[Transformation]:
    """The 8 flips x 90-degree rotations of the official set (rgb, no translation)."""
    return [Transformation(False, f, 0, 0, r) for f in (False, True) for r in range(4)]


TRANSFORMATION_SETS = {"official54": official_transformations, "dihedral8": dihedral_transformations}


@functools.lru_cache(maxsize=64)
def _gather_plan(transforms: tuple[Transformation, ...], size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Source pixel ``(T, 1, 1, size²)`` and source channel ``(T, 1, 3, 1)`` of every output value of
    :func:`apply_all` on a ``(B, 4, size, size)`` stack (RGB + grey): the geometric part of each
    transformation applied once to an index image, grey transformations reading channel 3."""
    pix = torch.arange(size * size, device=device).view(1, 1, size, size)
    index = torch.stack(
        [
            t.apply(pix) if not t.gray else Transformation(False, t.flip, t.tx, t.ty, t.rot).apply(pix)
            for t in transforms
        ]
    ).view(len(transforms), 1, 1, size * size)
    chans = torch.tensor([[3, 3, 3] if t.gray else [0, 1, 2] for t in transforms], device=device)
    return index, chans.view(len(transforms), 1, 3, 1)


def apply_all(transforms: list[Transformation], x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(T * B, 3, H, W)``, transformation-major (square images).

    Without a gradient: one gather from the image and its grey channel (the same values as
    ``torch.cat([t.apply(x) for t in transforms])``, bit for bit). With one (the G step), the loop: the
    gather's gradient sums the T branches in another order, and Adam turns that round-off into different
    weights."""
    b, _, h, w = x.shape
    if h != w or not transforms or (x.requires_grad and torch.is_grad_enabled()):
        return torch.cat([t.apply(x) for t in transforms])
    index, chans = _gather_plan(tuple(transforms), h, str(x.device))
    grey = (x * x.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True)
    src = torch.cat([x, grey], 1).flatten(2)  # (B, 4, H·W)
    rows = torch.arange(b, device=x.device).view(1, b, 1, 1)
    return src[rows, chans, index].view(len(transforms) * b, 3, h, w)


# ----------------------------------------------------------------------------------------
# CLAHE (OpenCV's algorithm for 8-bit images, re-implemented)
# ----------------------------------------------------------------------------------------
def clahe_uint8(v: torch.Tensor, clip_limit: float = 2.0, tiles: int = 8) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation of one 8-bit channel ``(H, W)``
    (integer tensor, 0..255) -> ``(H, W)`` int64, as ``cv2.createCLAHE(clip_limit, (tiles, tiles))``."""
    h, w = v.shape
    v = v.long()
    ext = v
    if h % tiles or w % tiles:  # OpenCV pads bottom/right with BORDER_REFLECT_101 (= torch "reflect")
        pad_h, pad_w = (tiles - h % tiles) % tiles, (tiles - w % tiles) % tiles
        ext = F.pad(v[None, None].double(), (0, pad_w, 0, pad_h), mode="reflect")[0, 0].long()
    th, tw = ext.shape[0] // tiles, ext.shape[1] // tiles
    area = th * tw
    blocks = ext.view(tiles, th, tiles, tw).permute(0, 2, 1, 3).reshape(tiles * tiles, area)
    hist = torch.zeros(tiles * tiles, 256, dtype=torch.long).scatter_add_(1, blocks, torch.ones_like(blocks))
    if clip_limit > 0:
        limit = max(int(clip_limit * area / 256), 1)
        excess = (hist - limit).clamp_min(0).sum(1, keepdim=True)
        hist = hist.clamp_max(limit) + excess // 256
        residual = excess % 256  # one more count at bins 0, step, 2·step, … (residual of them)
        step = (256 // residual.clamp_min(1)).clamp_min(1)
        bins = torch.arange(256)
        hist = hist + ((bins % step == 0) & (bins // step < residual)).long()
    scale = torch.tensor(255.0, dtype=torch.float32) / area
    lut = (hist.cumsum(1).float() * scale).round().clamp(0, 255).view(tiles, tiles, 256)

    def axis(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        f = torch.arange(n, dtype=torch.float32) * (torch.tensor(1.0, dtype=torch.float32) / size) - 0.5
        i1 = torch.floor(f)
        a = f - i1
        i1 = i1.long()
        return i1.clamp_min(0), (i1 + 1).clamp_max(tiles - 1), a, 1.0 - a

    y1, y2, ya, ya1 = axis(h, th)
    x1, x2, xa, xa1 = axis(w, tw)
    y1, y2, ya, ya1 = y1[:, None], y2[:, None], ya[:, None], ya1[:, None]
    res = (lut[y1, x1, v] * xa1 + lut[y1, x2, v] * xa) * ya1 + (lut[y2, x1, v] * xa1 + lut[y2, x2, v] * xa) * ya
    return res.round().clamp(0, 255).long()


def clahe_rgb(images: torch.Tensor, clip_limit: float = 2.0, tiles: int = 8) -> torch.Tensor:
    """TDG's training-image equalisation: ``(B, 3, H, W)`` in [0, 1] -> same, 8-bit values.

    The image is quantised to 8 bits, ``V = max(R, G, B)`` equalised by :func:`clahe_uint8`,
    and R, G, B scaled by ``V' / V`` (hue and saturation kept; black pixels become grey ``V'``).
    """
    u = (images.detach().cpu().double() * 255).round().clamp(0, 255)
    out = torch.empty_like(u)
    for i, img in enumerate(u):
        v = img.amax(0)
        v_new = clahe_uint8(v.long(), clip_limit, tiles).double()
        ratio = torch.where(v > 0, v_new / v.clamp_min(1), torch.zeros_like(v))
        rgb = torch.where(v > 0, img * ratio, v_new.expand_as(img))
        out[i] = rgb.round().clamp(0, 255)
    return (out / 255).to(images.dtype).to(images.device)


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------
class ConvBlock(nn.Sequential):
    """3x3 conv (no padding) + BatchNorm + LeakyReLU(0.2)."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__(nn.Conv2d(cin, cout, kernel), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))


def _widths(width: int, min_width: int, layers: int) -> list[int]:
    """Channel widths of the ``layers - 1`` conv blocks (SinGAN: halving, floored at ``min_width``)."""
    return [width] + [max(int(width / 2 ** (i + 1)), min_width) for i in range(layers - 2)]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class PatchDiscriminator(nn.Module):
    """Patch classifier: ``(B, 3, H, W)`` in [-1, 1] -> logits ``(B, T + 1, H - 2m, W - 2m)``,
    ``m = layers * (kernel - 1) / 2`` (5 px officially); class ``T`` = "fake"."""

    def __init__(self, num_transforms: int, width: int, min_width: int, layers: int = 5, kernel: int = 3):
        super().__init__()
        w = _widths(width, min_width, layers)
        self.features = nn.Sequential(*[ConvBlock(cin, cout, kernel) for cin, cout in zip([3] + w[:-1], w)])
        self.classifier = nn.Conv2d(w[-1], num_transforms + 1, kernel)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PatchGenerator(nn.Module):
    """Residual generator of one scale.

    ``forward(noisy, prev, image_id)``: ``noisy`` = amp * z + prev, ``(B, 3, H, W)``;
    ``prev`` = the upsampled coarser output (zeros at the coarsest scale); ``image_id``
    ``(B,)`` the training-image index, fed as a constant channel. Returns ``prev + G(..)``,
    ``(B, 3, H, W)`` (input zero-padded by the receptive-field margin, as officially).
    """

    def __init__(self, width: int, min_width: int, layers: int = 5, kernel: int = 3):
        super().__init__()
        w = _widths(width, min_width, layers)
        self.margin = layers * (kernel - 1) // 2
        self.features = nn.Sequential(*[ConvBlock(cin, cout, kernel) for cin, cout in zip([4] + w[:-1], w)])
        self.to_rgb = nn.Sequential(nn.Conv2d(w[-1], 3, kernel), nn.Tanh())
        self.apply(_init_weights)

    def forward(self, noisy: torch.Tensor, prev: torch.Tensor, image_id: torch.Tensor) -> torch.Tensor:
        x = F.pad(noisy, [self.margin] * 4)
        ids = image_id.to(x).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])
        return prev + self.to_rgb(self.features(torch.cat([x, ids], 1)))


# ----------------------------------------------------------------------------------------
# The hierarchy
# ----------------------------------------------------------------------------------------
PYRAMID_SIDES = ("official", "exact")


def _stop_scale(image_size: int, min_size: int, max_size: int, scale_factor: float) -> int:
    """Index of the finest scale (official ``adjust_scales2image``: ``num_scales`` minus the scales above
    ``max_size``)."""
    num_scales = math.ceil(math.log(min_size / image_size, scale_factor)) + 1
    return num_scales - math.ceil(math.log(min(max_size, image_size) / image_size, scale_factor))


def pyramid_sizes(
    image_size: int, min_size: int, max_size: int, scale_factor: float, sides: str = "official"
) -> list[int]:
    """Image side per scale (px), coarsest first (official ``functions.adjust_scales2image`` and
    ``creat_reals_pyramid``).

    ``sides="official"``: as SinGAN's ``imresize`` sizes them, ``ceil(top · f^(stop - i))`` in float64,
    ``f = (min_size / top)^(1 / stop)``, ``top = ceil(image_size · min(max_size / image_size, 1))``; the
    round-off of ``f^stop`` lifts an exact ``min_size`` to ``min_size + 1``: 128 px input, min 25, max 64,
    factor 0.75 -> [26, 32, 41, 51, 64]. ``sides="exact"`` (before the parity check): the same sides with
    that round-off removed (``ceil(x - 1e-6)``, ``top`` rounded): [25, 32, 40, 51, 64].
    """
    stop_scale = _stop_scale(image_size, min_size, max_size, scale_factor)
    scale1 = min(max_size / image_size, 1.0)
    top = math.ceil(image_size * scale1) if sides == "official" else round(image_size * scale1)
    if stop_scale <= 0 or min_size >= top:
        return [top]
    if sides == "official":
        factor = official_scale_factor(image_size, min_size, max_size, scale_factor)
        return [math.ceil(top * math.pow(factor, stop_scale - i)) for i in range(stop_scale + 1)]
    factor = (min_size / top) ** (1.0 / stop_scale)
    return [math.ceil(top * factor ** (stop_scale - i) - 1e-6) for i in range(stop_scale + 1)]


def official_scale_factor(image_size: int, min_size: int, max_size: int, scale_factor: float) -> float:
    """The factor between scales that the official code recomputes (``adjust_scales2image``):
    ``(min_size / top)^(1 / stop_scale)`` in float64 (1.0 for a single scale)."""
    stop_scale = _stop_scale(image_size, min_size, max_size, scale_factor)
    top = math.ceil(image_size * min(max_size / image_size, 1.0))
    if stop_scale <= 0 or min_size >= top:
        return 1.0
    return math.pow(min_size / top, 1 / stop_scale)


PYRAMID_RESIZES = ("official", "bicubic")


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic kernel (a = -0.5), Matlab's ``imresize`` ``"cubic"``."""
    a = x.abs()
    return (1.5 * a**3 - 2.5 * a**2 + 1) * (a <= 1) + (-0.5 * a**3 + 2.5 * a**2 - 4 * a + 2) * ((a > 1) & (a <= 2))


@functools.lru_cache(maxsize=64)
def _matlab_matrix(in_len: int, out_len: int, scale: float) -> torch.Tensor:
    """Dense ``(out_len, in_len)`` float64 resampling matrix of a Matlab-style bicubic resize along one axis.

    Output pixel ``p`` (1-based) reads input position ``p / scale + (1 - 1 / scale) / 2``; when downscaling the
    kernel is stretched by ``1 / scale`` (antialiasing). The taps past the far border are mirrored; taps before
    the near border get weight 0 and the rest are renormalised: what SinGAN's ``imresize`` (used by the official
    TDG code) computes on x86, where numpy casts a negative float tap index to a huge unsigned one.
    """
    antialias = scale < 1
    width = 4.0 / scale if antialias else 4.0
    match = torch.arange(1, out_len + 1, dtype=torch.float64) / scale + 0.5 * (1 - 1.0 / scale)
    left = torch.floor(match - width / 2)
    taps = left[:, None] + torch.arange(math.ceil(width) + 2, dtype=torch.float64) - 1  # (out, taps)
    dist = match[:, None] - taps - 1
    w = scale * _cubic(scale * dist) if antialias else _cubic(dist)
    w = w.masked_fill(taps < 0, 0.0)
    total = w.sum(1, keepdim=True)
    w = w / torch.where(total == 0, torch.ones_like(total), total)
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])
    idx = mirror[taps.clamp_min(0).long() % (2 * in_len)]
    return torch.zeros(out_len, in_len, dtype=torch.float64).scatter_add_(1, idx, w)


def matlab_resize(x: torch.Tensor, scale: float, size: int | None = None) -> torch.Tensor:
    """SinGAN's ``imresize`` (the official TDG pyramid and generator-chain resize), re-implemented in torch.

    ``x`` ``(B, C, H, W)`` in [-1, 1] -> ``(B, C, h, w)`` in [-1, 1], ``h = ceil(H · scale)`` (in float64), cropped to
    ``size`` (top-left, as the official chain crops) when given. As officially: the image is first truncated to
    8 bits (``uint8(255 · (x + 1) / 2)`` in ``x``'s dtype), resized with the bicubic kernel in float64 (rows, then
    columns; antialiased when ``scale < 1``; identity when ``scale == 1``), divided by 255, rounded to float32 and
    mapped back to [-1, 1] (clamped); returned in ``x``'s dtype. No gradient flows through it (8-bit truncation).
    """
    q = torch.floor(255 * ((x.detach() + 1) / 2).clamp(0, 1)).to(torch.float64)
    if scale != 1.0:
        h, w = x.shape[-2:]
        oh, ow = math.ceil(h * scale), math.ceil(w * scale)
        mh = _matlab_matrix(h, oh, scale).to(q.device)
        mw = _matlab_matrix(w, ow, scale).to(q.device)
        q = torch.einsum("oh,bchw->bcow", mh, q)
        q = torch.einsum("bcow,pw->bcop", q, mw)
    if size is not None:
        q = q[..., :size, :size]
    out = ((q / 255).to(torch.float32) - 0.5) * 2
    return out.clamp(-1, 1).to(x.dtype)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=x.shape[-1] > size)


@functools.lru_cache(maxsize=64)
def _inverse_plan(transforms: tuple[Transformation, ...], side: int, size: int, device: str) -> torch.Tensor:
    """Source position ``(T, 1, side²)`` of every position of :meth:`Transformation.invert` on a
    ``(side, side)`` map of an image of ``size`` px; -1 where the position has no source."""
    pos = torch.arange(side * side, device=device).view(side, side)
    return torch.stack([t.invert(pos, size=size, fill=-1) for t in transforms]).view(len(transforms), 1, side * side)


def _invert_all(transforms: list[Transformation], maps: torch.Tensor, size: int) -> torch.Tensor:
    """``maps`` ``(T, b, h, h)``, map ``i`` of transformation ``i`` -> each mapped back by
    ``transforms[i].invert(size=size, fill=nan)``, ``(T, b, h, h)``, in one gather (bit-identical)."""
    T, b, h, w = maps.shape
    src = _inverse_plan(tuple(transforms), h, size, str(maps.device)).expand(T, b, h * w)
    out = maps.flatten(2).gather(2, src.clamp_min(0))
    return out.masked_fill(src < 0, float("nan")).view(T, b, h, w)


class TDGHierarchy(nn.Module):
    """Per-scale patch generators and discriminators, coarsest scale first.

    ``sizes``: image side per scale (:func:`pyramid_sizes`); ``transforms``: the T classes of
    every discriminator; ``width`` / ``min_width``: channels of the first / narrowest conv block
    at the coarsest scale (doubled every 4 scales, at most 128, as officially); ``num_layer``:
    conv layers per net. Images enter in [0, 1] ``(B, 3, S, S)`` and are resized to the pyramid
    (in [-1, 1]). Trained by :class:`~fsad_bench.methods.tdg.training.HierarchyTrainer`.
    """

    def __init__(
        self,
        sizes: list[int],
        transforms: list[Transformation],
        width: int,
        min_width: int,
        num_layer: int = 5,
        resize: str = "bicubic",
        factor: float | None = None,
    ):
        super().__init__()
        if resize not in PYRAMID_RESIZES:
            raise ValueError(f"resize must be one of {PYRAMID_RESIZES}, got {resize!r}")
        if resize == "official" and factor is None:
            raise ValueError("resize='official' needs the official scale factor (official_scale_factor)")
        self.sizes = sizes
        #: ``"official"``: :func:`matlab_resize` (8-bit, Matlab-style bicubic) for the pyramid and the chains'
        #: upsampling, as the official code; ``"bicubic"``: ``F.interpolate`` bicubic (antialiased) in float
        self.resize = resize
        self.factor = factor
        self.transforms = transforms
        T = len(transforms)
        widths = [min(width * 2 ** (n // 4), 128) for n in range(len(sizes))]
        min_widths = [min(min_width * 2 ** (n // 4), 128) for n in range(len(sizes))]
        self.widths = widths
        self.generators = nn.ModuleList(PatchGenerator(w, mw, num_layer) for w, mw in zip(widths, min_widths))
        self.discriminators = nn.ModuleList(
            PatchDiscriminator(T, w, mw, num_layer) for w, mw in zip(widths, min_widths)
        )
        #: fixed reconstruction noise per scale ``(1, 3, s, s)`` and noise amplitudes ``(N, scales)``,
        #: set by the training (training state only; scoring needs the discriminators)
        self.z_rec: list[torch.Tensor] = []
        self.amps = torch.ones(0, len(sizes))

    # -- pyramid / noise -----------------------------------------------------------------
    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, S, S)`` in [0, 1] -> list of ``(B, 3, s_n, s_n)`` in [-1, 1], coarsest first."""
        x = (images * 2 - 1).clamp(-1, 1)
        if self.resize == "official":  # functions.adjust_scales2image + creat_reals_pyramid
            top = matlab_resize(x, min(self.sizes[-1] / x.shape[-1], 1.0))
            stop = len(self.sizes) - 1
            return [matlab_resize(top, math.pow(self.factor, stop - i)) for i in range(stop + 1)]
        return [_resize(x, s).clamp(-1, 1) for s in self.sizes]

    @staticmethod
    def noise(b: int, n: int, size: int, gen: torch.Generator, device) -> torch.Tensor:
        """Gaussian noise ``(b, 3, size, size)``; single-channel (grey) at the coarsest scale ``n = 0``."""
        ch = 1 if n == 0 else 3
        z = torch.randn(b, ch, size, size, generator=gen).to(device)
        return z.expand(b, 3, size, size)

    def up(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``(B, 3, s_n, s_n)`` -> ``(B, 3, s_{n+1}, s_{n+1})``: official ``draw_concat``'s
        ``imresize(x, 1 / factor)`` cropped to the next side, or bicubic ``F.interpolate``."""
        if self.resize == "official":
            return matlab_resize(x, 1 / self.factor, self.sizes[n + 1])
        return _resize(x, self.sizes[n + 1])

    @torch.no_grad()
    def sample_prev(self, n: int, ids: torch.Tensor, amps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random sample of scales ``< n`` upsampled to scale ``n`` (zeros for n = 0), ``(B, 3, s_n, s_n)``;
        ``ids`` ``(B,)`` image indices, ``amps`` ``(B, scales)`` noise amplitudes."""
        b, dev = len(ids), amps.device
        x = torch.zeros(b, 3, self.sizes[0], self.sizes[0], device=dev)
        for s in range(n):
            z = self.noise(b, s, self.sizes[s], gen, dev)
            x = self.up(self.generators[s](amps[:, s].view(-1, 1, 1, 1) * z + x, x, ids), s)
        return x

    @torch.no_grad()
    def reconstruct_prev(self, n: int, ids: torch.Tensor, amps: torch.Tensor) -> torch.Tensor:
        """Reconstruction chain from the fixed noise maps :attr:`z_rec`, up to scale ``n``, ``(B, 3, s_n, s_n)``."""
        b, dev = len(ids), amps.device
        x = torch.zeros(b, 3, self.sizes[0], self.sizes[0], device=dev)
        for s in range(n):
            z = self.z_rec[s].to(dev).expand(b, 3, -1, -1)
            x = self.up(self.generators[s](amps[:, s].view(-1, 1, 1, 1) * z + x, x, ids), s)
        return x

    # -- scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, images: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly scores ``(B,)`` and maps ``(B, S, S)`` for ``images`` ``(B, 3, S, S)`` in [0, 1].

        Per scale: p(correct transformation) per patch for every transformation;
        normality = mean over transformations of the mean of the lowest ``fraction`` of
        patches; score = 1 - mean over scales. Map: 1 - p(correct), mapped back through
        each inverse transformation, averaged (transformations with a vote there), padded
        to the scale's grid and upsampled; averaged over scales.
        """
        dev = next(self.parameters()).device
        out_size = images.shape[-1]
        b, T = len(images), len(self.transforms)
        normality, maps = [], []
        for n, real in enumerate(self.pyramid(images.to(dev))):
            D = self.discriminators[n].eval()
            logits = D(apply_all(self.transforms, real))[:, :T]  # (T*b, T, h, w)
            probs = logits.softmax(1).view(T, b, T, *logits.shape[-2:])
            correct = probs.diagonal(dim1=0, dim2=2).permute(3, 0, 1, 2).contiguous()  # (T, b, h, w)
            flat = correct.flatten(2).sort(dim=2).values
            k = max(1, int(flat.shape[2] * fraction))
            normality.append(flat[:, :, :k].mean(2).mean(0))
            back = _invert_all(self.transforms, 1 - correct, real.shape[-1])
            m = back.nanmean(0)
            m = torch.where(torch.isnan(m), torch.nanmean(m), m)
            margin = (real.shape[-1] - m.shape[-1]) // 2
            m = F.pad(m[:, None], [margin] * 4, mode="replicate")
            maps.append(F.interpolate(m, size=(out_size, out_size), mode="bilinear", align_corners=False)[:, 0])
        scores = 1 - torch.stack(normality).mean(0)
        return scores.cpu(), torch.stack(maps).mean(0).cpu()

    @torch.no_grad()
    def transformation_accuracy(self, images: torch.Tensor, n: int) -> float:
        """Patch accuracy of ``D_n``'s transformation head on ``images`` (argmax over the T classes)."""
        dev = next(self.parameters()).device
        T = len(self.transforms)
        real = self.pyramid(images.to(dev))[n]
        logits = self.discriminators[n].eval()(apply_all(self.transforms, real))[:, :T]
        labels = torch.arange(T, device=dev).repeat_interleave(len(real))
        return (logits.argmax(1) == labels.view(-1, 1, 1)).float().mean().item()
