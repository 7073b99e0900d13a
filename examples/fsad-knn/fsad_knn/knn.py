"""``knn``: SPADE-like patch kNN (Cohen & Hoshen, 2020) on the shared frozen backbone (docs/adding-a-method.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsad_bench.adapter import Adapter, Interval, ListOf
from fsad_bench.components.backbone import FeatureExtractor


class KNN(Adapter):
    name = "knn"
    protocol = "training-free"  # no fit: adapt builds the memory bank from the k support images
    paper = "SPADE-like patch kNN (Cohen & Hoshen, 2020); fsad-bench example"
    presets = {"cpu": {"arch": "resnet18", "taps": ["layer1", "layer2"], "n_neighbors": 1}}
    option_constraints = {"arch": [str], "taps": [ListOf(str)], "n_neighbors": [Interval(int, 1)]}

    def __init__(self, config=None):
        super().__init__(config)  # sets self.config, self.hparams (preset + suite options), self.device
        h = self.hparams
        self.backbone = FeatureExtractor(h["arch"], self.config.weights, h["taps"]).to(self.device)
        self.weights_tag = self.backbone.weights_tag  # "imagenet" | "random-init" | "file:<name>": labels
        self.bank: torch.Tensor | None = None

    def label_tags(self) -> list[str]:
        return [self.preset_name]  # one preset, run for every suite preset: the label says which ran

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, S, S)`` in [0, 1] -> patch features ``(N, h, w, C)`` on the first tap's grid."""
        taps = self.backbone(images.to(self.device))  # list of (N, C_i, H_i, W_i)
        size = taps[0].shape[-2:]
        feats = [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in taps]
        return torch.cat(feats, 1).permute(0, 2, 3, 1).contiguous()

    def adapt(self, support: torch.Tensor) -> None:
        """Support ``(K, 3, S, S)`` -> memory bank ``(K * h * w, C)``; replaces the previous cell's bank."""
        self.bank = self.embed(support).flatten(0, 2)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, 3, S, S)`` -> scores ``(N,)`` (max of the map), maps ``(N, S, S)``: mean distance
        of each patch to its ``n_neighbors`` nearest bank patches (feature units, higher = more anomalous)."""
        emb = self.embed(images)
        n, h, w, c = emb.shape
        k = min(self.hparams["n_neighbors"], len(self.bank))
        patch = torch.stack(
            [torch.cdist(e.reshape(h * w, c), self.bank).topk(k, largest=False).values.mean(-1) for e in emb]
        ).reshape(n, 1, h, w)  # one image at a time: (h*w, bank) distances
        maps = F.interpolate(patch, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return maps.flatten(1).amax(1).cpu(), maps.cpu()
