"""The built-in synthetic dataset, written in the MVTec AD folder layout.

Texture categories (``stripes``, ``grid``, ``noise``) and object categories (``washer``,
``bracket``, ``plate``, placed with a small random rotation and shift like MPDD's parts)
each get normal training images and a test set with four defect types — ``scratch``,
``hole``, ``stain``, ``missing`` — whose pixel masks are exact (the set of pixels the
defect changed). Every image is decided by (seed, category, split, index) alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from fsad_bench.errors import FsadError
from fsad_bench.seeding import stable_seed

TEXTURES = ("stripes", "grid", "noise")
OBJECTS = ("washer", "bracket", "plate")
CATEGORY_ORDER = ("stripes", "washer", "grid", "bracket", "noise", "plate")
DEFECTS = ("scratch", "hole", "stain", "missing")


def category_names(n: int) -> list[str]:
    """The first ``n`` category names (more than six get numbered colour variants)."""
    if n < 1:
        raise FsadError(f"--categories must be >= 1, got {n}")
    return [CATEGORY_ORDER[i % 6] + (str(i // 6 + 1) if i >= 6 else "") for i in range(n)]


def _palette(category: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(stable_seed("palette", category))
    base = rng.uniform(0.25, 0.6, 3)
    accent = np.clip(base + rng.choice([-1, 1]) * rng.uniform(0.2, 0.35, 3), 0, 1)
    return base.astype(np.float32), accent.astype(np.float32)


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    return x, y


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Blend colours a (3,) and b (3,) with weights t (H, W) -> (H, W, 3)."""
    return a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]


def _texture(kind: str, rng: np.random.Generator, n: int, base, accent) -> np.ndarray:
    x, y = _grid(n)
    theta = np.deg2rad(rng.normal(0, 2.0))
    u = np.cos(theta) * x + np.sin(theta) * y
    v = -np.sin(theta) * x + np.cos(theta) * y
    if kind == "stripes":
        period = 14 * rng.uniform(0.95, 1.05)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    elif kind == "grid":
        period = 24 * rng.uniform(0.97, 1.03)
        du = np.abs(((u + rng.uniform(0, period)) % period) - period / 2)
        dv = np.abs(((v + rng.uniform(0, period)) % period) - period / 2)
        t = ((du > period / 2 - 2) | (dv > period / 2 - 2)).astype(np.float32)
        t = gaussian_filter(t, 0.7)
    else:  # noise
        field = gaussian_filter(rng.normal(size=(n, n)).astype(np.float32), 3.0)
        t = np.clip(0.5 + field / (4 * field.std() + 1e-8), 0, 1)
    return _mix(base, accent, t.astype(np.float32))


def _object_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of object-local coordinates (pixels, origin at the part's centre)."""
    if kind == "washer":
        r = np.hypot(u, v)
        tab = (np.abs(v) < 10) & (u > 0) & (u < 88)
        return ((r < 68) & (r > 30)) | (tab & (r > 30))
    if kind == "bracket":
        arm1 = (np.abs(v + 30) < 18) & (np.abs(u) < 75)
        arm2 = (np.abs(u + 57) < 18) & (v > -48) & (v < 70)
        hole = (np.hypot(u - 45, v + 30) < 8) | (np.hypot(u + 57, v - 45) < 8)
        return (arm1 | arm2) & ~hole
    # plate: rounded rectangle with four holes
    plate = (np.abs(u) < 80) & (np.abs(v) < 55)
    holes = np.zeros_like(plate)
    for cx in (-58, 58):
        for cy in (-34, 34):
            holes |= np.hypot(u - cx, v - cy) < 9
    return plate & ~holes


def _object(kind: str, rng: np.random.Generator, n: int, base, accent) -> tuple[np.ndarray, np.ndarray]:
    x, y = _grid(n)
    cx, cy = n / 2 + rng.uniform(-10, 10), n / 2 + rng.uniform(-10, 10)
    theta = np.deg2rad(rng.uniform(-12, 12))
    u = np.cos(theta) * (x - cx) + np.sin(theta) * (y - cy)
    v = -np.sin(theta) * (x - cx) + np.cos(theta) * (y - cy)
    fg = _object_mask(kind, u, v)
    background = gaussian_filter(rng.normal(size=(n, n)).astype(np.float32), 2.0)
    bg = _mix(base * 0.35, base * 0.5, np.clip(0.5 + background * 3, 0, 1))
    shade = np.clip(0.5 + (u + v) / 400.0, 0, 1).astype(np.float32)
    part = _mix(accent * 0.8, np.clip(accent * 1.15, 0, 1), shade)
    img = np.where(fg[..., None], part, bg)
    return img.astype(np.float32), fg


def _segment_distance(x, y, x0, y0, x1, y1):
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-8), 0, 1)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))


