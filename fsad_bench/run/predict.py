"""Streamed prediction: test images loaded from disk a batch at a time at the adapter's input size,
scores and maps checked and kept (maps resized to the suite's size), cold and warm inference time;
ground-truth masks at the suite's size.

Images: each adapter gets its support, test and training images at its own
:attr:`~fsad_bench.adapter.Adapter.input_size` (default: the suite's ``image_size``), decoded
from the original files through a per-resolution disk cache (:mod:`fsad_bench.data.image_cache`);
its maps are resized to the suite's ``image_size``, where the masks are, before pixel metrics.
Test images are streamed in batches, so memory does not grow with the test set beyond its
scores, maps and masks at the suite's size.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fsad_bench.components.feature_cache import CachedBackbone
from fsad_bench.data.image_cache import load_cached_images
from fsad_bench.data.images import crop_box, image_size_of, load_mask, parse_resize
from fsad_bench.errors import FsadError
from fsad_bench.run.devices import sync

if TYPE_CHECKING:
    from fsad_bench.protocols import Suite


PREDICT_BATCH = 32  # test images per predict call (amortises per-call model traffic)


def input_size(adapter, suite: Suite) -> int:
    """Side of the square images ``adapter`` is given: its :attr:`~fsad_bench.adapter.Adapter.input_size`,
    else the suite's ``image_size``. Maps are resized back to the suite's size for the metrics."""
    return int(getattr(adapter, "input_size", None) or suite.image_size)


def resize_filter(adapter) -> str:
    """The filter ``adapter``'s images are resized with (:attr:`~fsad_bench.adapter.Adapter.resize_filter`)."""
    return str(getattr(adapter, "resize_filter", None) or "bilinear")


def _feature_caches(adapter) -> list[CachedBackbone]:
    """The adapter's frozen-backbone feature caches (attributes that are :class:`CachedBackbone`)."""
    return [v for v in vars(adapter).values() if isinstance(v, CachedBackbone)]


@contextmanager
def _cold_caches(adapter):
    """Within: the adapter's feature caches read nothing (features computed afresh, as for a new image)."""
    caches = _feature_caches(adapter)
    for c in caches:
        c.read_enabled = False
    try:
        yield
    finally:
        for c in caches:
            c.read_enabled = True


def _check_batch(adapter, s: torch.Tensor, m: torch.Tensor, n: int, side: int) -> None:
    if s.shape != (n,) or m.shape != (n, side, side):
        raise FsadError(
            f"{adapter.name}.predict returned scores {tuple(s.shape)} and maps {tuple(m.shape)} "
            f"for {n} images of {side} px; expected ({n},) and ({n}, {side}, {side})"
        )
    if not (torch.isfinite(s).all() and torch.isfinite(m).all()):
        raise FsadError(f"{adapter.name}.predict returned non-finite scores")


def _predict_batch(adapter, images: torch.Tensor, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    s, m = adapter.predict(images)
    s = torch.as_tensor(s).detach().float().cpu().reshape(-1)
    m = torch.as_tensor(m).detach().float().cpu()
    _check_batch(adapter, s, m, len(images), images.shape[-1])
    return s, m


def _to_size(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Maps ``(B, s, s)`` -> ``(B, size, size)`` (bilinear; unchanged when already that size)."""
    if maps.shape[-1] == size:
        return maps
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def _uncrop(maps: torch.Tensor, paths: list[Path], out_size: int) -> torch.Tensor:
    """Maps ``(B, s, s)`` of centre-cropped images (``"<filter>-crop"`` resizes) -> ``(B, out_size, out_size)``
    in the full frame the masks use (the whole image squashed to the square): each map resized bilinearly onto
    its crop's rectangle (:func:`~fsad_bench.data.images.crop_box`); outside it, where the method saw nothing,
    the map's minimum (its most normal value). A square image's crop is the whole frame (plain resize)."""
    out = []
    for m, p in zip(maps, paths):
        left, top, right, bottom = crop_box(*image_size_of(p), m.shape[-1])
        x0, x1, y0, y1 = (round(v * out_size) for v in (left, right, top, bottom))
        full = torch.full((out_size, out_size), float(m.min()))
        box = F.interpolate(m[None, None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        full[y0:y1, x0:x1] = box[0, 0]
        out.append(full)
    return torch.stack(out) if out else maps.new_zeros(0, out_size, out_size)


def predict_stream(
    adapter,
    paths: list[Path],
    size: int,
    out_size: int,
    device: str,
    image_cache: str | Path | None = None,
    batch: int | None = None,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Predict the test images at ``paths``, loaded from disk ``batch`` at a time at ``size`` px
    (with the adapter's :func:`resize_filter`).

    Memory holds one batch (``batch``, default :data:`PREDICT_BATCH`) of images and the outputs the metrics need: scores ``(N,)`` and
    maps ``(N, out_size, out_size)`` float32 (maps of another size are resized bilinearly).
    Returns (scores, maps, cold, warm) with two inference costs in seconds per image, image
    loading excluded:

    * ``cold`` — what a user pays for new images: the first batch predicted with every feature
      cache of the adapter bypassed (nothing read from it; methods without one: the first batch
      of the pass below);
    * ``warm`` — the whole test pass as the benchmark runs it, reusing test features that earlier
      cells of the same (method, category) cached (equal to cold up to noise without a cache).
    """
    n, batch = len(paths), batch or PREDICT_BATCH
    resize = resize_filter(adapter)
    scores = np.empty(n, dtype=np.float32)
    maps = np.empty((n, out_size, out_size), dtype=np.float32)
    cold = None
    if _feature_caches(adapter) and n:  # an extra cold pass over the first batch (outputs discarded)
        first = load_cached_images(paths[:batch], size, image_cache, resize)
        rng = torch.get_rng_state()
        with _cold_caches(adapter):
            sync(device)
            t0 = time.perf_counter()
            _predict_batch(adapter, first, out_size)
            sync(device)
            cold = (time.perf_counter() - t0) / len(first)
        torch.set_rng_state(rng)
        del first
    seconds = 0.0
    for i in range(0, n, batch):
        images = load_cached_images(paths[i : i + batch], size, image_cache, resize)
        sync(device)
        t0 = time.perf_counter()
        s, m = _predict_batch(adapter, images, out_size)
        sync(device)
        dt = time.perf_counter() - t0
        seconds += dt
        if cold is None:
            cold = dt / len(images)
        scores[i : i + len(images)] = s.numpy()
        full = _uncrop(m, paths[i : i + batch], out_size) if parse_resize(resize)[1] else _to_size(m, out_size)
        maps[i : i + len(images)] = full.numpy()
    return scores, maps, float(cold or 0.0), seconds / max(n, 1)


def load_masks(split, size: int) -> np.ndarray:
    """Ground-truth masks of a category's test images, ``(N, size, size)`` uint8 0/1 (1 byte a pixel),
    each checked against its image's size."""
    out = np.zeros((len(split.test), size, size), dtype=np.uint8)
    for i, s in enumerate(split.test):
        if s.mask_path is not None:
            out[i] = load_mask(s.mask_path, size, s.path).numpy() > 0.5
    return out
