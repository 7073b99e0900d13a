"""``diffnet`` / ``diffnet+``: DifferNet, a normalizing flow on multi-scale AlexNet features.

Rudolph, Wandt, Rosenhahn, "Same Same But DifferNet: Semi-Supervised Defect Detection with
Normalizing Flows", WACV 2021 (official code: github.com/marco-rudolph/differnet). Facts taken
from the official code:

* features (model.py): ImageNet AlexNet ``features`` applied to the image at ``n_scales = 3``
  resolutions (full, 1/2, 1/4; ``F.interpolate`` with its default nearest mode), each map
  globally average-pooled, concatenated: 256 × 3 = 768 values per image; input 448 × 448
  (config.py ``img_size``), ImageNet mean/std normalisation; the extractor is not trained
  (train.py optimises ``model.nf.parameters()`` only);
* flow (model.py, freia_funcs.py): 8 × [fixed random permutation (numpy seed = block index),
  GLOW coupling block]; each coupling has two subnets ``Linear-ReLU-Linear-ReLU-Linear-ReLU-
  Linear`` with 2048 hidden units (``fc_internal``), dropout 0.0, and soft-clamped scales
  ``log s = clamp · 0.636 · atan(s_raw / clamp)`` with ``clamp_alpha = 3``;
* loss (utils.py ``get_loss``): ``mean_batch(0.5 · Σ z² − log|det J|) / 768``;
* training (config.py, train.py): Adam(lr 2e-4, betas (0.8, 0.8), eps 1e-4, weight decay 1e-5),
  24 meta-epochs × 8 sub-epochs = 192 epochs, batches of 24 images × ``n_transforms = 4``
  augmented views; augmentation = resize to 448, ``RandomRotation(180)`` (black fill), then
  ``ColorJitter`` whose brightness/contrast/saturation are all 0.0 (off) in the released config;
* score (train.py): the test image is augmented ``n_transforms_test = 64`` times with the same
  random transforms, score = mean of z² over the 64 views and 768 dimensions;
* localisation (localization.py): gradient of the NLL loss w.r.t. each input view, each view's
  gradient rotated back, blurred with a Gaussian of σ = 3 px (per channel, signed), then the
  mean of |gradient| over channels and views, squared.

Mapping onto stock FrEIA 0.2 (``FrEIA.framework.SequenceINN``): the official permute layer is
``FrEIA.modules.PermuteRandom(seed=k)`` (same numpy ``seed`` + ``permutation`` construction; the
global numpy RNG state is restored afterwards, as the official layer does); the official
``glow_coupling_layer`` is ``FrEIA.modules.GLOWCouplingBlock`` (subnet2 conditions on the second
half and transforms the first half first, exactly as the official ``s2``/``s1`` order), with
``clamp = 3`` and ``clamp_activation = u ↦ 0.636 · atan(u / 3)`` so that the scale is the
official ``3 · 0.636 · atan(s/3)`` (FrEIA's built-in ``"ATAN"`` would omit the ``/clamp``). Not
reproduced: the official coupling also clamps outputs to ±1e6 (a numerical guard).

Deviations (all documented here, none in the ``paper`` preset's maths):

* resolution: the adapter declares ``input_size = img_size`` (448 in ``paper``), so the engine
  loads every image from the original file at ``img_size`` (the official ``Resize(img_size)``
  on the photo) and nothing is upsampled here; ``predict`` returns maps at the size of the
  images it is given and the engine resizes them to the suite's size. Images given at another
  size ``S`` (direct API use) are resized on tensors first (bilinear, antialiased when
  shrinking) and the σ = 3 px (at ``img_size``) becomes ``3 · S / img_size`` px;
* rotation is done on tensors with ``grid_sample`` (bilinear, zero fill) so that the gradient
  map is the gradient w.r.t. the *input* image (the back-rotation of the official code is
  the adjoint of the differentiable rotation);
* the ``n_transforms_test`` test-time views use the same ``T`` random angles (drawn once from
  ``seed``) for every test image, so a score never depends on the batch it was predicted in;
  scores and gradient maps come from the same views (official: random views for scores,
  evenly spaced fixed rotations for maps);
* ColorJitter factors are applied in the fixed order brightness, contrast, saturation
  (torchvision draws a random order); off in both presets, as in the released config;
* ``feature_pool`` (``cpu`` preset only): the frozen AlexNet features of ``feature_pool``
  random views per training image are extracted once and every epoch draws ``n_transforms``
  of them per image; the ``paper`` preset (``feature_pool = 0``) draws fresh views each epoch.

Backbone (``arch`` option, default the official ``alexnet``): another torchvision CNN gives the
multi-scale average-pooled output of its last default tap (``fsad_bench.components.backbone.TAPS``; e.g.
``mobilenet_v2``: ``features.13``, 96 channels per scale) — a deviation, labelled in tables.

Presets: ``paper`` is the official configuration above. ``cpu`` (2-core budget: individual cell
≲ 5 s, aggregated fit ≲ 30 s at image size 128) uses ``img_size = 128`` and ``n_scales = 2``
(128 and 64 px: AlexNet's ``features`` need ≥ 63 px input, so a 32 px third scale is
impossible; 512 features), 4 blocks with 256 hidden units, 4 × 8 = 32 epochs on a 16-view
feature pool with lr 1e-3 (6× fewer epochs than official, so 5× the official 2e-4: at 2e-4 the
NLL hardly moves in 32 epochs), 8 test views. ``diffnet+`` cpu: 3 × 8 = 24 pre-training
epochs on an 8-view pool, 16 fine-tuning epochs.

``diffnet`` (individual protocol): the flow is trained from scratch on the k support images,
as DifferNet itself. ``diffnet+`` (aggregated protocol, the "DiffNet+" baseline of RegAD,
Huang et al., ECCV 2022): ``fit`` pre-trains the flow on the normal images of all other
categories with DifferNet's schedule; ``adapt`` fine-tunes a copy of the pre-trained flow on
the support set (``finetune_epochs``; ``paper`` preset: DifferNet's full 192 epochs, our
assumption — the RegAD paper gives no schedule), starting from the pre-trained weights every
time.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from FrEIA.modules import GLOWCouplingBlock, PermuteRandom
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from fsad_bench.adapter import Adapter, TrainSet
from fsad_bench.components.augment import affine_warp
from fsad_bench.components.backbone import IMAGENET_MEAN, IMAGENET_STD, TAPS, FeatureExtractor
from fsad_bench.data.torch_datasets import TensorImages
from fsad_bench.components.maps import gaussian_blur

ALEXNET_CHANNELS = 256  # channels of AlexNet's last ``features`` map
ALEXNET_MIN_SIZE = 63  # smallest input size AlexNet's ``features`` accept


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
    """Coupling subnet of DifferNet: 3 hidden ``Linear → Dropout → ReLU`` layers and a linear output."""

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
def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``(B, C, H, W)`` by ``angles`` ``(B,)`` in radians about the centre; bilinear, zero
    (black) fill like torchvision's ``RandomRotation``. Differentiable w.r.t. ``x``."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return affine_warp(x, theta.to(x), padding_mode="zeros")


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation with per-image ``factors`` ``(B, 3)`` (1 = unchanged),
    torchvision's formulas, applied in this order; output clamped to [0, 1]."""
    b, c, s = (factors[:, i].view(-1, 1, 1, 1).to(x) for i in range(3))
    x = (x * b).clamp(0, 1)
    grey = TF.rgb_to_grayscale(x)
    x = (c * x + (1 - c) * grey.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    grey = TF.rgb_to_grayscale(x)
    return (s * x + (1 - s) * grey).clamp(0, 1)


class DifferNetViews:
    """DifferNet's random transforms: resize to ``img_size``, random rotation in
    ``±rotation`` degrees, optional colour jitter (factors uniform in ``[1 − a, 1 + a]``)."""

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


# -- adapters -------------------------------------------------------------------------------
class DiffNet(Adapter):
    """DifferNet trained from scratch on the support set (individual protocol)."""

    name = "diffnet"
    protocol = "individual"
    paper = "DifferNet (Rudolph et al., WACV 2021)"
    bookkeeping_options = frozenset({"view_chunk"})
    presets: dict[str, dict[str, Any]] = {
        "paper": {"arch": "alexnet", "img_size": 448, "n_scales": 3, "n_coupling_blocks": 8, "fc_internal": 2048,
                  "clamp_alpha": 3.0, "dropout": 0.0, "lr": 2e-4, "betas": (0.8, 0.8), "eps": 1e-4,
                  "weight_decay": 1e-5, "meta_epochs": 24, "sub_epochs": 8, "batch_size": 24,
                  "n_transforms": 4, "n_transforms_test": 64, "rotation": 180.0, "brightness": 0.0,
                  "contrast": 0.0, "saturation": 0.0, "feature_pool": 0, "grad_sigma": 3.0,
                  "view_chunk": 64},
        "cpu": {"arch": "alexnet", "img_size": 128, "n_scales": 2, "n_coupling_blocks": 4, "fc_internal": 256,
                "clamp_alpha": 3.0, "dropout": 0.0, "lr": 1e-3, "betas": (0.8, 0.8), "eps": 1e-4,
                "weight_decay": 1e-5, "meta_epochs": 4, "sub_epochs": 8, "batch_size": 24,
                "n_transforms": 4, "n_transforms_test": 8, "rotation": 180.0, "brightness": 0.0,
                "contrast": 0.0, "saturation": 0.0, "feature_pool": 16, "grad_sigma": 3.0,
                "view_chunk": 64},
    }

    def __init__(self, config=None):
        super().__init__(config)
        hp = self.hparams
        if hp["arch"] == "alexnet" and hp["img_size"] // 2 ** (hp["n_scales"] - 1) < ALEXNET_MIN_SIZE:
            raise ValueError(f"img_size {hp['img_size']} with {hp['n_scales']} scales gives a smallest scale below "
                             f"AlexNet's minimum input of {ALEXNET_MIN_SIZE} px")
        torch.manual_seed(self.config.seed)
        self.extractor = AlexNetMultiScale(self.config.weights, hp["n_scales"], hp["arch"]).to(self.device)
        self.weights_tag = self.extractor.weights_tag
        self.flow = self.new_flow()
        self.views = DifferNetViews(hp["img_size"], hp["rotation"], hp["brightness"], hp["contrast"],
                                    hp["saturation"])
        self._trained = False

    @property
    def input_size(self) -> int:
        """Images are wanted at ``img_size`` px (DifferNet resizes the original photo to it)."""
        return int(self.hparams["img_size"])

    def new_flow(self) -> SequenceINN:
        hp = self.hparams
        return build_flow(self.extractor.n_feat, hp["n_coupling_blocks"], hp["fc_internal"], hp["clamp_alpha"],
                          hp["dropout"]).to(self.device)

    # -- training -------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Features of one random view per image: ``(B, 3, S, S)`` -> ``(B, n_feat)``."""
        return self.extractor(self.views(images.to(self.device), generator))

    @torch.no_grad()
    def feature_pool(self, data: Dataset, n_views: int, generator: torch.Generator) -> torch.Tensor:
        """Features of ``n_views`` random views of every image of ``data``: ``(N, n_views, n_feat)``."""
        pool = []
        per_batch = max(1, self.hparams["view_chunk"] // n_views)
        for batch in DataLoader(data, batch_size=per_batch, shuffle=False):
            views = batch.repeat_interleave(n_views, dim=0)
            pool.append(self.features(views, generator).view(batch.shape[0], n_views, -1))
        return torch.cat(pool)

    def train_flow(self, flow: SequenceINN, data: Dataset, epochs: int, generator: torch.Generator) -> list[float]:
        """Train ``flow`` by DifferNet's NLL on augmented views of ``data``; returns the mean loss per epoch."""
        hp = self.hparams
        params = [p for p in flow.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                                     weight_decay=hp["weight_decay"])
        n_t, bs = hp["n_transforms"], hp["batch_size"]
        pool = self.feature_pool(data, hp["feature_pool"], generator) if hp["feature_pool"] > 0 else None
        flow.train()
        history = []
        for _ in range(epochs):
            losses = []
            if pool is not None:  # draw n_transforms distinct pooled views per image
                order = torch.randperm(pool.shape[0], generator=generator)
                batches = []
                for i in range(0, len(order), bs):
                    idx = order[i : i + bs]
                    pick = torch.rand(len(idx), pool.shape[1], generator=generator).argsort(dim=1)[:, :n_t]
                    batches.append(pool[idx[:, None], pick].flatten(0, 1))
            else:
                batches = (self.features(b.repeat_interleave(n_t, dim=0), generator)
                           for b in DataLoader(data, batch_size=bs, shuffle=True, generator=generator))
            for feats in batches:
                optimizer.zero_grad()
                loss = nll_per_sample(*flow(feats.to(self.device))).mean()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            history.append(float(np.mean(losses)))
        flow.eval()
        return history

    @property
    def epochs(self) -> int:
        return self.hparams["meta_epochs"] * self.hparams["sub_epochs"]

    def _generator(self, tag: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1000 + tag)

    def fit(self, train: TrainSet) -> None:
        """Train a fresh flow on the images of ``train`` (individual protocol: the support set)."""
        if self._trained:  # fit again = from scratch again
            torch.manual_seed(self.config.seed)
            self.flow = self.new_flow()
        self.loss_history = self.train_flow(self.flow, ConcatDataset(list(train.values())), self.epochs,
                                            self._generator(1))
        self._trained = True

    def adapt(self, support: torch.Tensor) -> None:
        """Nothing left to do after ``fit``; trains on ``support`` when ``fit`` was skipped."""
        if not self._trained:
            self.fit({"support": TensorImages(support.cpu())})

    # -- scoring --------------------------------------------------------------------------
    @property
    def scoring_flow(self) -> SequenceINN:
        return self.flow

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(N,)`` = mean z² over ``n_transforms_test`` views; maps ``(N, S, S)`` = squared
        mean |∂NLL/∂image| over channels and views, Gaussian-smoothed (DifferNet's gradient maps)."""
        hp = self.hparams
        flow = self.scoring_flow.eval()
        n_views = hp["n_transforms_test"]
        angles, factors = self.views.sample(n_views, self._generator(2))  # same views for every image
        size = images.shape[-1]
        sigma = hp["grad_sigma"] * size / hp["img_size"]
        per_chunk = max(1, hp["view_chunk"] // n_views)
        scores, maps = [], []
        for i in range(0, len(images), per_chunk):
            batch = images[i : i + per_chunk].to(self.device)
            b = batch.shape[0]
            x = batch.repeat_interleave(n_views, dim=0).requires_grad_(True)  # (b·T, 3, S, S)
            with torch.enable_grad():
                z, log_jac = flow(self.extractor(self.views.apply(x, angles.repeat(b), factors.repeat(b, 1))))
                (grad,) = torch.autograd.grad(nll_per_sample(z, log_jac).sum(), x)
            if sigma > 0:
                grad = gaussian_blur(grad, sigma)
            grad_map = grad.abs().mean(dim=1).view(b, n_views, size, size).mean(dim=1) ** 2
            scores.append(z.detach().pow(2).view(b, -1).mean(dim=1).cpu())
            maps.append(grad_map.cpu())
        return torch.cat(scores), torch.cat(maps)

    def state_dict(self) -> dict[str, Any]:
        """Only the flow is trained (the AlexNet is frozen)."""
        return {"flow": self.flow.state_dict()}


class DiffNetPlus(DiffNet):
    """DifferNet pre-trained on all other categories, fine-tuned on the support set (aggregated)."""

    name = "diffnet+"
    protocol = "aggregated"
    paper = "DiffNet+ baseline of RegAD (Huang et al., ECCV 2022), after DifferNet (Rudolph et al., WACV 2021)"
    presets = {
        "paper": {**DiffNet.presets["paper"], "finetune_epochs": 192},
        "cpu": {**DiffNet.presets["cpu"], "meta_epochs": 3, "sub_epochs": 8, "feature_pool": 8,
                "finetune_epochs": 16},
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.adapted: SequenceINN | None = None

    def fit(self, train: TrainSet) -> None:
        """Pre-train the flow on the normal images of every category in ``train``."""
        super().fit(train)

    def adapt(self, support: torch.Tensor) -> None:
        """Fine-tune a copy of the pre-trained flow on ``support`` ``(K, 3, S, S)``; the
        pre-trained flow itself is never changed, so every adaptation starts from it."""
        self.adapted = copy.deepcopy(self.flow)
        self.loss_history = self.train_flow(self.adapted, TensorImages(support.cpu()),
                                            self.hparams["finetune_epochs"], self._generator(3))

    @property
    def scoring_flow(self) -> SequenceINN:
        return self.adapted if self.adapted is not None else self.flow
