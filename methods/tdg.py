"""``tdg`` / ``tdg+``: hierarchical transformation-discriminating generative model (Sheynin et al., ICCV 2021).

A SinGAN-like pyramid of small fully-convolutional patch generators ``G_n`` and patch
discriminators ``D_n`` is trained coarse-to-fine on the few normal images. Every ``D_n``
has ``T + 1`` output classes per patch: which of the ``T`` image transformations was applied
to the (real) image the patch comes from, or "fake" (class ``T``). The anomaly score of a
test image is the lack of patch votes for the correct transformation, aggregated over
transformations, patches and scales.

Facts from the official code (github.com/shellysheynin/A-Hierarchical-Transformation-
Discriminating-Generative-Model-for-Few-Shot-Anomaly-Detection), re-implemented here:

* ``config_few_shot.py``: kernel 3, padding 0, 5 conv layers per net, nfc = min_nfc = 32
  (doubled every 4 scales, ``training_parallel.train``), scale_factor 0.75, min_size 25,
  max_size 64, lr_g = lr_d = 5e-4, Adam betas (0.5, 0.999), Dsteps = Gsteps = 3,
  reconstruction weight alpha = 100, noise_amp 0.1 (times the RMSE of the coarser
  reconstruction, per image), MultiStepLR gamma 0.1 at 500 (D) / 1000 (G) iterations;
  ``main_train.py``: 1000 iterations per scale for RGB data (MVTec), size_image 128, so the
  pyramid is 25 -> 64 px in 5 scales (``functions.adjust_scales2image``).
* ``models.py``: ConvBlock = conv + BatchNorm + LeakyReLU(0.2); ``WDiscriminatorMulti``
  ends in a conv to ``num_transforms + 1`` logits per patch; the generator takes the
  noisy image plus one channel holding the training-image index and adds its output to
  the upsampled coarser image (residual, tanh); weights N(0, 0.02), BN weight N(1, 0.02).
* ``training_parallel.train_single_scale``: the losses are cross-entropies, not WGAN-GP:
  D learns real transformed patches -> their transformation, all transformations of fakes
  -> "fake"; G learns to make D recognise the transformations of its fakes, plus
  alpha * MSE reconstruction of each image from a fixed noise map (shared by all images,
  told apart by the index channel). A scale starts from the previous scale's weights
  when the widths match.
* ``Dataloaders/mvtec_loader.py`` + ``augments_transform_color.py``: 54 transformations
  (colour rgb/gray x horizontal flip x translation by +-15 % of the side with reflection
  padding x rotation by k * 90 deg, in 6 product groups), applied flip -> translate ->
  rotate -> colour. Images are scaled to [-1, 1].
* ``mvtec_loader.download_class_mvtec.imsave``: every *training* image is written as 8-bit,
  converted to HSV, its V channel equalised by OpenCV CLAHE (``clipLimit=2.0``,
  ``tileGridSize=(8, 8)``), converted back (test images are not equalised). Reproduced by
  :func:`clahe_rgb` (``clahe = True``, both presets; ``False`` switches it off, labelled
  ``clahe=off``): OpenCV's 8-bit CLAHE algorithm re-implemented in torch (per-tile 256-bin
  histograms, clip limit ``max(int(2.0 · tile area / 256), 1)``, excess redistributed evenly
  plus a strided residual, LUT ``round(cdf · 255 / area)``, bilinear LUT interpolation between
  tile centres, bottom/right ``BORDER_REFLECT_101`` padding when the size is not a multiple of
  8); with H and S fixed, a new V scales R, G and B by ``V'/V`` — applied exactly, without the
  official 8-bit H/S round trip (black pixels become grey ``V'``, as in HSV). Applied to the
  images each model trains on: TDG's support images, TDG+'s pre-training pool and support.
* ``training_parallel.pad_image_id``: the generator's extra input channel holds the training
  image's index ``0 … k-1`` (the k few-shot images are trained together).
* ``defect_detection_evaluation.py``: per scale, softmax over the T transformation logits
  (fake logit dropped), the probability of the correct transformation per patch, the mean
  of its lowest ``fraction_defect`` = 10 % of patches, summed over transformations; the
  image's normality is the mean over scales (higher = more normal). We report
  ``1 - mean`` (transformations, scales) of that quantity, a monotone transform of the
  official unnormalised score. The official per-scale min-max normalisation over the
  whole test set is not used (``predict`` sees batches).

Deviations (ours): bicubic ``F.interpolate`` instead of SinGAN's Matlab-style ``imresize``;
integer shifts with symmetric padding (what kornia's reflection warp does for integer
shifts) and ``torch.rot90`` (exact); CLAHE at the suite's image size (official: at 128 px,
the same 8 x 8 tile grid); the anomaly map (not in
the official code) is ``1 - p(correct transformation)`` per patch, mapped back through the
inverse transformation, averaged over transformations and scales and upsampled.

``tdg+`` (RegAD's aggregated variant of TDG, Huang et al., ECCV 2022, which gives no
training details): the same hierarchy is pre-trained on images of all other categories
(our choice: minibatches of 10 images per iteration drawn from the pool, each image with
its own index channel and noise amplitude), then ``adapt`` copies the pre-trained nets and
trains them further on the support set, scale by scale (``paper``: the full 1000
iterations per scale again). Index channel in pre-training (``pretrain_index``): the
official code only ever sees ``0 … k-1`` (k ≤ a few images); a raw pool index would reach
≈ 3,400 on MVTec and swamp the [-1, 1] image channels. ``"scaled"`` (default) keeps one
distinct value per pool image but maps pool index ``i`` of ``N`` to ``i · (B - 1) / (N - 1)``
with ``B = pretrain_batch``, i.e. into the official range of a B-image training set
(0 … 9 in ``paper``); ``"raw"`` (option, labelled ``index=raw``) feeds ``i``. The support
stage always uses ``0 … k-1`` as the official code.

Presets: ``paper`` = the official configuration above (GPU hours). ``cpu`` = the official
losses, learning rates, betas and alpha, but a reduced internal resolution (pyramid
16 -> 23 -> 32 px, 3 scales, for inputs of 64 px and more), width 16, the 8 rotation/flip
transformations of the official set (4 drawn per iteration), 40 iterations per scale with
1 D and 1 G step on 2 support images per iteration; ``tdg+`` pre-trains 100 iterations per
scale on batches of 4 images (20 per other category) and adapts 20 iterations per scale.
Measured on the synthetic demo at 128 px (2 shared cores): ~4-6 s per ``tdg`` cell
(fit + adapt), ~21-24 s per ``tdg+`` pre-training and ~3 s per ``tdg+`` adaptation.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsad_bench.adapter import Adapter, TrainSet

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


def apply_all(transforms: list[Transformation], x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(T * B, 3, H, W)``, transformation-major."""
    return torch.cat([t.apply(x) for t in transforms])


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
    res = ((lut[y1, x1, v] * xa1 + lut[y1, x2, v] * xa) * ya1 + (lut[y2, x1, v] * xa1 + lut[y2, x2, v] * xa) * ya)
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
def pyramid_sizes(image_size: int, min_size: int, max_size: int, scale_factor: float) -> list[int]:
    """Image side per scale, coarsest first (official ``functions.adjust_scales2image``).

    E.g. 128 px input, min 25, max 64, factor 0.75 -> [25, 32, 40, 51, 64].
    """
    num_scales = math.ceil(math.log(min_size / image_size, scale_factor)) + 1
    stop_scale = num_scales - math.ceil(math.log(min(max_size, image_size) / image_size, scale_factor))
    top = round(image_size * min(max_size / image_size, 1.0))
    if stop_scale <= 0 or min_size >= top:
        return [top]
    factor = (min_size / top) ** (1.0 / stop_scale)
    return [math.ceil(top * factor ** (stop_scale - i) - 1e-6) for i in range(stop_scale + 1)]


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=x.shape[-1] > size)


