"""Datasets in the MVTec AD folder layout (MVTec AD, MPDD, BTAD, synthetic).

Layout::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

BTAD names its normal folders ``ok`` and its masks ``<stem>.png``; both are accepted.
Images are returned as float tensors in [0, 1] of shape ``(3, S, S)``; masks as
``(S, S)`` float tensors with values in {0, 1}. Normal test images get all-zero masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .errors import FsadError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
NORMAL_DIRS = ("good", "ok")

#: Categories of the public datasets, as their archives name them.
KNOWN_DATASETS: dict[str, list[str]] = {
    "mvtec": [
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
        "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
    ],
    "mpdd": ["bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"],
    "btad": ["01", "02", "03"],
    "synthetic": [],  # whatever `fsad-bench synth` wrote
}


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _normal_dir(parent: Path) -> Path | None:
    for name in NORMAL_DIRS:
        if (parent / name).is_dir():
            return parent / name
    return None


@dataclass(frozen=True)
class TestSample:
    """One test image: ``label`` 0 = normal, 1 = anomalous; ``mask_path`` None for normal images."""

    path: Path
    label: int
    defect: str
    mask_path: Path | None


@dataclass
class CategorySplit:
    """File lists of one category: normal training images and labelled test images."""

    dataset: str
    name: str
    root: Path
    train: list[Path]
    test: list[TestSample] = field(default_factory=list)

    @property
    def n_anomalous(self) -> int:
        return sum(s.label for s in self.test)


def _find_mask(gt_dir: Path, image: Path) -> Path:
    candidates = [gt_dir / f"{image.stem}_mask{s}" for s in (".png", image.suffix)]
    candidates += [gt_dir / f"{image.stem}{s}" for s in (".png", ".bmp", image.suffix)]
    for c in candidates:
        if c.is_file():
            return c
    raise FsadError(f"missing ground-truth mask for {image}: expected {candidates[0]}")


class FolderDataset:
    """Reader for any folder in the MVTec AD layout.

    ``name`` labels the dataset in results (defaults to the folder name); ``categories``
    restricts which sub-folders are used (default: every sub-folder with ``train/good``).
    """

    def __init__(self, root: str | Path, name: str | None = None, categories: list[str] | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FsadError(f"data root {self.root} does not exist (expected a folder with <category>/train/good)")
        self.name = name or self.root.name
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and _normal_dir(p / "train") is not None)
        if categories:
            missing = [c for c in categories if c not in found]
            if missing:
                raise FsadError(
                    f"category {missing[0]!r} not found in {self.root} "
                    f"(expected {self.root / missing[0] / 'train' / 'good'}; found: {', '.join(found) or 'none'})"
                )
            found = list(categories)
        if not found:
            raise FsadError(f"no category in {self.root}: expected <category>/train/good/*.png folders")
        self.categories: list[str] = found

    def __repr__(self) -> str:
        return f"FolderDataset({self.name!r}, root={str(self.root)!r}, categories={len(self.categories)})"

    def split(self, category: str) -> CategorySplit:
        """File lists of ``category``; raises FsadError on an empty train folder or a missing mask."""
        if category not in self.categories:
            raise FsadError(f"unknown category {category!r} in {self.root} (have: {', '.join(self.categories)})")
        croot = self.root / category
        normal = _normal_dir(croot / "train")
        train = _images_in(normal) if normal else []
        if not train:
            raise FsadError(f"no training images in {croot / 'train' / 'good'} (expected *.png normal images)")
        test: list[TestSample] = []
        test_root = croot / "test"
        if not test_root.is_dir():
            raise FsadError(f"missing test folder {test_root}")
        for defect_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            is_normal = defect_dir.name in NORMAL_DIRS
            for img in _images_in(defect_dir):
                mask = None if is_normal else _find_mask(croot / "ground_truth" / defect_dir.name, img)
                test.append(TestSample(img, 0 if is_normal else 1, defect_dir.name, mask))
        if not test:
            raise FsadError(f"no test images in {test_root}")
        labels = {s.label for s in test}
        if labels != {0, 1}:
            raise FsadError(f"{test_root} needs both normal (good/) and defective test images for AUROC")
        return CategorySplit(self.name, category, croot, train, test)


def load_image(path: Path, size: int) -> torch.Tensor:
    """Read an RGB image resized to ``(3, size, size)`` in [0, 1]; FsadError if unreadable."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im = TF.resize(im, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
            return TF.to_tensor(im)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise FsadError(f"cannot read image {path}: {err.__class__.__name__}: {err}") from None


def load_mask(path: Path | None, size: int) -> torch.Tensor:
    """Binary mask ``(size, size)`` (1 = defect); all zeros when ``path`` is None."""
    if path is None:
        return torch.zeros(size, size)
    try:
        with Image.open(path) as im:
            im = TF.resize(im.convert("L"), [size, size], interpolation=InterpolationMode.NEAREST)
            return (TF.to_tensor(im)[0] > 0.5).float()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise FsadError(f"cannot read mask {path}: {err.__class__.__name__}: {err}") from None


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """Stack of images ``(N, 3, size, size)``."""
    return torch.stack([load_image(p, size) for p in paths]) if paths else torch.zeros(0, 3, size, size)


class ImageFiles(torch.utils.data.Dataset):
    """Lazy image list for training loops: ``ds[i]`` is ``(3, size, size)`` in [0, 1]."""

    def __init__(self, paths: list[Path], size: int):
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.size)


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

    def __init__(self, paths: list[Path], labels: list[int], size: int):
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.images = ImageFiles(paths, size)
        self.labels = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.labels[i]


@dataclass
class TestSet:
    """A category's test set in memory: images ``(N,3,S,S)``, labels ``(N,)``, masks ``(N,S,S)``."""

    images: torch.Tensor
    labels: np.ndarray
    masks: torch.Tensor
    paths: list[Path]
    defects: list[str]


def load_test_set(split: CategorySplit, size: int) -> TestSet:
    """Load every test image and mask of a category at ``size``x``size``."""
    images = load_images([s.path for s in split.test], size)
    masks = torch.stack([load_mask(s.mask_path, size) for s in split.test])
    labels = np.array([s.label for s in split.test], dtype=np.int64)
    return TestSet(images, labels, masks, [s.path for s in split.test], [s.defect for s in split.test])


def open_folder_dataset(name: str, root: str | Path | None, categories: list[str] | None = None,
                        synthetic: dict | None = None, cache: Path | None = None,
                        missing_root: str = "--data-root DIR is needed") -> FolderDataset:
    """The dataset ``name`` at ``root``; without a root, the built-in ``synthetic`` dataset is
    generated (once) into ``cache/synthetic/<parameters>`` from the ``synthetic`` parameters."""
    if root:
        folder = Path(root).expanduser()
    elif name == "synthetic":
        from .synthetic import generate

        params = {"categories": 4, "seed": 0, **(synthetic or {})}
        folder = Path(cache or ".") / "synthetic" / "-".join(f"{k}{v}" for k, v in sorted(params.items()))
        generate(folder, **params)
    else:
        raise FsadError(f"{missing_root}: the {name} folder in the MVTec AD layout "
                        f"(<category>/train/good, test/, ground_truth/)")
    return FolderDataset(folder, name=name, categories=categories or None)
