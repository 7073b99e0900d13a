"""``random``: a seeded random scorer, the chance-level reference (AUROC ≈ 50%)."""

from __future__ import annotations

import torch

from fsad_bench.adapter import Adapter


class RandomScorer(Adapter):
    """Image scores and maps drawn uniformly at random (from torch's RNG, which the run layer
    seeds per cell, so every run differs and the same command repeats)."""

    name = "random"
    protocol = "training-free"
    paper = "chance level"

    def adapt(self, support: torch.Tensor) -> None:
        self._generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = images.shape
        maps = torch.rand(n, h, w, generator=self._generator)
        return torch.rand(n, generator=self._generator), maps
