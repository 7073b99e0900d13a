"""``torch.utils.data.Dataset`` wrappers handed to methods' training loops: image files decoded
lazily (:class:`ImageFiles`), images already in memory (:class:`TensorImages`), labelled images
(:class:`LabelledImages`, cross-dataset training).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fsad_bench.data.images import load_image


class ImageFiles(torch.utils.data.Dataset):
    """Lazy image list for training loops: ``ds[i]`` is ``(3, size, size)`` in [0, 1] (resize filter ``resize``)."""

    def __init__(self, paths: list[Path], size: int, resize: str = "bilinear"):
        self.paths = list(paths)
        self.size = size
        self.resize = resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.size, self.resize)


class TensorImages(torch.utils.data.Dataset):
    """Images already in memory ``(N, 3, S, S)`` presented like :class:`ImageFiles`."""

    def __init__(self, images: torch.Tensor, paths: list[Path] | None = None):
        self.images = images
        self.paths = list(paths) if paths is not None else []

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class LabelledImages(torch.utils.data.Dataset):
    """Lazy labelled images (cross-dataset training): ``ds[i]`` is ``((3, size, size) in [0, 1], label)``,
    label 1 = anomalous; ``ds.labels`` lists every label without loading images."""

    def __init__(self, paths: list[Path], labels: list[int], size: int, resize: str = "bilinear"):
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.images = ImageFiles(paths, size, resize)
        self.labels = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.labels[i]