def _defect(
    kind: str, img: np.ndarray, fg: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one defect; returns (image, mask) with mask = the pixels the defect covers."""
    n = img.shape[0]
    x, y = _grid(n)
    if fg is not None:
        ys, xs = np.nonzero(gaussian_filter(fg.astype(np.float32), 4) > 0.95)
        i = rng.integers(len(xs))
        cx, cy = float(xs[i]), float(ys[i])
    else:
        cx, cy = rng.uniform(30, n - 30, 2)
    out = img.copy()
    if kind == "scratch":
        angle, length = rng.uniform(0, np.pi), rng.uniform(25, 55)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        d = _segment_distance(x, y, cx - dx, cy - dy, cx + dx, cy + dy)
        mask = d < rng.uniform(1.0, 1.8)
        shift = rng.choice([-1, 1]) * rng.uniform(0.18, 0.3)
        out[mask] = np.clip(out[mask] + shift, 0, 1)
    elif kind == "hole":
        mask = np.hypot(x - cx, y - cy) < rng.uniform(3.5, 7)
        out[mask] = 0.06 + 0.02 * rng.random((int(mask.sum()), 3))
    elif kind == "stain":
        a, b, phi = rng.uniform(7, 15), rng.uniform(5, 10), rng.uniform(0, np.pi)
        u = np.cos(phi) * (x - cx) + np.sin(phi) * (y - cy)
        v = -np.sin(phi) * (x - cx) + np.cos(phi) * (y - cy)
        r2 = (u / a) ** 2 + (v / b) ** 2
        mask = r2 < 1
        alpha = (0.45 * np.clip(1 - r2, 0, 1) ** 0.5)[..., None]
        tint = rng.uniform(0, 1, 3).astype(np.float32)
        out = np.where(mask[..., None], out * (1 - alpha) + tint * alpha, out)
    else:  # missing piece
        r = rng.uniform(11, 18)
        disk = np.hypot(x - cx, y - cy) < r
        if fg is not None:
            mask = disk & fg
            out[mask] = out[~fg].mean(0)
        else:
            mask = (np.abs(x - cx) < r) & (np.abs(y - cy) < r * 0.8)
            out[mask] = img[mask].mean(0)
    return np.asarray(out, dtype=np.float32), mask


NATIVE = 256  # geometry is defined in pixels of a 256 x 256 canvas


def render(category: str, seed: int, split: str, index: int, defect: str | None = None, size: int = NATIVE):
    """One image ``(size, size, 3)`` float in [0, 1] and its defect mask ``(size, size)`` bool
    (drawn at 256 px, then resized: area-averaged image; a mask pixel is set when the defect
    covers any part of it)."""
    kind = category.rstrip("0123456789")
    rng = np.random.default_rng(stable_seed("synth", seed, category, split, index, defect))
    base, accent = _palette(category)
    if kind in TEXTURES:
        img, fg = _texture(kind, rng, NATIVE, base, accent), None
    elif kind in OBJECTS:
        img, fg = _object(kind, rng, NATIVE, base, accent)
    else:
        raise FsadError(f"unknown synthetic category {category!r} (kinds: {', '.join(TEXTURES + OBJECTS)})")
    mask = np.zeros((NATIVE, NATIVE), bool)
    if defect is not None:
        img, mask = _defect(defect, img, fg, rng)
    img = np.clip(img * rng.uniform(0.95, 1.05) + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)
    if size != NATIVE:
        img = (
            np.asarray(
                Image.fromarray((img * 255).round().astype(np.uint8)).resize((size, size), Image.BOX), dtype=np.float32
            )
            / 255
        )
        # a pixel of the small mask is defective when the defect covers any of its area
        cover = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BOX)
        mask = np.asarray(cover) > 0
    return img, mask


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).round().astype(np.uint8)).save(path)


def generate(
    out: str | Path,
    categories: int = 4,
    seed: int = 0,
    n_train: int = 40,
    n_test_good: int = 16,
    n_test_per_defect: int = 4,
    size: int = 256,
) -> Path:
    """Write the synthetic dataset to ``out`` (MVTec layout) and return its path.

    A ``.complete`` marker is written last, so an interrupted generation is redone.
    """
    out = Path(out)
    marker = out / ".complete"
    spec = f"{categories} {seed} {n_train} {n_test_good} {n_test_per_defect} {size}"
    if marker.is_file() and marker.read_text() == spec:
        return out
    for cat in category_names(categories):
        for i in range(n_train):
            _save(render(cat, seed, "train", i, size=size)[0], out / cat / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            _save(render(cat, seed, "test", i, size=size)[0], out / cat / "test" / "good" / f"{i:03d}.png")
        for d in DEFECTS:
            for i in range(n_test_per_defect):
                img, mask = render(cat, seed, "test", i, defect=d, size=size)
                _save(img, out / cat / "test" / d / f"{i:03d}.png")
                _save(mask.astype(np.float32), out / cat / "ground_truth" / d / f"{i:03d}_mask.png")
    marker.write_text(spec)
    return out
