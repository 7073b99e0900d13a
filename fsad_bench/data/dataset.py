"""The dataset type every layout reader returns (:class:`Dataset`: ``name``, ``root``, ``categories``,
``split(c)``), a category's file lists (:class:`CategorySplit` of :class:`TestSample`), and the
file-listing helpers the readers share (image files of a folder, masks by image name, checks).

Files: PNG, JPEG, BMP, TIFF (any case of the suffix). Normal test images have no mask (all-zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fsad_bench.errors import FsadError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class DataWarning(UserWarning):
    """Something in a data folder was skipped (the message names it)."""


def images_in(folder: Path) -> list[Path]:
    """Image files of ``folder`` (suffixes in ``IMAGE_SUFFIXES``, hidden files skipped), sorted; [] without it."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


@dataclass(frozen=True)
class TestSample:
    """One test image: ``label`` 0 = normal, 1 = anomalous; ``mask_path`` None for normal images
    (and for defective images of datasets without masks: all-zero mask)."""

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


def mask_index(gt_dir: Path) -> dict[str, Path]:
    """Lower-cased file name -> path of the image files in ``gt_dir``."""
    return {p.name.lower(): p for p in images_in(gt_dir)}


def find_mask(gt_dir: Path, image: Path, index: dict[str, Path] | None = None) -> Path:
    """Mask of ``image`` in ``gt_dir`` (``<stem>_mask.<ext>`` or ``<stem>.<ext>``, any case); FsadError if absent."""
    index = mask_index(gt_dir) if index is None else index
    stem = image.stem.lower()
    suffixes = [".png", image.suffix.lower()] + sorted(IMAGE_SUFFIXES)
    for base in (f"{stem}_mask", stem):
        for s in suffixes:
            if base + s in index:
                return index[base + s]
    raise FsadError(f"missing ground-truth mask for {image}: expected {gt_dir / (image.stem + '_mask.png')}")


def check_split(split: CategorySplit, where: Path) -> CategorySplit:
    """``split`` unchanged, or FsadError naming ``where`` when it lacks training, normal or defective test images."""
    if not split.train:
        raise FsadError(f"no training images for {split.name} in {where} (expected normal *.png/*.jpg images)")
    if not split.test:
        raise FsadError(f"no test images for {split.name} in {where}")
    if {s.label for s in split.test} != {0, 1}:
        raise FsadError(f"{where}: {split.name} needs both normal and defective test images for AUROC")
    return split


class Dataset:
    """The dataset every layout reader returns and the run layer, protocols and sampler use: ``name``, ``root``,
    ``roots``, ``categories``, ``split(c)``."""

    name: str
    root: Path
    categories: list[str]

    @property
    def roots(self) -> list[Path]:
        return [self.root]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, root={str(self.root)!r}, categories={len(self.categories)})"

    def _unknown(self, category: str) -> FsadError:
        return FsadError(f"unknown category {category!r} in {self.root} (have: {', '.join(self.categories)})")

    def split(self, category: str) -> CategorySplit:  # pragma: no cover - abstract
        raise NotImplementedError


def existing_root(root: str | Path, expected: str) -> Path:
    """``root`` as a Path, or FsadError saying it does not exist and what was ``expected``."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FsadError(f"data root {path} does not exist (expected {expected})")
    return path


def select_categories(found: list[str], categories: list[str] | None, root: Path, expected: str) -> list[str]:
    """``categories`` (each must be in ``found``) or, when None/empty, every found one; FsadError otherwise."""
    if categories:
        missing = [c for c in categories if c not in found]
        if missing:
            raise FsadError(
                f"category {missing[0]!r} not found in {root} (expected {expected.format(c=missing[0])}; "
                f"found: {', '.join(found) or 'none'})"
            )
        return list(categories)
    if not found:
        raise FsadError(f"no category in {root}: expected {expected.format(c='<category>')}")
    return found
