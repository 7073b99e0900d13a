"""Reader of a normal/abnormal folder pair (``layout = "folder"``, like anomalib's ``Folder``): one
category per root, normal images in ``<root>/<normal_dir>``, defective ones in ``<root>/<abnormal_dir>``,
masks (optional) in ``<root>/<mask_dir>`` named like their image (or ``<stem>_mask``); normal test
images from ``<root>/<normal_test_dir>`` or, without one, a seeded ``normal_split_ratio`` share of
the normal images (anomalib's ``Folder`` default 0.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fsad_bench.data.dataset import (
    CategorySplit,
    Dataset,
    TestSample,
    check_split,
    existing_root,
    find_mask,
    images_in,
    mask_index,
    select_categories,
)
from fsad_bench.errors import FsadError


@dataclass
class FolderPairSpec:
    """Sub-folders of a :class:`FolderPairDataset` (relative to its root)."""

    normal_dir: str = "good"
    abnormal_dir: str = "defect"
    mask_dir: str | None = None
    normal_test_dir: str | None = None
    normal_split_ratio: float = 0.2
    seed: int = 0
    category: str | None = None

    @classmethod
    def from_dict(cls, d: dict | None, source: str = "folder") -> FolderPairSpec:
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise FsadError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(cls.__dataclass_fields__)})")
        return cls(**d)


class FolderPairDataset(Dataset):
    """One category from a normal folder and an abnormal folder (anomalib ``Folder``-like).

    Training images: the normal images minus the normal test images, which are
    ``normal_test_dir``'s images or, without one, ``round(normal_split_ratio · N)`` normal
    images drawn with ``seed`` (at least one). Masks: ``mask_dir/<stem>[_mask].<ext>``; without
    ``mask_dir`` defective images get all-zero masks (pixel metrics are then meaningless).
    Category name: ``spec.category`` or the root folder's name.
    """

    def __init__(
        self,
        root: str | Path,
        name: str | None = None,
        categories: list[str] | None = None,
        spec: FolderPairSpec | dict | None = None,
    ):
        self.root = existing_root(root, "a folder with normal and abnormal image sub-folders")
        self.spec = spec if isinstance(spec, FolderPairSpec) else FolderPairSpec.from_dict(spec)
        self.name = name or self.root.name
        cat = self.spec.category or self.root.name
        self.categories = select_categories([cat], categories, self.root, "the folder dataset's category {c}")
        self._split: CategorySplit | None = None

    def split(self, category: str) -> CategorySplit:
        if category not in self.categories:
            raise self._unknown(category)
        if self._split is not None:
            return self._split
        s = self.spec
        normal_dir, abnormal_dir = self.root / s.normal_dir, self.root / s.abnormal_dir
        for d in (normal_dir, abnormal_dir):
            if not d.is_dir():
                raise FsadError(f"folder dataset {self.root}: missing folder {d}")
        normal = images_in(normal_dir)
        if s.normal_test_dir:
            test_good = images_in(self.root / s.normal_test_dir)
            train = normal
        else:
            if not 0 < s.normal_split_ratio < 1:
                raise FsadError(
                    f"folder dataset {self.root}: normal_split_ratio must be in (0, 1), got {s.normal_split_ratio}"
                )
            n_test = max(1, round(s.normal_split_ratio * len(normal))) if len(normal) > 1 else 0
            pick = set(np.random.default_rng(s.seed).choice(len(normal), size=n_test, replace=False).tolist())
            test_good = [p for i, p in enumerate(normal) if i in pick]
            train = [p for i, p in enumerate(normal) if i not in pick]
        index = mask_index(self.root / s.mask_dir) if s.mask_dir else None
        test = [TestSample(p, 0, "good", None) for p in test_good]
        for img in images_in(abnormal_dir):
            mask = find_mask(self.root / s.mask_dir, img, index) if s.mask_dir else None
            test.append(TestSample(img, 1, abnormal_dir.name, mask))
        self._split = check_split(CategorySplit(self.name, category, self.root, train, test), self.root)
        return self._split
