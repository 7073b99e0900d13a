"""``regad`` / ``regad-l``: Registration based Few-Shot Anomaly Detection (Huang et al., ECCV 2022).

Model (official ``models/stn.py``, ``models/siamese.py``):

* ResNet-18 blocks layer1..layer3 (layer4 and pooling dropped), a spatial transformer
  (STN) after each block: the next block sees the *registered* map. Localisation net per
  STN: conv3x3→64, BN, ReLU, maxpool(3, 2, 1), conv3x3→16, BN, ReLU, maxpool(3, 2, 1),
  fc→1024, ReLU, fc→n_params; last fc zero weights and identity bias, so every STN starts
  as the identity transform. Transformation families and parameter counts as the official
  ``N_PARAMS`` (``rotation_scale``, 3 parameters, is the official default and the paper's best
  on MVTec). The official fc input size assumes 224 px input (``56 // (4 block)``); here it is
  computed from the actual block output size (two ``maxpool(3, 2, 1)`` halvings, rounded up),
  which equals the official value at 224 px and works at any image size.
* Siamese encoder: three 1x1 convs 256→256 (BN + ReLU after the first two, none after the
  third); predictor: two 1x1 convs (BN + ReLU after the first). No pooling: per position.
* Loss: symmetric negative cosine similarity over channels, averaged over batch and
  positions, stop-gradient on the target branch (SimSiam; official ``losses/norm_loss.py``).
  The encoder sees the registered layer3 map (STN3 output) of the query and the *mean* of the
  registered layer3 maps of its K support images (official ``train.py``: ``sum / K``).

Training (official ``train.py`` / ``datasets/mvtec.py``): every normal training image of every
training category is a query once per epoch; queries of one category are chunked into batches
of 32 and each query gets ``shot`` support images drawn (with replacement) among the other
images of its category; SGD momentum 0.9, lr 1e-4 (train.py default; test.py's 0.01 is unused),
50 epochs, cosine decay set at the start of each epoch ``e = 1..E`` as
``lr·½(1 + cos(π e / E))`` (so the last epoch runs at lr 0). The optimiser holds *all* STN-model
parameters, i.e. the ResNet blocks are trained too (not frozen), in train mode (BN statistics
update). Images are fed in [0, 1] without ImageNet normalisation (the official ``Normalize`` is
commented out). The official script selects the checkpoint with the best *test* AUROC; here
the last epoch is kept. The official model is trained per shot; our aggregated fit is shared
by every k and uses ``train_shot`` supports per query (official default shot 2).

Test (official ``test.py``): 22-view support augmentation (``fsad_bench.components.augment``), each STN
output warped back to image coordinates (below), the three maps upsampled to the layer1 grid
by repetition (official ``utils/funcs.embedding_concat``: unfold/fold = nearest-neighbour
upsampling for integer size ratios) and concatenated (448 channels), a Gaussian per position
(unbiased covariance + 0.01 I), Mahalanobis distance, bilinear upsampling to the image,
Gaussian blur σ = 4 px with scipy's default ``reflect`` border (edge sample repeated:
``blur_border = "symmetric"`` here), image score = max of the map (the official min-max
normalisation over the test set is monotone and leaves AUROC unchanged). The encoder /
predictor cosine map is computed by the official test code but not used for the scores.

Frames (``feature_frame``): a registered map at position ``p`` of STN ``i``'s output looks at
``A_1 … A_i p`` in the image (``A``: the STNs' 2x3 matrices in homogeneous form).

* ``"image"`` (official, both presets): ``models/stn.py`` keeps ``stn{i}_output`` = STN ``i``'s
  (detached) output warped by ``A_i⁻¹``, then by ``A_{i-1}⁻¹``, …, then by ``A_1⁻¹`` — ``i``
  successive ``grid_sample`` calls (bilinear, reflection padding, ``align_corners=False``),
  each inverse the 3x3 homogeneous inverse of one STN's own θ (numpy, float32; here float64
  rounded to float32) — and ``test.py`` fits the Gaussian on these image-frame maps of the
  support views and scores the test maps in the same frame. Reproduced exactly (same order
  of warps, same padding and grid convention).
* ``"registered"`` (option, labelled ``frame=registered``): the Gaussian is fitted on the STN
  outputs themselves (support and test images both registered) and only the Mahalanobis map
  is warped back, with the inverse of ``A_1 A_2 A_3`` (the layer3 frame; the layer1 and layer2
  channels sit in the slightly different frames ``A_1``, ``A_1 A_2``) and reflection padding,
  which can put reflected maxima at the border that the max score then picks.

Other non-official options (labelled when used): ``concat_upsample = "bilinear"``,
``blur_border = "reflect"`` (torch's mirror padding).

``regad-l`` (protocol ``individual``) is the same training on the target's k support images only:
pairs are formed among the support images; with a single image the support view is a random
small rotation (≤ π/8) and shift (≤ 10 %) of the query itself, so the STNs still have something
to register.

Presets: ``paper`` = the official config above; ``cpu`` = 128 px demo budget (see ``presets``),
the official test pipeline (image frame, nearest concat, scipy border) with a shorter training.
Backbone (``arch`` option, default the paper's ``resnet18``): any torchvision CNN with default taps in
``fsad_bench.components.backbone.TAPS`` (e.g. ``mobilenet_v2``); an STN follows each tap's stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsad_bench.adapter import Adapter, TrainSet
from fsad_bench.components.augment import affine_warp, augment_support
from fsad_bench.components.backbone import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor
from fsad_bench.components.position_gaussian import PositionGaussian
from fsad_bench.components.maps import ScratchBuffer, concat_pyramid, pyramid_samples, smooth_maps

#: Test-pipeline option values of the official code (others are labelled in tables).
OFFICIAL_TEST = {"feature_frame": "image", "concat_upsample": "nearest", "blur_border": "symmetric"}

#: Parameters predicted by the localisation net for each transformation family (official N_PARAMS).
N_PARAMS = {"affine": 6, "translation": 2, "rotation": 1, "scale": 2, "shear": 2, "rotation_scale": 3,
            "translation_scale": 4, "rotation_translation": 3, "rotation_translation_scale": 5}

#: Bias of the last localisation layer giving the identity transform (official initialisation).
IDENTITY_PARAMS = {"affine": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), "translation": (0.0, 0.0), "rotation": (0.0,),
                   "scale": (1.0, 1.0), "shear": (0.0, 0.0), "rotation_scale": (0.0, 1.0, 1.0),
                   "translation_scale": (0.0, 0.0, 1.0, 1.0), "rotation_translation": (0.0, 0.0, 0.0),
                   "rotation_translation_scale": (0.0, 0.0, 0.0, 1.0, 1.0)}


# ---------------------------------------------------------------------------------------
# affine matrices (normalised coordinates, F.affine_grid convention: out(p) = in(θ [p; 1]))
# ---------------------------------------------------------------------------------------
def affine_from_params(params: torch.Tensor, mode: str) -> torch.Tensor:
    """Build ``θ`` ``(B, 2, 3)`` from the localisation output ``params`` ``(B, N_PARAMS[mode])``.

    Same parameterisation as the official code: angle ``a`` in radians, scales multiply only
    the diagonal (``rotation_scale``: ``[[sx cos a, -sin a, 0], [sin a, sy cos a, 0]]``), shear
    fills the off-diagonal. Built with ``torch.stack`` (no in-place writes), differentiable.
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
    """Inverse transforms ``(B, 2, 3)`` (computed in float64)."""
    return torch.linalg.inv(homogeneous(theta.double()))[:, :2].to(theta.dtype)


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


