"""Decoding: the only place that turns an image or mask file into pixels.

Files: PNG, JPEG, BMP, TIFF (any case of the suffix). Images are returned as float tensors in
[0, 1] of shape ``(3, S, S)`` (grayscale replicated; 16-bit scaled by 65535, not clipped; alpha
dropped; resized with a named filter of :data:`RESIZE_FILTERS`, default bilinear, to the square or, with
``"<filter>-crop"``, shorter side first and the centre square kept; PIL's filters antialias when they
shrink); masks as ``(S, S)`` float tensors with values in {0, 1} (nearest resize, the whole image); a mask
must have its image's size (FsadError naming both files otherwise).

Errors: any failure to read or decode a file (unknown format, truncated data, a mode that cannot
be converted, any other Pillow error) is an FsadError naming the file, its mode and size when the
header was read, and what was expected. Size limit: an image of more than :data:`MAX_PIXELS`
pixels (Pillow's default ``MAX_IMAGE_PIXELS``, 89,478,485: e.g. 9459x9459; a 224 px model never
needs more, and one such RGB image takes 268 MB decoded) is refused by the header alone, before
any decoding, by :func:`check_pixels` (at planning, :func:`fsad_bench.data.integrity.verify_readable`,
and here as a fallback). Pillow's own decompression-bomb error (above twice that) becomes the same
FsadError.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fsad_bench.errors import FsadError

#: Resize filters of :func:`load_image` (PIL's, through torchvision): ``"bilinear"`` (default) and
#: ``"lanczos"`` (PIL's ``LANCZOS``, formerly ``Image.ANTIALIAS``: RegAD's official loader).
RESIZE_FILTERS = {
    "bilinear": InterpolationMode.BILINEAR,
    "lanczos": InterpolationMode.LANCZOS,  # PIL's ANTIALIAS (RegAD, TDG loaders)
    "bicubic": InterpolationMode.BICUBIC,  # InCTRL's / CLIP's Resize(..., BICUBIC)
}

#: Suffix of a resize name that keeps the aspect ratio: ``"<filter>-crop"`` resizes the shorter side to the
#: target size with ``<filter>`` and keeps the centre square (torchvision ``Resize(size)`` +
#: ``CenterCrop(size)``: the official InCTRL and TDG loaders); a plain filter name squashes the image to the
#: square. Identical on square images.
CROP_SUFFIX = "-crop"


def parse_resize(resize: str) -> tuple[str, bool]:
    """``resize`` -> (filter of :data:`RESIZE_FILTERS`, centre crop?); FsadError for an unknown name."""
    base = resize[: -len(CROP_SUFFIX)] if resize.endswith(CROP_SUFFIX) else resize
    if base not in RESIZE_FILTERS:
        valid = ", ".join([*RESIZE_FILTERS, *(f + CROP_SUFFIX for f in RESIZE_FILTERS)])
        raise FsadError(f"unknown resize filter {resize!r} (valid: {valid})")
    return base, base != resize


def crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The centre crop of a ``"<filter>-crop"`` resize of a ``width`` x ``height`` image to ``size``, as
    fractions of the original frame: ``(left, top, right, bottom)`` in [0, 1] (``(0, 0, 1, 1)`` when square).
    Follows torchvision: the shorter side becomes ``size``, the longer ``int(size · long / short)``, and the
    crop starts at ``int(round((side - size) / 2))``."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    nw, nh = (size, new_long) if width <= height else (new_long, size)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return left / nw, top / nh, (left + size) / nw, (top + size) / nh


#: Largest image accepted, in pixels (width x height): Pillow's default ``Image.MAX_IMAGE_PIXELS``,
#: written out so that a Pillow release changing its default does not change what fsad-bench accepts.
MAX_PIXELS = 89_478_485

#: What a readable image is, for the error messages.
EXPECTED = f"a PNG, JPEG, BMP or TIFF image of at most {MAX_PIXELS} pixels that Pillow decodes"


def check_pixels(path: Path, size: tuple[int, int], what: str = "image") -> None:
    """FsadError naming ``path`` when ``size`` ``(width, height)`` exceeds :data:`MAX_PIXELS`."""
    if size[0] * size[1] > MAX_PIXELS:
        raise FsadError(
            f"cannot read {what} {path}: {size[0]}x{size[1]} = {size[0] * size[1]} pixels, larger than "
            f"{MAX_PIXELS} pixels (fsad_bench.data.images.MAX_PIXELS, Pillow's default limit)"
        )


def decode_error(path: Path, err: BaseException, what: str = "image", im: Image.Image | None = None) -> FsadError:
    """The one-line FsadError for any exception ``err`` raised while reading ``path`` (``im``: its
    header, when it was read: the mode and size are named)."""
    if isinstance(err, FsadError):
        return err
    if isinstance(err, Image.DecompressionBombError):  # Pillow's message names its own (doubled) limit
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{found.group(1)} pixels" if found else "an image"
        return FsadError(
            f"cannot read {what} {path}: {pixels}, larger than {MAX_PIXELS} pixels "
            f"(fsad_bench.data.images.MAX_PIXELS, Pillow's default limit)"
        )
    header = f" (mode {im.mode}, {im.size[0]}x{im.size[1]})" if im is not None else ""
    return FsadError(f"cannot read {what} {path}{header}: {err.__class__.__name__}: {err} (expected {EXPECTED})")


@contextmanager
def open_image(path: Path, what: str = "image"):
    """``Image.open(path)`` whose header is checked (:func:`check_pixels`) and whose errors, in the
    ``with`` block too, are FsadErrors naming the file (:func:`decode_error`); MemoryError passes."""
    im = None
    try:
        with warnings.catch_warnings():  # the size check below says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            check_pixels(path, im.size, what)
            yield im
    except (MemoryError, GeneratorExit):
        raise
    except Exception as err:
        raise decode_error(path, err, what, im) from None


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
    with open_image(path) as im:
        return im.size


def load_image(path: Path, size: int, resize: str = "bilinear") -> torch.Tensor:
    """Read an RGB image resized to ``(3, size, size)`` in [0, 1] with the filter ``resize`` (a key of
    :data:`RESIZE_FILTERS`, squashing the image to the square, or ``"<filter>-crop"``: shorter side to
    ``size``, centre square kept, :func:`crop_box`); FsadError if unreadable."""
    base, crop = parse_resize(resize)
    with open_image(path) as im:
        rgb = _as_rgb(im)
        if crop:
            rgb = TF.resize(rgb, size, interpolation=RESIZE_FILTERS[base], antialias=True)
            rgb = TF.center_crop(rgb, [size, size])
        else:
            rgb = TF.resize(rgb, [size, size], interpolation=RESIZE_FILTERS[base], antialias=True)
        return TF.to_tensor(rgb)


def mask_size_error(mask: Path, msize: tuple[int, int], image: Path, isize: tuple[int, int]) -> FsadError:
    """The one-line error for a mask whose size differs from its image's."""
    return FsadError(
        f"mask {mask} is {msize[0]}x{msize[1]} but its image {image} is {isize[0]}x{isize[1]} "
        f"(a mask must have its image's size)"
    )


def load_mask(path: Path | None, size: int, image: Path | None = None) -> torch.Tensor:
    """Binary mask ``(size, size)`` (1 = defect); all zeros when ``path`` is None. With ``image``,
    FsadError unless the mask has that image's size."""
    if path is None:
        return torch.zeros(size, size)
    with open_image(path, "mask") as im:
        if image is not None and im.size != image_size_of(image):
            raise mask_size_error(path, im.size, image, image_size_of(image))
        m = Image.fromarray(_mask_array(im).astype(np.uint8) * 255)
        m = TF.resize(m, [size, size], interpolation=InterpolationMode.NEAREST)
        return (TF.to_tensor(m)[0] > 0.5).float()


def load_images(paths: list[Path], size: int, resize: str = "bilinear") -> torch.Tensor:
    """Stack of images ``(N, 3, size, size)`` (:func:`load_image` with the filter ``resize``)."""
    return torch.stack([load_image(p, size, resize) for p in paths]) if paths else torch.zeros(0, 3, size, size)
