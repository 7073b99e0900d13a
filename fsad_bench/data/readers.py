"""Dataset readers: MVTec AD folder layout (MVTec AD, MPDD, BTAD, synthetic), VisA's split CSV,
a generic normal/abnormal folder pair (like anomalib's ``Folder``), and several roots pooled.

MVTec layout (``layout = "mvtec"``)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

BTAD names its normal folders ``ok`` and its masks ``<stem>.png``; both are accepted. A
sub-folder of the root without ``train/good`` is skipped with a warning naming it (an error when
the suite lists that category).

VisA layout (``layout = "visa"``): ``<root>/split_csv/1cls.csv`` with the columns ``object, split,
label, image, mask`` (split ``train``/``test``, label ``normal``/``anomaly``; image and mask paths
relative to ``<root>``). Categories are the ``object`` values.

Folder layout (``layout = "folder"``, :class:`GenericFolderDataset`): one category per root,
normal images in ``<root>/<normal_dir>``, defective ones in ``<root>/<abnormal_dir>``, masks
(optional) in ``<root>/<mask_dir>`` named like their image (or ``<stem>_mask``); normal test
images from ``<root>/<normal_test_dir>`` or, without one, a seeded ``normal_split_ratio`` share
of the normal images (anomalib's ``Folder`` default 0.2).

``layout = "auto"``: VisA when ``<root>/split_csv/1cls.csv`` exists, else MVTec.

Several roots (``data_root = [a, b]``) are pooled into one :class:`PooledDataset` whose categories
are those of every root; a category name found in two roots is an error (categories name result
files and cells, so they must be unique; rename one folder).

Files: PNG, JPEG, BMP, TIFF (any case of the suffix). Images are returned as float tensors in
[0, 1] of shape ``(3, S, S)`` (grayscale replicated; 16-bit scaled by 65535, not clipped; alpha
dropped); masks as ``(S, S)`` float tensors with values in {0, 1}; a mask must have its image's
size (FsadError naming both files otherwise). Normal test images get all-zero masks.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fsad_bench.errors import FsadError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
NORMAL_DIRS = ("good", "ok")
LAYOUTS = ("auto", "mvtec", "visa", "folder")
VISA_SPLIT = Path("split_csv") / "1cls.csv"

#: Categories of the public datasets, as their archives name them.
KNOWN_DATASETS: dict[str, list[str]] = {
    "mvtec": [
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
        "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
    ],
    "mpdd": ["bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"],
    "btad": ["01", "02", "03"],
    "visa": ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
             "pcb3", "pcb4", "pipe_fryum"],
    "synthetic": [],  # whatever `fsad-bench synth` wrote
}


class DataWarning(UserWarning):
    """Something in a data folder was skipped (the message names it)."""


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def _normal_dir(parent: Path) -> Path | None:
    for name in NORMAL_DIRS:
        if (parent / name).is_dir():
            return parent / name
    return None


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


def _mask_index(gt_dir: Path) -> dict[str, Path]:
    """Lower-cased file name -> path of the image files in ``gt_dir``."""
    return {p.name.lower(): p for p in _images_in(gt_dir)}


def _find_mask(gt_dir: Path, image: Path, index: dict[str, Path] | None = None) -> Path:
    index = _mask_index(gt_dir) if index is None else index
    stem = image.stem.lower()
    suffixes = [".png", image.suffix.lower()] + sorted(IMAGE_SUFFIXES)
    for base in (f"{stem}_mask", stem):
        for s in suffixes:
            if base + s in index:
                return index[base + s]
    raise FsadError(f"missing ground-truth mask for {image}: expected {gt_dir / (image.stem + '_mask.png')}")


def _check_split(split: CategorySplit, where: Path) -> CategorySplit:
    if not split.train:
        raise FsadError(f"no training images for {split.name} in {where} (expected normal *.png/*.jpg images)")
    if not split.test:
        raise FsadError(f"no test images for {split.name} in {where}")
    if {s.label for s in split.test} != {0, 1}:
        raise FsadError(f"{where}: {split.name} needs both normal and defective test images for AUROC")
    return split


class BaseDataset:
    """What the engine and sampler use: ``name``, ``root``, ``roots``, ``categories``, ``split(c)``."""

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


def _existing_root(root: str | Path, expected: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FsadError(f"data root {path} does not exist (expected {expected})")
    return path


def _select(found: list[str], categories: list[str] | None, root: Path, expected: str) -> list[str]:
    if categories:
        missing = [c for c in categories if c not in found]
        if missing:
            raise FsadError(f"category {missing[0]!r} not found in {root} (expected {expected.format(c=missing[0])}; "
                            f"found: {', '.join(found) or 'none'})")
        return list(categories)
    if not found:
        raise FsadError(f"no category in {root}: expected {expected.format(c='<category>')}")
    return found


class FolderDataset(BaseDataset):
    """Reader for any folder in the MVTec AD layout.

    ``name`` labels the dataset in results (defaults to the folder name); ``categories``
    restricts which sub-folders are used (default: every sub-folder with ``train/good``; other
    sub-folders are skipped with a :class:`DataWarning` naming them).
    """

    def __init__(self, root: str | Path, name: str | None = None, categories: list[str] | None = None):
        self.root = _existing_root(root, "a folder with <category>/train/good")
        self.name = name or self.root.name
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        found = [p.name for p in subdirs if _normal_dir(p / "train") is not None]
        skipped = [p.name for p in subdirs if p.name not in found]
        self.categories: list[str] = _select(found, categories, self.root, f"{self.root}/{{c}}/train/good")
        if skipped and not categories:
            warnings.warn(f"{self.root}: skipping folder(s) without train/good: {', '.join(skipped)}",
                          DataWarning, stacklevel=2)
        self._splits: dict[str, CategorySplit] = {}

    def split(self, category: str) -> CategorySplit:
        """File lists of ``category``; raises FsadError on an empty train folder or a missing mask."""
        if category not in self.categories:
            raise self._unknown(category)
        if category in self._splits:
            return self._splits[category]
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
            gt_dir = croot / "ground_truth" / defect_dir.name
            index = None if is_normal else _mask_index(gt_dir)
            for img in _images_in(defect_dir):
                mask = None if is_normal else _find_mask(gt_dir, img, index)
                test.append(TestSample(img, 0 if is_normal else 1, defect_dir.name, mask))
        if not test:
            raise FsadError(f"no test images in {test_root}")
        split = _check_split(CategorySplit(self.name, category, croot, train, test), test_root)
        self._splits[category] = split
        return split


class VisaDataset(BaseDataset):
    """VisA's official split: ``<root>/split_csv/1cls.csv`` (``csv`` overrides the file).

    Rows ``object, split, label, image, mask``; train rows must be ``normal``; test rows
    ``normal`` (no mask) or ``anomaly`` (mask path, or empty for an all-zero mask). Defect
    name in results: ``anomaly``.
    """

    def __init__(self, root: str | Path, name: str | None = None, categories: list[str] | None = None,
                 csv_path: str | Path | None = None):
        self.root = _existing_root(root, f"a VisA folder with {VISA_SPLIT}")
        self.name = name or self.root.name
        self.csv_path = Path(csv_path).expanduser() if csv_path else self.root / VISA_SPLIT
        if not self.csv_path.is_file():
            raise FsadError(f"VisA split file {self.csv_path} does not exist (expected columns "
                            f"object,split,label,image,mask)")
        self._rows: dict[str, list[dict[str, str]]] = {}
        try:
            with self.csv_path.open(newline="") as f:
                reader = csv.DictReader(f)
                need = {"object", "split", "label", "image", "mask"}
                if not need <= set(reader.fieldnames or []):
                    raise FsadError(f"{self.csv_path}: expected columns object,split,label,image,mask, "
                                    f"got {','.join(reader.fieldnames or [])}")
                for row in reader:
                    self._rows.setdefault(row["object"].strip(), []).append(row)
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise FsadError(f"cannot read VisA split file {self.csv_path}: {err}") from None
        self.categories = _select(sorted(self._rows), categories, self.root, f"rows with object {{c}} in {self.csv_path}")
        self._splits: dict[str, CategorySplit] = {}

    def _path(self, rel: str, line: str) -> Path:
        p = self.root / rel.strip()
        if not p.is_file():
            raise FsadError(f"{self.csv_path}: {line} names {p}, which does not exist")
        return p

    def split(self, category: str) -> CategorySplit:
        if category not in self.categories:
            raise self._unknown(category)
        if category in self._splits:
            return self._splits[category]
        train: list[Path] = []
        test: list[TestSample] = []
        for row in self._rows[category]:
            split, label = row["split"].strip().lower(), row["label"].strip().lower()
            what = f"row {category},{row['split']},{row['label']},{row['image']}"
            if label not in ("normal", "anomaly") or split not in ("train", "test"):
                raise FsadError(f"{self.csv_path}: {what}: expected split train|test and label normal|anomaly")
            image = self._path(row["image"], what)
            if split == "train":
                if label != "normal":
                    raise FsadError(f"{self.csv_path}: {what}: a training image must be normal")
                train.append(image)
            elif label == "normal":
                test.append(TestSample(image, 0, "good", None))
            else:
                mask = self._path(row["mask"], what) if (row.get("mask") or "").strip() else None
                test.append(TestSample(image, 1, "anomaly", mask))
        split = _check_split(CategorySplit(self.name, category, self.root / category, sorted(train), test),
                             self.csv_path)
        self._splits[category] = split
        return split


@dataclass
class FolderSpec:
    """Sub-folders of a :class:`GenericFolderDataset` (relative to its root)."""

    normal_dir: str = "good"
    abnormal_dir: str = "defect"
    mask_dir: str | None = None
    normal_test_dir: str | None = None
    normal_split_ratio: float = 0.2
    seed: int = 0
    category: str | None = None

    @classmethod
    def from_dict(cls, d: dict | None, source: str = "folder") -> "FolderSpec":
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise FsadError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(cls.__dataclass_fields__)})")
        return cls(**d)


class GenericFolderDataset(BaseDataset):
    """One category from a normal folder and an abnormal folder (anomalib ``Folder``-like).

    Training images: the normal images minus the normal test images, which are
    ``normal_test_dir``'s images or, without one, ``round(normal_split_ratio · N)`` normal
    images drawn with ``seed`` (at least one). Masks: ``mask_dir/<stem>[_mask].<ext>``; without
    ``mask_dir`` defective images get all-zero masks (pixel metrics are then meaningless).
    Category name: ``spec.category`` or the root folder's name.
    """

    def __init__(self, root: str | Path, name: str | None = None, categories: list[str] | None = None,
                 spec: FolderSpec | dict | None = None):
        self.root = _existing_root(root, "a folder with normal and abnormal image sub-folders")
        self.spec = spec if isinstance(spec, FolderSpec) else FolderSpec.from_dict(spec)
        self.name = name or self.root.name
        cat = self.spec.category or self.root.name
        self.categories = _select([cat], categories, self.root, "the folder dataset's category {c}")
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
        normal = _images_in(normal_dir)
        if s.normal_test_dir:
            test_good = _images_in(self.root / s.normal_test_dir)
            train = normal
        else:
            if not 0 < s.normal_split_ratio < 1:
                raise FsadError(f"folder dataset {self.root}: normal_split_ratio must be in (0, 1), "
                                f"got {s.normal_split_ratio}")
            n_test = max(1, round(s.normal_split_ratio * len(normal))) if len(normal) > 1 else 0
            pick = set(np.random.default_rng(s.seed).choice(len(normal), size=n_test, replace=False).tolist())
            test_good = [p for i, p in enumerate(normal) if i in pick]
            train = [p for i, p in enumerate(normal) if i not in pick]
        index = _mask_index(self.root / s.mask_dir) if s.mask_dir else None
        test = [TestSample(p, 0, "good", None) for p in test_good]
        for img in _images_in(abnormal_dir):
            mask = _find_mask(self.root / s.mask_dir, img, index) if s.mask_dir else None
            test.append(TestSample(img, 1, abnormal_dir.name, mask))
        self._split = _check_split(CategorySplit(self.name, category, self.root, train, test), self.root)
        return self._split


class PooledDataset(BaseDataset):
    """Categories of several datasets as one dataset named ``name`` (category names must be unique)."""

    def __init__(self, parts: list[BaseDataset], name: str):
        if not parts:
            raise FsadError("no data roots given")
        self.parts, self.name = parts, name
        self.root = parts[0].root
        self._owner: dict[str, BaseDataset] = {}
        for ds in parts:
            for c in ds.categories:
                if c in self._owner:
                    raise FsadError(f"category {c!r} is in both {self._owner[c].root} and {ds.root}: pooled roots "
                                    f"need distinct category names (rename one folder)")
                self._owner[c] = ds
        self.categories = [c for ds in parts for c in ds.categories]

    @property
    def roots(self) -> list[Path]:
        return [r for ds in self.parts for r in ds.roots]

    def __repr__(self) -> str:
        return f"PooledDataset({self.name!r}, roots={[str(r) for r in self.roots]}, categories={len(self.categories)})"

    def split(self, category: str) -> CategorySplit:
        if category not in self._owner:
            raise FsadError(f"unknown category {category!r} in {', '.join(map(str, self.roots))} "
                            f"(have: {', '.join(self.categories)})")
        split = self._owner[category].split(category)
        return CategorySplit(self.name, split.name, split.root, split.train, split.test)


# -- reading files ------------------------------------------------------------------------
def _as_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB view of any PIL image: 16-bit and 32-bit integer images are scaled (not clipped),
    float images clipped to [0, 1] (or scaled by 1/255 when their values exceed 1), alpha dropped."""
    if im.mode in ("RGB", "L", "P", "RGBA", "LA", "1", "CMYK", "YCbCr", "PA", "La", "RGBa"):
        return im.convert("RGB")
    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64)
        arr = arr / 255.0 if np.nanmax(arr) > 1 else arr
    elif arr.dtype.kind in "iu":
        arr = arr.astype(np.float64) / (65535.0 if im.mode.startswith("I") else np.iinfo(arr.dtype).max)
    else:
        return im.convert("RGB")
    arr8 = (np.clip(np.nan_to_num(arr), 0, 1) * 255 + 0.5).astype(np.uint8)
    if arr8.ndim == 3:
        arr8 = arr8[..., :3] if arr8.shape[-1] >= 3 else arr8[..., 0]
    return Image.fromarray(arr8).convert("RGB")


