"""``gaussian``: PaDiM-style per-position Gaussian on ResNet-18 layer1–3 features.

Layer1–3 maps are upsampled to the layer1 grid and concatenated (448 channels for
ResNet-18), a Gaussian is fitted at every position (unbiased covariance + εI, ε = 0.01),
test positions are scored by Mahalanobis distance, the map is upsampled to the image
(bilinear), smoothed (Gaussian, σ = 4 px) and its maximum is the image score.
Training-free: ``fit`` is never needed.

Options (every preset sets all of them; a suite's ``[options.gaussian]`` may override any,
and values that differ from the preset's are labelled in tables):

* ``normalize`` — ImageNet mean/std normalisation of the [0, 1] input (False: raw [0, 1]
  pixels, as RegAD feeds its ResNet);
* ``augment`` — RegAD's 22-view support augmentation (:mod:`fsad_bench.components.augment`);
* ``upsample`` — how layer2/3 reach the layer1 grid: ``"nearest"`` (repetition: PaDiM's and
  RegAD's ``embedding_concat``, anomalib's ``F.interpolate(mode="nearest")``) or ``"bilinear"``;
* ``blur_border`` — border of the σ = 4 blur (kernel radius 4σ): ``"symmetric"`` (edge repeated,
  scipy ``gaussian_filter``'s default, RegAD) or ``"reflect"`` (kornia / anomalib ``F.pad``);
* ``n_features`` — None (all channels) or a random subset of that many channels, drawn once
  from ``channel_seed`` (None: the config seed) with ``torch.randperm`` (anomalib draws its
  index with Python's ``random.sample``; PaDiM's default for ResNet-18 is 100);
* ``arch`` — the backbone (default ``resnet18``): any torchvision CNN with default taps in
  ``fsad_bench.components.backbone.TAPS`` (``mobilenet_v2``: features.3/6/13, 152 channels);
* ``eps``, ``sigma``, ``batch_size`` (feature batches; no effect on the numbers).

Presets:

* ``paper`` — RegAD (Huang et al., ECCV 2022) Table 5 row "A": RegAD's test pipeline without
  registration training — raw [0, 1] input, 22 views, nearest concat, scipy border. With
  identity STNs RegAD's official image-frame test computes exactly this (test
  ``test_regad_identity_stn_equals_gaussian_paper``).
* ``padim`` — anomalib's ``PadimModel`` (all channels unless ``n_features`` is set):
  ImageNet-normalised input, no augmentation, nearest concat, ``MultiVariateGaussian``
  (unbiased covariance + 0.01 I), ``AnomalyMapGenerator`` (bilinear upsampling, Gaussian blur
  σ = 4, kernel 2·int(4σ + 0.5) + 1, reflect padding), image score = max of the map.
  Equal to an independent float64 reference of that recipe to float32 round-off (test
  ``test_gaussian_padim_equals_reference``).
* ``cpu`` — the ``paper`` pipeline (it already fits a 2-core budget).
"""

from __future__ import annotations

import torch

from fsad_bench.adapter import Adapter, Interval, OneOf
from fsad_bench.components.augment import augment_support
from fsad_bench.components.backbone import FeatureExtractor, state_hash
from fsad_bench.components.feature_cache import CachedBackbone
from fsad_bench.components.maps import ScratchBuffer, concat_pyramid, pyramid_samples, smooth_maps
from fsad_bench.components.position_gaussian import PositionGaussian
from fsad_bench.errors import FsadError

_REGAD_A = {
    "arch": "resnet18",
    "eps": 0.01,
    "normalize": False,
    "augment": True,
    "upsample": "nearest",
    "blur_border": "symmetric",
    "n_features": None,
    "channel_seed": None,
    "sigma": 4.0,
    "batch_size": 32,
}
#: Options that change the pipeline (labelled when they differ from the preset).
PIPELINE_OPTIONS = ("normalize", "augment", "upsample", "blur_border", "eps", "sigma")


