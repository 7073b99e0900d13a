"""Reader of the MVTec AD folder layout (MVTec AD, MPDD, BTAD, the synthetic dataset)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

BTAD names its normal folders ``ok`` and its masks ``<stem>.png``; both are accepted. A
sub-folder of the root without ``train/good`` is skipped with a warning naming it (an error when
the suite lists that category).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from fsad_bench.data.dataset import (
    CategorySplit,
    Dataset,
    DataWarning,
    TestSample,
    check_split,
    existing_root,
    find_mask,
    images_in,
    mask_index,
    select_categories,
)
from fsad_bench.errors import FsadError

NORMAL_DIRS = ("good", "ok")


def _normal_dir(parent: Path) -> Path | None:
    for name in NORMAL_DIRS:
        if (parent / name).is_dir():
            return parent / name
    return None


class MVTecDataset(Dataset):
    """Reader for any folder in the MVTec AD layout.

    ``name`` labels the dataset in results (defaults to the folder name); ``categories``
    restricts which sub-folders are used (default: every sub-folder with ``train/good``; other
    sub-folders are skipped with a :class:`DataWarning` naming them).
    """

    def __init__(self, root: str | Path, name: str | None = None, categories: list[str] | None = None):
        self.root = existing_root(root, "a folder with <category>/train/good")
        self.name = name or self.root.name
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        found = [p.name for p in subdirs if _normal_dir(p / "train") is not None]
        skipped = [p.name for p in subdirs if p.name not in found]
        self.categories: list[str] = select_categories(found, categories, self.root, f"{self.root}/{{c}}/train/good")
        if skipped and not categories:
            warnings.warn(
                f"{self.root}: skipping folder(s) without train/good: {', '.join(skipped)}", DataWarning, stacklevel=2
            )
        self._splits: dict[str, CategorySplit] = {}

    def split(self, category: str) -> CategorySplit:
        """File lists of ``category``; raises FsadError on an empty train folder or a missing mask."""
        if category not in self.categories:
            raise self._unknown(category)
        if category in self._splits:
            return self._splits[category]
        croot = self.root / category
        normal = _normal_dir(croot / "train")
        train = images_in(normal) if normal else []
        if not train:
            raise FsadError(f"no training images in {croot / 'train' / 'good'} (expected *.png normal images)")
        test: list[TestSample] = []
        test_root = croot / "test"
        if not test_root.is_dir():
            raise FsadError(f"missing test folder {test_root}")
        for defect_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            is_normal = defect_dir.name in NORMAL_DIRS
            gt_dir = croot / "ground_truth" / defect_dir.name
            index = None if is_normal else mask_index(gt_dir)
            for img in images_in(defect_dir):
                mask = None if is_normal else find_mask(gt_dir, img, index)
                test.append(TestSample(img, 0 if is_normal else 1, defect_dir.name, mask))
        if not test:
            raise FsadError(f"no test images in {test_root}")
        split = check_split(CategorySplit(self.name, category, croot, train, test), test_root)
        self._splits[category] = split
        return split