def _mask_array(im: Image.Image) -> np.ndarray:
    """Boolean defect mask of a PIL image (1 = defect): binarised at half the value range; a
    label image whose values all lie below half range (0/1 masks, VisA-style ids) at > 0."""
    arr = np.asarray(im.convert("L") if im.mode in ("P", "1", "LA", "RGBA", "RGB", "CMYK", "YCbCr") else im)
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    if arr.dtype == bool:
        return arr
    full = 65535.0 if im.mode.startswith("I") else (1.0 if arr.dtype.kind == "f" else float(np.iinfo(arr.dtype).max))
    half = full / 2
    return arr > half if arr.max() > half else arr > 0


def image_size_of(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image from its header; FsadError if unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise FsadError(f"cannot read image {path}: {err.__class__.__name__}: {err}") from None


def load_image(path: Path, size: int) -> torch.Tensor:
    """Read an RGB image resized to ``(3, size, size)`` in [0, 1]; FsadError if unreadable."""
    try:
        with Image.open(path) as im:
            im = _as_rgb(im)
            im = TF.resize(im, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
            return TF.to_tensor(im)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise FsadError(f"cannot read image {path}: {err.__class__.__name__}: {err}") from None


def _size_error(mask: Path, msize: tuple[int, int], image: Path, isize: tuple[int, int]) -> FsadError:
    return FsadError(f"mask {mask} is {msize[0]}x{msize[1]} but its image {image} is {isize[0]}x{isize[1]} "
                     f"(a mask must have its image's size)")


def load_mask(path: Path | None, size: int, image: Path | None = None) -> torch.Tensor:
    """Binary mask ``(size, size)`` (1 = defect); all zeros when ``path`` is None. With ``image``,
    FsadError unless the mask has that image's size."""
    if path is None:
        return torch.zeros(size, size)
    try:
        with Image.open(path) as im:
            if image is not None and im.size != image_size_of(image):
                raise _size_error(path, im.size, image, image_size_of(image))
            m = Image.fromarray(_mask_array(im).astype(np.uint8) * 255)
            m = TF.resize(m, [size, size], interpolation=InterpolationMode.NEAREST)
            return (TF.to_tensor(m)[0] > 0.5).float()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise FsadError(f"cannot read mask {path}: {err.__class__.__name__}: {err}") from None


#: Formats whose end is checked from the file's tail: (bytes read from the end, end marker, reason).
_TAIL_MARKERS = {"PNG": (12, b"IEND", "no IEND chunk at the end (truncated PNG)"),
                 "JPEG": (1024, b"\xff\xd9", "no end-of-image marker (truncated JPEG)")}


def _truncation(path: Path, im: Image.Image, nbytes: int) -> str | None:
    """Why ``path`` looks truncated, from its tail bytes (PNG IEND, JPEG EOI) or, for other formats
    (BMP, TIFF), a full decode; None when complete."""
    if im.format in _TAIL_MARKERS:
        tail, marker, reason = _TAIL_MARKERS[im.format]
        with path.open("rb") as f:
            f.seek(max(0, nbytes - tail))
            return None if marker in f.read() else reason
    im.load()  # BMP, TIFF and others: decode (raises on truncation)
    return None


def check_file(path: Path, what: str = "image") -> tuple[int, int]:
    """Open ``path``'s header, check it is complete (cheap tail check, see :func:`_truncation`);
    returns ``(width, height)``; FsadError naming the file otherwise."""
    try:
        nbytes = path.stat().st_size
        if nbytes == 0:
            raise FsadError(f"cannot read {what} {path}: empty file (0 bytes)")
        with Image.open(path) as im:
            why = _truncation(path, im, nbytes)
            size = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise FsadError(f"cannot read {what} {path}: {err.__class__.__name__}: {err}") from None
    if why:
        raise FsadError(f"cannot read {what} {path}: {why}")
    return size


def verify_readable(data: BaseDataset | CategorySplit | Iterable[CategorySplit],
                    categories: list[str] | None = None) -> int:
    """Open the header of every image and mask of ``data`` (a dataset, a split or several), check
    each is complete and each mask has its image's size; returns the number of files checked.

    Cost: a header read plus a tail read per file (PNG/JPEG), a full decode only for other
    formats (BMP, TIFF): ~0.1 ms per PNG, about a second for MVTec bottle. Raises FsadError naming
    the first bad file.
    """
    if isinstance(data, BaseDataset):
        splits: Iterable[CategorySplit] = (data.split(c) for c in (categories or data.categories))
    elif isinstance(data, CategorySplit):
        splits = [data]
    else:
        splits = data
    n = 0
    for split in splits:
        for p in split.train:
            check_file(p)
            n += 1
        for s in split.test:
            isize = check_file(s.path)
            n += 1
            if s.mask_path is not None:
                msize = check_file(s.mask_path, "mask")
                n += 1
                if msize != isize:
                    raise _size_error(s.mask_path, msize, s.path, isize)
    return n


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
    """Load every test image and mask of a category at ``size``x``size`` (each mask checked
    against its image's size)."""
    images = load_images([s.path for s in split.test], size)
    masks = torch.stack([load_mask(s.mask_path, size, s.path) for s in split.test])
    labels = np.array([s.label for s in split.test], dtype=np.int64)
    return TestSet(images, labels, masks, [s.path for s in split.test], [s.defect for s in split.test])


def detect_layout(root: Path) -> str:
    """``visa`` when ``root/split_csv/1cls.csv`` exists, else ``mvtec``."""
    return "visa" if (root / VISA_SPLIT).is_file() else "mvtec"


def open_root(root: str | Path, name: str, categories: list[str] | None = None, layout: str = "auto",
              folder: dict | FolderSpec | None = None) -> BaseDataset:
    """One data root in ``layout`` (see the module docstring)."""
    if layout not in LAYOUTS:
        raise FsadError(f"unknown data layout {layout!r} (known: {', '.join(LAYOUTS)})")
    path = _existing_root(root, "a dataset folder")
    kind = detect_layout(path) if layout == "auto" else layout
    if kind == "visa":
        return VisaDataset(path, name=name, categories=categories)
    if kind == "folder":
        return GenericFolderDataset(path, name=name, categories=categories, spec=folder)
    return FolderDataset(path, name=name, categories=categories)


def open_folder_dataset(name: str, root: str | Path | list | tuple | None, categories: list[str] | None = None,
                        synthetic: dict | None = None, cache: Path | None = None,
                        missing_root: str = "--data-root DIR is needed", layout: str = "auto",
                        folder: dict | FolderSpec | None = None) -> BaseDataset:
    """The dataset ``name`` at ``root`` (one folder or a list pooled into one dataset) in ``layout``;
    without a root, the built-in ``synthetic`` dataset is generated (once) into
    ``cache/synthetic/<parameters>`` from the ``synthetic`` parameters.

    With several roots, ``categories`` selects among the pooled categories."""
    roots = [r for r in root if r] if isinstance(root, (list, tuple)) else ([root] if root else [])
    if not roots:
        if name != "synthetic":
            raise FsadError(f"{missing_root}: the {name} folder in the MVTec AD layout "
                            f"(<category>/train/good, test/, ground_truth/), a VisA folder or a list of them")
        from fsad_bench.data.synthetic import generate

        params = {"categories": 4, "seed": 0, **(synthetic or {})}
        folder_path = Path(cache or ".") / "synthetic" / "-".join(f"{k}{v}" for k, v in sorted(params.items()))
        generate(folder_path, **params)
        roots = [folder_path]
    if len(roots) == 1:
        return open_root(roots[0], name, categories or None, layout, folder)
    with warnings.catch_warnings():
        if categories:  # listed explicitly: other folders are not skipped "silently"
            warnings.simplefilter("ignore", DataWarning)
        pooled = PooledDataset([open_root(r, name, None, layout, folder) for r in roots], name)
    if categories:
        missing = [c for c in categories if c not in pooled.categories]
        if missing:
            raise FsadError(f"category {missing[0]!r} not found in {', '.join(map(str, pooled.roots))} "
                            f"(found: {', '.join(pooled.categories)})")
        pooled.categories = list(categories)
    return pooled