class GaussianAdapter(Adapter):
    """Per-position Gaussian (PaDiM / RegAD test-time model) on a frozen ResNet."""

    name = "gaussian"
    protocol = "training-free"
    paper = "PaDiM (Defard et al., ICPR 2020); RegAD's Table 5 row A (Huang et al., ECCV 2022)"
    bookkeeping_options = frozenset({"batch_size"})
    labelled_options = frozenset(PIPELINE_OPTIONS + ("n_features",))
    presets = {
        "cpu": dict(_REGAD_A),
        "paper": dict(_REGAD_A),
        "padim": {**_REGAD_A, "normalize": True, "augment": False, "blur_border": "reflect"},
    }
    option_constraints = {
        "arch": [str],
        "eps": [Interval(float, 0, None, closed="neither")],
        "normalize": [bool],
        "augment": [bool],
        "upsample": [OneOf("nearest", "bilinear")],
        "blur_border": [OneOf("symmetric", "reflect")],
        "n_features": [None, Interval(int, 1)],
        "channel_seed": [None, Interval(int, 0)],
        "sigma": [Interval(float, 0, None, closed="neither")],
        "batch_size": [Interval(int, 1)],
    }

    def __init__(self, config=None):
        super().__init__(config)
        hp = self.hparams
        self.backbone = FeatureExtractor(hp["arch"], self.config.weights, normalize=hp["normalize"]).to(self.device)
        self.weights_tag = self.backbone.weights_tag
        # frozen backbone: test images are shared by every k and run of a category -> cache them
        # (support views differ from cell to cell: not cached); raw and normalised input differ
        norm = "imnorm" if hp["normalize"] else "raw"
        self.cached = CachedBackbone(
            self.backbone, f"{hp['arch']}-{norm}-{state_hash(self.backbone)}", disk=self.config.feature_cache
        )
        self.gaussian = PositionGaussian(eps=hp["eps"])
        self.scratch = ScratchBuffer()  # reused test-sample block (score_pyramid bands; the subset path)
        #: channel subset ``(n_features,)`` or None (all channels)
        self.channel_index: torch.Tensor | None = None
        if hp["n_features"] is not None:
            total = sum(self.backbone.channels)
            if hp["n_features"] > total:  # the channel count is known only once the backbone is built
                raise FsadError(
                    f"option 'n_features' of method 'gaussian' must be at most {total} "
                    f"(the channels of {hp['arch']}'s taps), got {hp['n_features']}"
                )
            seed = self.config.seed if hp["channel_seed"] is None else hp["channel_seed"]
            g = torch.Generator().manual_seed(seed)
            self.channel_index = torch.randperm(total, generator=g)[: hp["n_features"]]

    @torch.no_grad()
    def features(self, images: torch.Tensor, cache: bool = False) -> torch.Tensor:
        """Concatenated layer1–3 features ``(N, 448 or n_features, S/4, S/4)`` computed in batches;
        ``cache``: through the feature cache (test images, shared by every k and run of a category)."""
        bs = self.hparams["batch_size"]
        backbone = self.cached if cache else self.backbone
        out = [
            concat_pyramid(backbone(images[i : i + bs].to(self.device)), self.hparams["upsample"])
            for i in range(0, len(images), bs)
        ]
        feats = torch.cat(out)
        if self.channel_index is not None:
            feats = feats.index_select(1, self.channel_index.to(feats.device))
        return feats

    @torch.no_grad()
    def samples(self, images: torch.Tensor, cache: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
        """The same features as :meth:`features`, written once per batch straight into the
        position-major buffer ``(S/4 · S/4, N, 448 or n_features)`` the Gaussian reads (no
        concatenated or permuted copies); returns (buffer, grid)."""
        bs = self.hparams["batch_size"]
        backbone = self.cached if cache else self.backbone
        mode = self.hparams["upsample"]
        buf, grid = None, None
        for i in range(0, len(images), bs):
            maps = backbone(images[i : i + bs].to(self.device))
            if buf is None:
                grid = tuple(maps[0].shape[-2:])
                shape = (grid[0] * grid[1], len(images), sum(m.shape[1] for m in maps))
                # test batches: one reused block (consumed by the scoring); support: kept by the fit
                buf = (
                    self.scratch.get(shape, maps[0].dtype, maps[0].device)
                    if cache
                    else torch.empty(shape, dtype=maps[0].dtype, device=maps[0].device)
                )
            pyramid_samples(maps, mode, out=buf, offset=i)
        if self.channel_index is not None:  # the random channel subset (PaDiM's d): one gather
            buf = buf.index_select(2, self.channel_index.to(buf.device))
        return buf, grid

    def adapt(self, support: torch.Tensor) -> None:
        if self.hparams["augment"]:
            g = torch.Generator().manual_seed(self.config.seed)
            support = augment_support(support, generator=g)
        self.gaussian.fit_samples(*self.samples(support))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channel_index is None:  # layout fused into the scoring, band by band (no (P, B, C) buffer)
            bs = self.hparams["batch_size"]
            dist = torch.cat(
                [
                    self.gaussian.score_pyramid(
                        self.cached(images[i : i + bs].to(self.device)), self.hparams["upsample"], self.scratch
                    )
                    for i in range(0, len(images), bs)
                ]
            )
        else:
            dist = self.gaussian.score_samples(self.samples(images, cache=True)[0])
        maps = smooth_maps(dist, images.shape[-1], self.hparams["sigma"], self.hparams["blur_border"]).cpu()
        return maps.flatten(1).max(dim=1).values, maps

    def label_tags(self) -> list[str]:
        preset = self.presets[self.preset_name]
        tags = [f"{k}={self.hparams[k]}" for k in PIPELINE_OPTIONS if self.hparams[k] != preset[k]]
        if self.hparams["n_features"] is not None:
            tags.append(f"d={self.hparams['n_features']}")
        return tags

    def state_dict(self):  # nothing is trained
        return {}