# ---------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------
def _halved(n: int) -> int:
    """Output length of ``MaxPool2d(3, stride=2, padding=1)`` on length ``n``."""
    return (n - 1) // 2 + 1


class SpatialTransformer(nn.Module):
    """STN on a feature map ``(B, C, H, W)`` -> (warped map ``(B, C, H, W)``, θ ``(B, 2, 3)``).

    ``grid_size``: ``(H, W)`` of the maps it will see (sets the fc input size). Reflection
    padding, bilinear sampling, ``align_corners=False`` (official ``F.affine_grid`` defaults).
    """

    def __init__(self, in_channels: int, grid_size: tuple[int, int], mode: str = "rotation_scale"):
        super().__init__()
        if mode not in N_PARAMS:
            raise ValueError(f"unknown stn_mode {mode!r} (known: {', '.join(N_PARAMS)})")
        self.mode = mode
        self.localisation = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(64, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
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
    block includes the stem) with an STN after each block.

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
            nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )


class Predictor(nn.Sequential):
    """Two 1x1 convs (BN + ReLU after the first): ``(B, C, h, w)`` -> ``(B, C, h, w)``."""

    def __init__(self, channels: int = 256):
        super().__init__(
            nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``-cos(p, stopgrad(z))`` over channels, averaged over batch and positions; ``(B, C, h, w)``."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def simsiam_loss(p1: torch.Tensor, z1: torch.Tensor, p2: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric SimSiam loss ``½ D(p1, z2) + ½ D(p2, z1)`` (range [-1, 1])."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


# ---------------------------------------------------------------------------------------
# training pairs
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainBatch:
    """One optimisation step: ``queries`` (B indices) of ``category``, ``supports`` (B lists of K indices)."""

    category: str
    queries: list[int]
    supports: list[list[int]]


def training_batches(sizes: Mapping[str, int], batch_size: int, shot: int, generator: torch.Generator,
                     max_queries: int | None = None) -> list[TrainBatch]:
    """One epoch of RegAD training steps over categories with ``sizes[c]`` images each.

    Every image (or the first ``max_queries`` of a random permutation) is a query once; the
    queries of a category are chunked into batches of ``batch_size``; each query gets ``shot``
    supports drawn uniformly, with replacement, among the *other* images of its category (the
    query itself when the category has a single image). The batch order is shuffled.
    """
    batches = []
    for cat in sorted(sizes):
        n = sizes[cat]
        order = torch.randperm(n, generator=generator).tolist()[: max_queries or n]
        for s in range(0, len(order), batch_size):
            queries = order[s : s + batch_size]
            supports = []
            for q in queries:
                if n == 1:
                    supports.append([q] * shot)
                    continue
                draw = torch.randint(0, n - 1, (shot,), generator=generator).tolist()
                supports.append([d + (d >= q) for d in draw])  # skip the query's own index
            batches.append(TrainBatch(cat, queries, supports))
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def random_small_affine(n: int, generator: torch.Generator, angle: float = math.pi / 8,
                        shift: float = 0.2) -> torch.Tensor:
    """``n`` random rotations in [-angle, angle] and shifts in [-shift, shift] (normalised units), ``(n, 2, 3)``."""
    a = (torch.rand(n, generator=generator) * 2 - 1) * angle
    t = (torch.rand(n, 2, generator=generator) * 2 - 1) * shift
    return torch.stack([torch.stack([a.cos(), -a.sin(), t[:, 0]], 1), torch.stack([a.sin(), a.cos(), t[:, 1]], 1)], 1)


class _ImageCache:
    """Memoises ``dataset[i]`` of each training category up to ``budget_mb`` (then reads lazily)."""

    def __init__(self, train: TrainSet, budget_mb: float = 2048):
        self.train, self.budget, self.used, self.cache = train, budget_mb * 2**20, 0, {}

    def get(self, category: str, indices: list[int]) -> torch.Tensor:
        out = []
        for i in indices:
            img = self.cache.get((category, i))
            if img is None:
                img = torch.as_tensor(self.train[category][i]).float()
                if self.used + img.nbytes <= self.budget:
                    self.cache[(category, i)] = img
                    self.used += img.nbytes
            out.append(img)
        return torch.stack(out)


# ---------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------
class RegAD(Adapter):
    """RegAD: STN-registered ResNet-18 features trained by SimSiam on pairs of normal images
    of the training categories; per-position Gaussian on the STN outputs warped back to the image."""

    name = "regad"
    protocol = "aggregated"
    paper = "Huang et al., Registration based Few-Shot Anomaly Detection, ECCV 2022"
    bookkeeping_options = frozenset({"infer_batch"})
    labelled_options = frozenset(OFFICIAL_TEST)
    _common = {"arch": "resnet18", "stn_mode": "rotation_scale", "train_shot": 2, "momentum": 0.9,
               "imagenet_norm": False, **OFFICIAL_TEST, "eps": 0.01, "sigma": 4.0, "infer_batch": 32}
    presets = {
        # official train.py: SGD(0.9), lr 1e-4, 50 epochs, 32 queries/step, per-epoch cosine, shot 2
        "paper": {**_common, "epochs": 50, "batch_size": 32, "lr": 1e-4, "lr_schedule": "epoch-cosine",
                  "max_queries_per_category": None},
        # demo budget (128 px, 2 cores, ≤ ~30 s per aggregated fit): 3 epochs of ≤ 24 queries per
        # category, 8 queries x 1 support per step, 10x the paper's lr (1e-2 hurt pixel AUROC), per-step cosine
        "cpu": {**_common, "train_shot": 1, "epochs": 3, "batch_size": 8, "lr": 1e-3, "lr_schedule": "step-cosine",
                "max_queries_per_category": 24},
    }

    def __init__(self, config=None):
        super().__init__(config)
        hp = self.hparams
        if hp["feature_frame"] not in ("registered", "image"):
            raise ValueError(f"feature_frame must be 'registered' or 'image', got {hp['feature_frame']!r}")
        if hp["concat_upsample"] not in ("nearest", "bilinear"):
            raise ValueError(f"concat_upsample must be 'nearest' or 'bilinear', got {hp['concat_upsample']!r}")
        if hp["blur_border"] not in ("symmetric", "reflect"):
            raise ValueError(f"blur_border must be 'symmetric' or 'reflect', got {hp['blur_border']!r}")
        if hp["lr_schedule"] not in ("epoch-cosine", "step-cosine"):
            raise ValueError(f"lr_schedule must be 'epoch-cosine' or 'step-cosine', got {hp['lr_schedule']!r}")
        torch.manual_seed(self.config.seed)
        self.model = RegistrationNet(hp["arch"], self.config.weights, self.config.image_size, hp["stn_mode"],
                                     hp["imagenet_norm"]).to(self.device).eval()
        self.weights_tag = self.model.weights_tag
        channels = self.model.channels[-1]
        self.encoder = SiameseEncoder(channels).to(self.device).eval()
        self.predictor = Predictor(channels).to(self.device).eval()
        self.gaussian = PositionGaussian(eps=hp["eps"])
        self.scratch = ScratchBuffer()  # centred test samples of one band (score_pyramid), reused
        #: mean SimSiam loss of each epoch of the last fit (diagnostics)
        self.loss_history: list[float] = []

    # -- training -------------------------------------------------------------------------
    def _registered_layer3(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[0][-1]

    def fit(self, train: TrainSet) -> None:
        """SimSiam registration training on ``train`` (category -> images ``(3, S, S)``)."""
        hp = self.hparams
        g = torch.Generator().manual_seed(self.config.seed)
        sizes = {c: len(ds) for c, ds in train.items() if len(ds) > 0}
        images = _ImageCache(train)
        modules = (self.model, self.encoder, self.predictor)
        params = [p for m in modules for p in m.parameters()]
        opt = torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"])
        epochs, shot = hp["epochs"], hp["train_shot"]
        plans = [training_batches(sizes, hp["batch_size"], shot, g, hp["max_queries_per_category"])
                 for _ in range(epochs)]
        total, step = sum(len(p) for p in plans), 0
        for m in modules:
            m.train()
        self.loss_history = []
        for epoch, batches in enumerate(plans, start=1):
            losses = []
            for batch in batches:
                if hp["lr_schedule"] == "epoch-cosine":  # official adjust_learning_rate, epoch = 1..E
                    lr = hp["lr"] * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
                else:
                    lr = hp["lr"] * 0.5 * (1 + math.cos(math.pi * step / total))
                for group in opt.param_groups:
                    group["lr"] = lr
                query = images.get(batch.category, batch.queries).to(self.device)
                flat = [i for s in batch.supports for i in s]
                support = images.get(batch.category, flat).to(self.device)
                if sizes[batch.category] == 1:  # a lone image: register a randomly moved copy of it
                    support = affine_warp(support, random_small_affine(len(flat), g).to(support))
                b = query.shape[0]
                zq = self.encoder(self._registered_layer3(query))
                feat_s = self._registered_layer3(support)
                feat_s = feat_s.view(b, shot, *feat_s.shape[1:]).mean(dim=1)
                zs = self.encoder(feat_s)
                loss = simsiam_loss(self.predictor(zq), zq, self.predictor(zs), zs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
            self.loss_history.append(sum(losses) / max(len(losses), 1))
        for m in modules:
            m.eval()

    # -- test time ------------------------------------------------------------------------
    @torch.no_grad()
    def _pyramids(self, images: torch.Tensor):
        """Per batch of ``infer_batch`` images: the three maps in the test frame (image frame or
        registered frame, see ``feature_frame``) and ``θ_1 θ_2 θ_3`` ``(B, 2, 3)`` (registered
        layer3 frame -> image). Yields ``(offset, maps, theta)``."""
        self.model.eval()
        bs = self.hparams["infer_batch"]
        for i in range(0, len(images), bs):
            maps, th = self.model(images[i : i + bs].to(self.device))
            if self.hparams["feature_frame"] == "image":  # official: each level back to the image first
                maps = to_image_frame(maps, th)
            yield i, maps, compose_affine(*th)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated maps ``(N, 448, S/4, S/4)`` and ``θ_1 θ_2 θ_3`` ``(N, 2, 3)``."""
        feats, thetas = [], []
        for _, maps, theta in self._pyramids(images):
            feats.append(concat_pyramid(maps, self.hparams["concat_upsample"]))
            thetas.append(theta)
        return torch.cat(feats), torch.cat(thetas)

    @torch.no_grad()
    def samples(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """:meth:`features` written once per batch straight into the position-major buffer
        ``(S/4 · S/4, N, 448)`` the Gaussian fits; returns (buffer, grid)."""
        buf, grid = None, None
        for i, maps, _ in self._pyramids(images):
            if buf is None:
                grid = tuple(maps[0].shape[-2:])
                shape = (grid[0] * grid[1], len(images), sum(m.shape[1] for m in maps))
                buf = torch.empty(shape, dtype=maps[0].dtype, device=maps[0].device)
            pyramid_samples(maps, self.hparams["concat_upsample"], out=buf, offset=i)
        return buf, grid

    def adapt(self, support: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(self.config.seed)
        self.gaussian.fit_samples(*self.samples(augment_support(support, generator=g)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dists, thetas = [], []
        for _, maps, theta in self._pyramids(images):  # layout fused into the scoring, band by band
            dists.append(self.gaussian.score_pyramid(maps, self.hparams["concat_upsample"], self.scratch))
            thetas.append(theta)
        dist, theta = torch.cat(dists), torch.cat(thetas)  # (N, S/4, S/4), (N, 2, 3)
        if self.hparams["feature_frame"] == "registered":  # map to image coordinates: sample at (θ1θ2θ3)⁻¹ q
            dist = affine_warp(dist[:, None], invert_affine(theta))[:, 0]
        maps = smooth_maps(dist, images.shape[-1], self.hparams["sigma"], self.hparams["blur_border"]).cpu()
        return maps.flatten(1).max(dim=1).values, maps

    def label_tags(self) -> list[str]:
        """``key=value`` for every test-pipeline option set to a non-official value."""
        return [f"{k.split('_')[-1]}={self.hparams[k]}" for k, v in OFFICIAL_TEST.items() if self.hparams[k] != v]


class RegADL(RegAD):
    """RegAD trained on the target category's k support images only (individual protocol).

    ``paper``: RegAD's official training hyper-parameters applied to the support set (the
    official repository has no RegAD-L script); pairs are formed among the k support images,
    with k = 1 the support view is a randomly rotated / shifted copy of the query.
    """

    name = "regad-l"
    protocol = "individual"
    presets = {
        "paper": dict(RegAD.presets["paper"]),
        # ≤ ~5 s fit + adapt at 128 px (k ≤ 4): 4 steps, each query with 1 support
        "cpu": {**RegAD.presets["cpu"], "epochs": 4, "max_queries_per_category": None},
    }
