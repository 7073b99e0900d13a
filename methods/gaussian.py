"""``gaussian``: PaDiM-style per-position Gaussian on ImageNet ResNet-18 layer1–3 features.

This is RegAD without the registration training (Huang et al., ECCV 2022, Sec. 3.3):
the support set is augmented with RegAD's 22 views, layer1–3 maps are upsampled to the
layer1 grid and concatenated (448 channels for ResNet-18), a Gaussian is fitted at every
position (covariance + εI, ε = 0.01), test positions are scored by Mahalanobis distance,
the map is upsampled to the image, smoothed (Gaussian, σ = 4 px) and its maximum is the
image score. Training-free: ``fit`` is never needed.
Backbone (``arch`` option, default ``resnet18``): any torchvision CNN with default taps in
``fsad_bench.backbone.TAPS`` (``mobilenet_v2``: features.3/6/13, 152 channels).
"""

from __future__ import annotations

import torch

from fsad_bench.adapter import Adapter
from fsad_bench.augment import augment_support
from fsad_bench.backbone import FeatureExtractor, state_hash
from fsad_bench.features import CachedBackbone
from fsad_bench.gaussian_model import PositionGaussian
from fsad_bench.maps import concat_pyramid, smooth_maps


class GaussianAdapter(Adapter):
    """Per-position Gaussian (PaDiM / RegAD test-time model) on a frozen ResNet."""

    name = "gaussian"
    protocol = "training-free"
    paper = "PaDiM (Defard et al., ICPR 2020) with RegAD's support augmentation"
    presets = {"cpu": {"arch": "resnet18", "eps": 0.01, "augment": True, "sigma": 4.0, "batch_size": 32}}

    def __init__(self, config=None):
        super().__init__(config)
        torch.manual_seed(self.config.seed)
        self.backbone = FeatureExtractor(self.hparams["arch"], self.config.weights).to(self.device)
        self.weights_tag = self.backbone.weights_tag
        # frozen backbone: test images are shared by every k and run of a category -> cache them
        # (support views differ from cell to cell: not cached)
        self.cached = CachedBackbone(self.backbone, f"{self.hparams['arch']}-{state_hash(self.backbone)}",
                                     disk=self.config.feature_cache)
        self.gaussian = PositionGaussian(eps=self.hparams["eps"])

    @torch.no_grad()
    def features(self, images: torch.Tensor, cache: bool = False) -> torch.Tensor:
        """Concatenated layer1–3 features ``(N, 448, S/4, S/4)`` computed in batches; ``cache``:
        through the feature cache (test images, shared by every k and run of a category)."""
        bs = self.hparams["batch_size"]
        backbone = self.cached if cache else self.backbone
        out = [concat_pyramid(backbone(images[i : i + bs].to(self.device))) for i in range(0, len(images), bs)]
        return torch.cat(out)

    def adapt(self, support: torch.Tensor) -> None:
        if self.hparams["augment"]:
            g = torch.Generator().manual_seed(self.config.seed)
            support = augment_support(support, generator=g)
        self.gaussian.fit(self.features(support))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.gaussian.mahalanobis(self.features(images, cache=True))
        maps = smooth_maps(dist, images.shape[-1], self.hparams["sigma"]).cpu()
        return maps.flatten(1).max(dim=1).values, maps

    def state_dict(self):  # nothing is trained
        return {}