class TDGHierarchy(nn.Module):
    """The trained model: per-scale generators, discriminators and the recipe to train them.

    Images enter in [0, 1] ``(B, 3, S, S)`` and are resized to the pyramid (in [-1, 1]).
    """

    def __init__(self, sizes: list[int], transforms: list[Transformation], hp: dict):
        super().__init__()
        self.sizes = sizes
        self.transforms = transforms
        self.hp = hp
        T = len(transforms)
        widths = [min(hp["nfc"] * 2 ** (n // 4), 128) for n in range(len(sizes))]
        min_widths = [min(hp["min_nfc"] * 2 ** (n // 4), 128) for n in range(len(sizes))]
        self.widths = widths
        self.generators = nn.ModuleList(PatchGenerator(w, mw, hp["num_layer"]) for w, mw in zip(widths, min_widths))
        self.discriminators = nn.ModuleList(
            PatchDiscriminator(T, w, mw, hp["num_layer"]) for w, mw in zip(widths, min_widths))
        #: fixed reconstruction noise per scale ``(1, 3, s, s)`` and noise amplitudes ``(N, scales)``,
        #: set by :meth:`train_hierarchy` (training state only; scoring needs the discriminators)
        self.z_rec: list[torch.Tensor] = []
        self.amps = torch.ones(0, len(sizes))

    # -- pyramid / noise -----------------------------------------------------------------
    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, S, S)`` in [0, 1] -> list of ``(B, 3, s_n, s_n)`` in [-1, 1], coarsest first."""
        x = (images * 2 - 1).clamp(-1, 1)
        return [_resize(x, s).clamp(-1, 1) for s in self.sizes]

    @staticmethod
    def _noise(b: int, n: int, size: int, gen: torch.Generator, device) -> torch.Tensor:
        """Gaussian noise ``(b, 3, size, size)``; single-channel (grey) at the coarsest scale ``n = 0``."""
        ch = 1 if n == 0 else 3
        z = torch.randn(b, ch, size, size, generator=gen).to(device)
        return z.expand(b, 3, size, size)

    def _up(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return _resize(x, self.sizes[n + 1])

    @torch.no_grad()
    def sample_prev(self, n: int, ids: torch.Tensor, amps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random sample of scales ``< n`` upsampled to scale ``n`` (zeros for n = 0), ``(B, 3, s_n, s_n)``."""
        b, dev = len(ids), amps.device
        x = torch.zeros(b, 3, self.sizes[0], self.sizes[0], device=dev)
        for s in range(n):
            z = self._noise(b, s, self.sizes[s], gen, dev)
            x = self._up(self.generators[s](amps[:, s].view(-1, 1, 1, 1) * z + x, x, ids), s)
        return x

    @torch.no_grad()
    def reconstruct_prev(self, n: int, ids: torch.Tensor, amps: torch.Tensor) -> torch.Tensor:
        """Reconstruction chain from the fixed noise maps, up to scale ``n``, ``(B, 3, s_n, s_n)``."""
        b, dev = len(ids), amps.device
        x = torch.zeros(b, 3, self.sizes[0], self.sizes[0], device=dev)
        for s in range(n):
            z = self.z_rec[s].to(dev).expand(b, 3, -1, -1)
            x = self._up(self.generators[s](amps[:, s].view(-1, 1, 1, 1) * z + x, x, ids), s)
        return x

    # -- training ------------------------------------------------------------------------
    def train_hierarchy(self, images: torch.Tensor, niter: int, gen: torch.Generator, batch_size: int | None = None,
                        warm_start: bool = False, index_scale: float = 1.0) -> None:
        """Train every scale, coarse to fine, on ``images`` ``(N, 3, S, S)`` in [0, 1].

        ``batch_size``: images per iteration (None = all; the official few-shot setting).
        Fresh Adam optimisers per scale. ``warm_start=False`` (TDG): a scale whose width
        equals the previous one's starts from its trained weights (official); ``True``
        (``tdg+`` adapting): every scale keeps its own pre-trained weights. ``index_scale``:
        image ``i``'s index channel holds ``i · index_scale`` (official: 1).
        """
        hp, dev = self.hp, next(self.parameters()).device
        reals = [r.to(dev) for r in self.pyramid(images.to(dev))]
        n_img = len(images)
        ids_all = torch.arange(n_img, dtype=torch.float32, device=dev) * index_scale
        # fixed reconstruction noise maps (official: one grey map per scale, shared by all images)
        self.z_rec = [torch.randn(1, 1, s, s, generator=gen).expand(1, 3, s, s).to(dev) for s in self.sizes]
        amps = torch.ones(n_img, len(self.sizes), device=dev)
        T = len(self.transforms)
        for n in range(len(self.sizes)):
            G, D = self.generators[n], self.discriminators[n]
            if n > 0 and self.widths[n] == self.widths[n - 1] and not warm_start:
                G.load_state_dict(self.generators[n - 1].state_dict())
                D.load_state_dict(self.discriminators[n - 1].state_dict())
            if n > 0:  # noise amplitude: noise_amp x mean |real - reconstruction| per image
                rec = self.reconstruct_prev(n, ids_all, amps)
                amps[:, n] = hp["noise_amp"] * (reals[n] - rec).abs().flatten(1).mean(1)
            self._train_scale(n, G, D, reals[n], ids_all, amps, niter, gen, batch_size, T)
        self.amps = amps

    def _train_scale(self, n, G, D, real_all, ids_all, amps, niter, gen, batch_size, T) -> None:
        hp, dev = self.hp, real_all.device
        G.train(), D.train()
        opt_d = torch.optim.Adam(D.parameters(), lr=hp["lr_d"], betas=(hp["beta1"], 0.999))
        opt_g = torch.optim.Adam(G.parameters(), lr=hp["lr_g"], betas=(hp["beta1"], 0.999))
        sched_d = torch.optim.lr_scheduler.MultiStepLR(opt_d, [hp["milestone_d"]], gamma=hp["gamma"])
        sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, [hp["milestone_g"]], gamma=hp["gamma"])
        size = self.sizes[n]
        for it in range(niter):
            if batch_size is None or batch_size >= len(real_all):
                idx = torch.arange(len(real_all), device=dev)
            else:
                idx = torch.randperm(len(real_all), generator=gen)[:batch_size].to(dev)
            real, ids, amp = real_all[idx], ids_all[idx], amps[idx]
            b = len(idx)
            z = self._noise(b, n, size, gen, dev)
            if hp["transforms_per_step"] and hp["transforms_per_step"] < T:  # cpu preset: a random subset
                chosen = torch.randperm(T, generator=gen)[: hp["transforms_per_step"]].tolist()
            else:  # official: every transformation, every iteration
                chosen = list(range(T))
            transforms = [self.transforms[t] for t in chosen]
            real_t = apply_all(transforms, real)  # (T'*b, 3, s, s)
            labels = torch.tensor(chosen, device=dev).repeat_interleave(b)
            # (1) D: real transformed patches -> their transformation, fakes -> class T
            for p in D.parameters():
                p.requires_grad_(True)
            for _ in range(hp["d_steps"]):
                opt_d.zero_grad()
                loss_real = _patch_ce(D(real_t), labels)
                prev = self.sample_prev(n, ids, amp, gen)
                noisy = amp[:, n].view(-1, 1, 1, 1) * z + prev if n > 0 else z
                with torch.no_grad():
                    fake = G(noisy, prev, ids)
                logits_fake = D(apply_all(transforms, fake))
                loss_fake = _patch_ce(logits_fake, torch.full((len(logits_fake),), T, device=dev))
                (loss_real + loss_fake).backward()
                opt_d.step()
            # (2) G: make D recognise the transformations of the fakes + reconstruction
            for p in D.parameters():
                p.requires_grad_(False)
            rec_prev = self.reconstruct_prev(n, ids, amp)
            z_rec = self.z_rec[n].expand(b, 3, -1, -1)
            noisy_rec = amp[:, n].view(-1, 1, 1, 1) * z_rec + rec_prev
            for _ in range(hp["g_steps"]):
                opt_g.zero_grad()
                fake = G(noisy, prev, ids)
                loss = _patch_ce(D(apply_all(transforms, fake)), labels)
                if hp["alpha"]:
                    loss = loss + hp["alpha"] * F.mse_loss(G(noisy_rec, rec_prev, ids), real)
                loss.backward()
                opt_g.step()
            for p in D.parameters():
                p.requires_grad_(True)
            sched_d.step(), sched_g.step()
        G.eval(), D.eval()

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
            correct = torch.stack([probs[t, :, t] for t in range(T)])  # (T, b, h, w)
            flat = correct.flatten(2).sort(dim=2).values
            k = max(1, int(flat.shape[2] * fraction))
            normality.append(flat[:, :, :k].mean(2).mean(0))
            back = torch.stack([t.invert(1 - correct[i], size=real.shape[-1], fill=float("nan"))
                                for i, t in enumerate(self.transforms)])
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


def _patch_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every patch's logits ``(B, C, h, w)`` against its image's label ``(B,)``."""
    return F.cross_entropy(logits, labels.view(-1, 1, 1).expand(-1, *logits.shape[-2:]))


# ----------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------
_PAPER = {
    "min_size": 25, "max_size": 64, "scale_factor": 0.75, "nfc": 32, "min_nfc": 32, "num_layer": 5,
    "niter": 1000, "d_steps": 3, "g_steps": 3, "lr_g": 5e-4, "lr_d": 5e-4, "beta1": 0.5,
    "gamma": 0.1, "milestone_d": 500, "milestone_g": 1000, "alpha": 100.0, "noise_amp": 0.1,
    "transforms": "official54", "transforms_per_step": None, "batch_size": None, "fraction": 0.1,
    "clahe": True, "clahe_clip": 2.0, "clahe_tiles": 8,
}
_CPU = {
    **_PAPER, "min_size": 16, "max_size": 32, "scale_factor": 0.5, "nfc": 16, "min_nfc": 16,
    "niter": 40, "d_steps": 1, "g_steps": 1, "transforms": "dihedral8", "transforms_per_step": 4,
    "batch_size": 2,
}


class TDG(Adapter):
    """TDG, one-/few-shot: the hierarchy is trained on the k support images only."""

    name = "tdg"
    protocol = "individual"
    paper = "Sheynin, Benaim, Wolf: A Hierarchical Transformation-Discriminating Generative Model for FSAD (ICCV 2021)"
    labelled_options = frozenset({"clahe"})
    presets = {"paper": dict(_PAPER), "cpu": dict(_CPU)}

    def __init__(self, config=None):
        super().__init__(config)
        torch.manual_seed(self.config.seed)
        hp = self.hparams
        sizes = pyramid_sizes(self.config.image_size, hp["min_size"], hp["max_size"], hp["scale_factor"])
        transforms = TRANSFORMATION_SETS[hp["transforms"]]()
        self.model = TDGHierarchy(sizes, transforms, hp).to(self.device)
        self._trained = False

    def _generator(self, tag: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1000003 + tag)

    def training_images(self, images: torch.Tensor) -> torch.Tensor:
        """What the hierarchy trains on: ``images`` ``(N, 3, S, S)`` after CLAHE (when ``clahe``)."""
        hp = self.hparams
        return clahe_rgb(images, hp["clahe_clip"], hp["clahe_tiles"]) if hp["clahe"] else images

    def label_tags(self) -> list[str]:
        return [] if self.hparams["clahe"] else ["clahe=off"]

    def fit(self, train: TrainSet) -> None:
        """Train the whole hierarchy on the target's support images ``{target: (K, 3, S, S)}``."""
        (images,) = [torch.stack([ds[i] for i in range(len(ds))]) for ds in train.values()]
        self.model.train_hierarchy(self.training_images(images), self.hparams["niter"], self._generator(0),
                                   batch_size=self.hparams["batch_size"])
        self._trained = True

    def adapt(self, support: torch.Tensor) -> None:
        """``fit`` already trained on the support; train here only if it was not called."""
        if not self._trained:
            self.model.train_hierarchy(self.training_images(support), self.hparams["niter"], self._generator(0),
                                       batch_size=self.hparams["batch_size"])
            self._trained = True

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.score(images, self.hparams["fraction"])


class TDGPlus(TDG):
    """TDG+ (RegAD's aggregated TDG): pre-train on all other categories, train further on the support."""

    name = "tdg+"
    protocol = "aggregated"
    paper = "TDG with aggregated training, as compared in RegAD (Huang et al., ECCV 2022)"
    labelled_options = frozenset({"clahe", "pretrain_index"})
    presets = {
        "paper": {**_PAPER, "pretrain_niter": 1000, "pretrain_batch": 10, "pretrain_images_per_category": None,
                  "adapt_niter": 1000, "pretrain_index": "scaled"},
        "cpu": {**_CPU, "pretrain_niter": 100, "pretrain_batch": 4, "pretrain_images_per_category": 20,
                "adapt_niter": 20, "pretrain_index": "scaled"},
    }

    def __init__(self, config=None):
        super().__init__(config)
        if self.hparams["pretrain_index"] not in ("scaled", "raw"):
            raise ValueError(f"pretrain_index must be 'scaled' or 'raw', got {self.hparams['pretrain_index']!r}")
        #: (category, index) of every image pre-training used (never the held-out category)
        self.pretrain_sources: list[tuple[str, int]] = []
        self.adapted: TDGHierarchy | None = None

    def fit(self, train: TrainSet) -> None:
        """Pre-train the hierarchy on a pool of images from every category in ``train``."""
        per_cat = self.hparams["pretrain_images_per_category"]
        g = self._generator(1)
        images, self.pretrain_sources = [], []
        for cat in sorted(train):
            ds = train[cat]
            order = torch.randperm(len(ds), generator=g).tolist()
            for i in order[:per_cat] if per_cat else order:
                images.append(ds[i])
                self.pretrain_sources.append((cat, i))
        self.model.train_hierarchy(self.training_images(torch.stack(images)), self.hparams["pretrain_niter"], g,
                                   batch_size=self.hparams["pretrain_batch"],
                                   index_scale=self.index_scale(len(images)))
        self._trained = True

    def index_scale(self, n: int) -> float:
        """Index-channel factor for a pool of ``n`` images: ``(B - 1) / (n - 1)`` (``scaled``, pools
        larger than a batch ``B``) or 1 (``raw``, or a pool no larger than a batch)."""
        b = self.hparams["pretrain_batch"] or n
        if self.hparams["pretrain_index"] == "raw" or n <= max(b, 1) or n < 2:
            return 1.0
        return (b - 1) / (n - 1)

    def label_tags(self) -> list[str]:
        return super().label_tags() + (["index=raw"] if self.hparams["pretrain_index"] == "raw" else [])

    def adapt(self, support: torch.Tensor) -> None:
        """Copy the pre-trained hierarchy and train it further on ``support`` ``(K, 3, S, S)``."""
        self.adapted = copy.deepcopy(self.model)  # every cell starts from the pre-trained state
        self.adapted.train_hierarchy(self.training_images(support), self.hparams["adapt_niter"], self._generator(2),
                                     batch_size=self.hparams["batch_size"], warm_start=True)

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.adapted if self.adapted is not None else self.model
        return model.score(images, self.hparams["fraction"])

    def state_dict(self):
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state) -> None:
        self.model.load_state_dict(state["model"])
        self._trained = True
