"""Decoded images cached on disk per resolution, so that every cell re-reads them cheaply.

The run layer streams test images from disk in batches (memory bounded independently of the
test-set size) and loads support and training images at each adapter's own input size
(:attr:`fsad_bench.adapter.Adapter.input_size`) from the original files. Decoding an original
costs ~50 ms for a 900 px MVTec PNG, reading its cached copy ~0.5 ms; a cell re-reads its
category's whole test set, so the decoded, resized image is kept under
``<cache>/images/<size>/`` as one ``.npy`` file per (file, size, resize filter): ``(3, S, S)`` uint8 when the
loader's output is exactly ``k / 255`` (PIL images always are), else float32 — either way
the tensor read back equals :func:`fsad_bench.data.images.load_image`'s bit for bit. The key is
(resolved path, file size, mtime, S, resize filter), so an edited original is decoded afresh and
each filter (:attr:`fsad_bench.adapter.Adapter.resize_filter`) has its own entries. Disk use:
3·S² bytes per image (150 KB at 224 px, 600 KB at 448 px).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from fsad_bench.data.images import load_image
from fsad_bench.data.torch_datasets import ImageFiles


def _key(path: Path, size: int, resize: str = "bilinear") -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{size}"
    raw += f"|{resize}"  # the resize filter (fsad_bench.data.images.RESIZE_FILTERS)
    return hashlib.sha1(raw.encode()).hexdigest()


def load_cached_image(path: str | Path, size: int, cache: str | Path | None, resize: str = "bilinear") -> torch.Tensor:
    """:func:`~fsad_bench.data.images.load_image` ``(3, size, size)`` in [0, 1] (filter ``resize``), through
    the disk cache at ``cache`` (None: decode the original). Errors of the original are FsadErrors as there."""
    path = Path(path)
    if cache is None:
        return load_image(path, size, resize)
    try:
        key = _key(path, size, resize)
    except OSError:
        return load_image(path, size, resize)  # raises the data layer's one-line error
    file = Path(cache) / str(size) / key[:2] / f"{key}.npy"
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


def load_cached_images(paths: list[Path], size: int, cache: str | Path | None, resize: str = "bilinear"
                       ) -> torch.Tensor:
    """Stack ``(N, 3, size, size)`` of :func:`load_cached_image`."""
    if not paths:
        return torch.zeros(0, 3, size, size)
    return torch.stack([load_cached_image(p, size, cache, resize) for p in paths])


class CachedImageFiles(ImageFiles):
    """:class:`~fsad_bench.data.torch_datasets.ImageFiles` read through the disk cache (training loops)."""

    def __init__(self, paths: list[Path], size: int, cache: str | Path | None = None, resize: str = "bilinear"):
        super().__init__(paths, size, resize)
        self.cache = cache

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_cached_image(self.paths[i], self.size, self.cache, self.resize)
