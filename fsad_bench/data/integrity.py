"""Integrity checks before a run: every image and mask header readable, files complete (not
truncated), each mask of its image's size — so that a bad file stops planning, not the 40th cell.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from fsad_bench.data.dataset import CategorySplit, Dataset
from fsad_bench.data.images import mask_size_error, open_image
from fsad_bench.errors import FsadError

#: Formats whose end is checked from the file's tail: (bytes read from the end, end marker, reason).
_TAIL_MARKERS = {
    "PNG": (12, b"IEND", "no IEND chunk at the end (truncated PNG)"),
    "JPEG": (1024, b"\xff\xd9", "no end-of-image marker (truncated JPEG)"),
}


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
    """Open ``path``'s header, check its pixel count (:func:`~fsad_bench.data.images.check_pixels`) and
    that it is complete (cheap tail check, see :func:`_truncation`); returns ``(width, height)``;
    FsadError naming the file otherwise."""
    try:
        nbytes = path.stat().st_size
    except OSError as err:
        raise FsadError(f"cannot read {what} {path}: {err.__class__.__name__}: {err}") from None
    if nbytes == 0:
        raise FsadError(f"cannot read {what} {path}: empty file (0 bytes)")
    with open_image(path, what) as im:  # any Pillow error, and more than MAX_PIXELS pixels: FsadError
        why = _truncation(path, im, nbytes)
        size = im.size
    if why:
        raise FsadError(f"cannot read {what} {path}: {why}")
    return size


def verify_readable(
    data: Dataset | CategorySplit | Iterable[CategorySplit], categories: list[str] | None = None
) -> int:
    """Open the header of every image and mask of ``data`` (a dataset, a split or several), check
    each is complete and each mask has its image's size; returns the number of files checked.

    Cost: a header read plus a tail read per file (PNG/JPEG), a full decode only for other
    formats (BMP, TIFF): ~0.1 ms per PNG, about a second for MVTec bottle. Raises FsadError naming
    the first bad file.
    """
    if isinstance(data, Dataset):
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
                    raise mask_size_error(s.mask_path, msize, s.path, isize)
    return n
