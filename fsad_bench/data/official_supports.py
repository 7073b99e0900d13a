"""The papers' own support sets: tensors stored in ``.pt`` files, matched back to the image files they came from.

Neither official release names its support images; both store the preprocessed tensors. Each stored image
is compared with every normal training image of its category after the same preprocessing, and the nearest
one is taken when it is near enough and alone (``fsad-bench supports import``; see
``docs/supports-and-rank-stability.md``).

Formats, as the official code reads and makes them (read for facts, nothing copied):

* ``regad`` — RegAD ``test.py`` loads ``support_set/<category>/<k>_<n>.pt`` (``n`` = ``--inferences``, 10)
  and takes ``fixed_fewshot_list[i]`` as the ``(k, 3, 224, 224)`` support batch of round ``i``: a list of
  ``n`` tensors ``(k, 3, S, S)`` or one tensor ``(n, k, 3, S, S)``. Pixels are ``datasets/mvtec.py``'s
  ``transform_x``: PIL ``convert("RGB")``, ``transforms.Resize(224, Image.ANTIALIAS)`` (shorter side to
  224, the longer ``int(224 * long / short)``; ``ANTIALIAS`` is Lanczos), ``ToTensor`` (``/ 255``), no
  normalisation. Category from the folder, k and n from the file name; draw ``i`` becomes run ``i``.
* ``inctrl`` — InCTRL ``engine_test.py`` loads ``<few_shot_dir>/<category>.pt`` (``few_shot_dir`` e.g.
  ``fs_samples/visa/2/``) and ``torch.stack``s it into ``(k, 3, 240, 240)``: a list of k tensors
  ``(3, S, S)`` (or one ``(k, 3, S, S)`` tensor). Pixels are its test ``transform``: PIL image as opened,
  ``Resize(240, BICUBIC)`` (shorter side), ``CenterCrop(240)``, ``convert("RGB")``, ``ToTensor``,
  ``Normalize`` with the CLIP mean and std (:data:`CLIP_MEAN`, :data:`CLIP_STD`). Category from the file
  name, k from the folder name when it is a number; one draw per file: run 0.

Distances are the mean absolute difference over all pixels and channels in 8-bit grey levels (0-255
scale; InCTRL's tensors are un-normalised first). A stored image made from the same file lies at 0 (or a
fraction of a level where another Pillow or JPEG decoder rounds a pixel differently), another file far
away: the 209 MVTec AD bottle training images differ pairwise by 2.16 levels at least (median distance to
the nearest other one: 4.75), hence :data:`MAX_DISTANCE` = 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsad_bench.data.dataset import Dataset
from fsad_bench.data.images import open_image
from fsad_bench.errors import FsadError

#: CLIP's normalisation (InCTRL's test transform).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class OfficialFormat:
    """One paper's support-file format: its image side ``size`` and how a file becomes its tensor."""

    name: str
    size: int
    normalised: bool
    describe: str


FORMATS = {
    "regad": OfficialFormat(
        "regad", 224, False, "RegAD: RGB, Lanczos resize of the shorter side to {size}, ToTensor (no normalisation)"
    ),
    "inctrl": OfficialFormat(
        "inctrl",
        240,
        True,
        "InCTRL: bicubic resize of the shorter side to {size}, "
        "centre crop {size}x{size}, RGB, ToTensor, CLIP Normalize",
    ),
}

#: Default largest accepted distance (mean absolute difference, 8-bit grey levels).
MAX_DISTANCE = 1.0


@dataclass
class StoredSet:
    """One stored support set: ``images`` ``(k, 3, H, W)`` in [0, 1] (un-normalised), drawn as ``run``."""

    source: Path
    category: str
    k: int
    run: int
    images: torch.Tensor


@dataclass
class Match:
    """The files matched to a :class:`StoredSet`: ``names`` in its order, ``distances`` (nearest, grey
    levels) and ``runner_up`` (distance of the second-nearest file of each image)."""

    stored: StoredSet
    names: list[str] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    runner_up: list[float] = field(default_factory=list)


