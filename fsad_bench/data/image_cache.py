"""Decoded images cached on disk per resolution, so that every cell re-reads them cheaply.

The run layer streams test images from disk in batches (memory bounded independently of the
test-set size) and loads support and training images at each adapter's own input size
(:attr:`fsad_bench.adapter.Adapter.input_size`) from the original files. Decoding an original
costs ~50 ms for a 900 px MVTec PNG, reading its cached copy ~0.5 ms; a cell re-reads its
category's whole test set, so the decoded, resized image is kept under
``<cache>/images/<size>/`` as one ``.npy`` file per (file, size): ``(3, S, S)`` uint8 when the
loader's output is exactly ``k / 255`` (PIL images always are), else float32 — either way
the tensor read back equals :func:`fsad_bench.data.images.load_image`'s bit for bit (each resize filter,
:attr:`fsad_bench.adapter.Adapter.resize_filter`, has its own entries). Disk use:
3·S² bytes per image (150 KB at 224 px, 600 KB at 448 px).

The key (:func:`cache_key`) is everything that produced an entry's pixels:

* the decoding code (:func:`decoder_fingerprint`): the source of :mod:`fsad_bench.data.images`,
  of this module and of what they import from ``fsad_bench``, and the Pillow, torchvision, torch
  and numpy versions — editing the decoder never serves pixels it no longer produces;
* the original's identity: resolved path, size, mtime, inode and ctime (``touch -r`` restores an
  mtime, not the ctime; a ``chmod`` or a rename costs a re-decode, never a wrong pixel);
* the output size ``S`` and the resize filter;
* with :attr:`ImageCache.check` ``"sample"`` (what ``fsad-bench run --force`` uses) also the
  file's size and first and last 64 KiB (:func:`fsad_bench.identity.sampled_sha256`: two reads,
  ~0.05 ms per file; exact for PNG, whose checksums sit at the end), with ``"full"``
  (``--verify-data``) the sha256 of the whole file (one read: ~1–3 ms per MB, a few times the
  cached read, still ~20x cheaper than decoding). These keys differ from the plain one, so the
  first run in each mode decodes every image once.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fsad_bench.data.images import load_image
from fsad_bench.data.torch_datasets import ImageFiles
from fsad_bench.errors import FsadError
from fsad_bench.identity import content_sha256, module_fingerprint, sampled_sha256

#: :attr:`ImageCache.check` values -> what identifies an original's content besides its metadata.
CHECKS = {
    "stat": "path, size, mtime, inode, ctime (no read)",
    "sample": "also the size and first and last 64 KiB (--force)",
    "full": "also the sha256 of the whole file (--verify-data)",
}

#: Modules whose source decides the decoded pixels (with what they import from fsad_bench).
DECODER_MODULES = ("fsad_bench.data.images", "fsad_bench.data.image_cache")


@dataclass(frozen=True)
class ImageCache:
    """The decoded-image cache: its ``folder`` and how an original's content is identified
    (``check``: a key of :data:`CHECKS`). A plain folder path means ``ImageCache(folder)``."""

    folder: Path
    check: str = "stat"

    def __post_init__(self):
        if self.check not in CHECKS:
            raise FsadError(f"image cache check {self.check!r} is not one of {', '.join(CHECKS)}")
        object.__setattr__(self, "folder", Path(self.folder))


@functools.cache
def decoder_fingerprint() -> str:
    """Hash of the decoding code: the source of :data:`DECODER_MODULES` and of what they import from
    ``fsad_bench`` (:func:`fsad_bench.identity.module_fingerprint`), and the versions of the libraries
    that decode and resize. Computed once per process."""
    import PIL
    import torchvision

    versions = (
        f"PIL={PIL.__version__}|torchvision={torchvision.__version__}|torch={torch.__version__}|numpy={np.__version__}"
    )
    return hashlib.sha256(f"{module_fingerprint(*DECODER_MODULES)}|{versions}".encode()).hexdigest()


def cache_key(path: Path, size: int, check: str = "stat", resize: str = "bilinear") -> str:
    """The cache key of ``path`` decoded at ``size`` (see the module doc); OSError if ``path`` cannot
    be read. Every input of the decoded pixels is one field here: a new one (e.g. a resize filter)
    is one more entry of ``fields``."""
    st = path.stat()
    fields = [decoder_fingerprint(), path.resolve(), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, size]
    if resize != "bilinear":  # bilinear entries keep the keys they had before filters were named
        fields.append(f"resize={resize}")
    if check == "sample":
        fields.append(sampled_sha256(path))
    elif check == "full":
        fields.append(content_sha256(path))
    return hashlib.sha256("|".join(map(str, fields)).encode()).hexdigest()


def _as_cache(cache: str | Path | ImageCache) -> ImageCache:
    return cache if isinstance(cache, ImageCache) else ImageCache(Path(cache))


def load_cached_image(
    path: str | Path, size: int, cache: str | Path | ImageCache | None, resize: str = "bilinear"
) -> torch.Tensor:
    """:func:`~fsad_bench.data.images.load_image` ``(3, size, size)`` in [0, 1] (filter ``resize``), through the disk cache
    ``cache`` (a folder or an :class:`ImageCache`; None: decode the original). Errors of the original
    are FsadErrors as there."""
    path = Path(path)
    if cache is None:
        return load_image(path, size, resize)
    cache = _as_cache(cache)
    try:
        key = cache_key(path, size, cache.check, resize)
    except OSError:
        return load_image(path, size, resize)  # raises the data layer's one-line error
    file = cache.folder / str(size) / key[:2] / f"{key}.npy"
    try:
        arr = np.load(file)
    except (OSError, ValueError, EOFError):  # absent or damaged: decode the original
        arr = None
    if arr is not None and arr.shape == (3, size, size):
        t = torch.from_numpy(arr)
        return t.float().div(255) if t.dtype == torch.uint8 else t
    image = load_image(path, size, resize)
    u8 = torch.round(image * 255).to(torch.uint8)
    store = u8 if torch.equal(u8.float().div(255), image) else image.float()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, store.numpy())
        os.replace(tmp, file)
    except OSError:  # a read-only or full cache only costs speed
        pass
    return image


def load_cached_images(
    paths: list[Path], size: int, cache: str | Path | ImageCache | None, resize: str = "bilinear"
) -> torch.Tensor:
    """Stack ``(N, 3, size, size)`` of :func:`load_cached_image`."""
    if not paths:
        return torch.zeros(0, 3, size, size)
    return torch.stack([load_cached_image(p, size, cache, resize) for p in paths])


class CachedImageFiles(ImageFiles):
    """:class:`~fsad_bench.data.torch_datasets.ImageFiles` read through the disk cache (training loops)."""

    def __init__(
        self, paths: list[Path], size: int, cache: str | Path | ImageCache | None = None, resize: str = "bilinear"
    ):
        super().__init__(paths, size, resize)
        self.cache = cache

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_cached_image(self.paths[i], self.size, self.cache, self.resize)