def _resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """``(width, height)`` after torchvision's ``Resize(size)`` (an int): the shorter side becomes ``size``,
    the longer ``int(size * long / short)``."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def _to_uint8_chw(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def regad_pixels(path: Path, size: int = 224) -> torch.Tensor:
    """RegAD's preprocessing of one file as ``uint8`` ``(3, H, W)`` (``ToTensor`` of it = ``/ 255``)."""
    with open_image(path) as im:
        rgb = im.convert("RGB")
        rgb = rgb.resize(_resized_size(*rgb.size, size), Image.LANCZOS)
        return _to_uint8_chw(rgb)


def inctrl_pixels(path: Path, size: int = 240) -> torch.Tensor:
    """InCTRL's preprocessing of one file before ``Normalize`` as ``uint8`` ``(3, size, size)``: resized in the
    mode it was opened in, cropped, then converted to RGB (the official order)."""
    with open_image(path) as im:
        im.load()
        r = im.resize(_resized_size(*im.size, size), Image.BICUBIC)
        w, h = r.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        r = r.crop((left, top, left + size, top + size)).convert("RGB")
        return _to_uint8_chw(r)


PIXELS = {"regad": regad_pixels, "inctrl": inctrl_pixels}


def pt_files(source: Path) -> list[Path]:
    """``source`` itself (a ``.pt`` file) or every ``.pt`` file under it, sorted; FsadError when none."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FsadError(f"{source} does not exist (expected a .pt support file or a folder of them)")
    files = sorted(p for p in source.rglob("*.pt") if p.is_file())
    if not files:
        raise FsadError(f"no .pt file under {source}")
    return files


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: the file is not what the format stores
        raise FsadError(
            f"cannot read {path} as a torch file of tensors: {err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from None


def _shape(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (list, tuple)):
        inner = {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in x}
        return f"a {type(x).__name__} of {len(x)} items {sorted(inner, key=str)}"
    return f"a {type(x).__name__}"


def _image_batch(x, size: int) -> torch.Tensor | None:
    """``x`` (a tensor or a list of equal-shape tensors) as a float ``(m, 3, H, W)`` tensor whose shorter side
    is ``size``; None when it is not one."""
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        shapes = {tuple(t.shape) for t in x}
        x = torch.stack(list(x)) if len(shapes) == 1 else None
    if (
        not isinstance(x, torch.Tensor)
        or x.ndim != 4
        or x.shape[1] != 3
        or min(x.shape[2:]) != size
        or not x.is_floating_point()
    ):
        return None
    return x.float()


def read_regad(path: Path, size: int = 224) -> list[StoredSet]:
    """The draws of one RegAD ``<category>/<k>_<n>.pt`` file (see the module docstring)."""
    m = re.fullmatch(r"(\d+)_(\d+)\.pt", path.name)
    if not m:
        raise FsadError(f"{path}: a RegAD support file is named <k>_<n>.pt (e.g. support_set/bottle/2_10.pt)")
    k, n = int(m.group(1)), int(m.group(2))
    obj = _load(path)
    expect = (
        f"{n} draws of (k={k}, 3, {size}, {size}) images: a list of (k, 3, S, S) tensors or a (n, k, 3, S, S) tensor"
    )
    draws = (
        list(obj)
        if isinstance(obj, (list, tuple))
        else (list(obj.unbind(0)) if isinstance(obj, torch.Tensor) and obj.ndim == 5 else None)
    )
    batches = [_image_batch(d, size) for d in draws] if draws else None
    if not batches or any(b is None or b.shape[0] != k for b in batches):
        raise FsadError(f"{path}: expected {expect}, found {_shape(obj)}")
    if len(batches) != n:
        raise FsadError(f"{path}: holds {len(batches)} draws, its name says {n}")
    return [StoredSet(path, path.parent.name, k, i, b) for i, b in enumerate(batches)]


def read_inctrl(path: Path, size: int = 240) -> list[StoredSet]:
    """The one draw of an InCTRL ``[<k>/]<category>.pt`` file (see the module docstring)."""
    obj = _load(path)
    k = int(path.parent.name) if path.parent.name.isdigit() else None
    expect = (
        f"{k if k else 'k'} CLIP-normalised (3, {size}, {size}) images: a list of (3, S, S) tensors "
        f"or a (k, 3, S, S) tensor"
    )
    b = _image_batch(obj, size)
    if b is None or (k is not None and b.shape[0] != k) or b.shape[2] != b.shape[3]:
        raise FsadError(f"{path}: expected {expect}, found {_shape(obj)}")
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return [StoredSet(path, path.stem, b.shape[0], 0, b * std + mean)]


READERS = {"regad": read_regad, "inctrl": read_inctrl}


def read_stored(source: Path, fmt: str, size: int | None = None) -> list[StoredSet]:
    """Every stored support set of ``source`` (a file or a folder) in format ``fmt``."""
    if fmt not in FORMATS:
        raise FsadError(f"unknown support-file format {fmt!r} (known: {', '.join(FORMATS)})")
    size = size or FORMATS[fmt].size
    sets = [s for p in pt_files(source) for s in READERS[fmt](p, size)]
    seen: dict[tuple[str, int, int], Path] = {}
    for s in sets:
        key = (s.category, s.k, s.run)
        if key in seen:
            raise FsadError(f"{s.source} and {seen[key]} both hold {s.category} k={s.k} run {s.run}")
        seen[key] = s.source
    return sets


def _candidates(
    dataset: Dataset, category: str, fmt: str, size: int, cache: dict[str, tuple[list[Path], list[torch.Tensor]]]
) -> tuple[list[Path], list[torch.Tensor]]:
    if category not in cache:
        if category not in dataset.categories:
            raise FsadError(
                f"support file category {category!r} is not in {dataset.root} (have: {', '.join(dataset.categories)})"
            )
        files = list(dataset.split(category).train)
        cache[category] = (files, [PIXELS[fmt](p, size) for p in files])
    return cache[category]


def _where(s: StoredSet, i: int) -> str:
    draw = f" draw {s.run}" if s.source.name != f"{s.category}.pt" else ""
    return f"{s.source}{draw} image {i}"


def match_sets(
    sets: list[StoredSet], dataset: Dataset, fmt: str, size: int | None = None, max_distance: float = MAX_DISTANCE
) -> list[Match]:
    """Each stored image's file among its category's normal training images (``dataset.split(c).train``).

    Accepted when the nearest file lies within ``max_distance`` grey levels and it is the only one there;
    otherwise FsadError (one line naming the tensor: its file, draw and index) — no file near enough, or
    several (e.g. duplicate images in the data)."""
    size = size or FORMATS[fmt].size
    cache: dict[str, tuple[list[Path], list[torch.Tensor]]] = {}
    out = []
    for s in sets:
        files, pixels = _candidates(dataset, s.category, fmt, size, cache)
        m = Match(s)
        for i, img in enumerate(s.images):
            d = torch.tensor(
                [
                    (c.float().div(255) - img).abs().mean().item() * 255 if c.shape == img.shape else float("inf")
                    for c in pixels
                ]
            )
            order = torch.argsort(d)
            best = int(order[0])
            second = float(d[order[1]]) if len(d) > 1 else float("inf")
            if not float(d[best]) <= max_distance:
                near = (
                    f"nearest {files[best].name} at {float(d[best]):.2f}"
                    if torch.isfinite(d[best])
                    else f"no file of shape {tuple(img.shape)} after preprocessing"
                )
                raise FsadError(
                    f"{_where(s, i)}: no normal training image of {s.category} within {max_distance} "
                    f"grey levels ({near}); another dataset copy, category or --format?"
                )
            if second <= max_distance:
                raise FsadError(
                    f"{_where(s, i)}: ambiguous, {files[best].name} ({float(d[best]):.2f}) and "
                    f"{files[int(order[1])].name} ({second:.2f}) both lie within {max_distance} grey levels"
                )
            m.names.append(files[best].name)
            m.distances.append(float(d[best]))
            m.runner_up.append(second)
        out.append(m)
    return out


def matched_lists(matches: list[Match]) -> dict[str, dict[int, dict[int, list[str]]]]:
    """``{category: {k: {run: file names}}}`` (the ``--support-lists`` entries) of ``matches``."""
    out: dict[str, dict[int, dict[int, list[str]]]] = {}
    for m in matches:
        out.setdefault(m.stored.category, {}).setdefault(m.stored.k, {})[m.stored.run] = m.names
    return out
