"""Helpers of the parity scripts: the stage table, differences, a small MVTec-style image folder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def diff(ours, official) -> tuple[float, float]:
    """(max |ours − official|, that / max |official|), in float64; shapes must agree."""
    a = torch.as_tensor(np.asarray(ours.detach().cpu() if torch.is_tensor(ours) else ours)).double()
    b = torch.as_tensor(np.asarray(official.detach().cpu() if torch.is_tensor(official) else official)).double()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: ours {tuple(a.shape)}, official {tuple(b.shape)}")
    d = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    return d, (d / scale if scale > 0 else (0.0 if d == 0 else math.inf))


class Table:
    """Stages (rows) x dtypes (columns) of (max abs, max rel) differences, rendered as Markdown."""

    def __init__(self):
        self.rows: dict[str, dict[str, tuple[float, float]]] = {}
        self.cols: list[str] = []

    def add(self, stage: str, col: str, abs_diff: float, rel_diff: float) -> None:
        self.rows.setdefault(stage, {})[col] = (float(abs_diff), float(rel_diff))
        if col not in self.cols:
            self.cols.append(col)

    def render(self) -> str:
        head = "| stage | " + " | ".join(f"{c} max abs | {c} max rel" for c in self.cols) + " |"
        sep = "|---|" + "---|---|" * len(self.cols)
        lines = [head, sep]
        for stage, vals in self.rows.items():
            cells = []
            for c in self.cols:
                ab, rel = vals.get(c, (math.nan, math.nan))
                cells += [_fmt(ab), _fmt(rel)]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def print_dtype_table(dtypes: list[str], results: list[list[tuple[str, float, float]]]) -> None:
    """Print stages (rows) x ``dtypes`` (columns): ``results[i]``, the (stage, max abs, max rel) rows of
    ``dtypes[i]``, stages in the same order for every dtype."""
    print("| stage | " + " | ".join(f"{dt} max abs | {dt} max rel" for dt in dtypes) + " |")
    print("|---|" + "---|---|" * len(dtypes))
    for rows in zip(*results):
        print(f"| {rows[-1][0]} | " + " | ".join(f"{r[1]:.2e} | {r[2]:.2e}" for r in rows) + " |")


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "–"
    return "0" if v == 0 else f"{v:.1e}"


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour texture ``(size, size, 3)`` in [0, 1] with some fine noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((size, size, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy, ph = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
            out[..., c] += np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
    out = (out - out.min()) / (out.max() - out.min())
    return np.clip(0.8 * out + 0.1 + rng.normal(0, 0.03, out.shape), 0, 1)


def make_folder(root: Path, category: str, n_train: int, n_good: int, n_bad: int, size: int, seed: int) -> Path:
    """``root/category/{train/good, test/good, test/broken, ground_truth/broken}`` PNGs of ``size`` px
    (MVTec layout; a defect is a bright disc, its mask ``*_mask.png``). Returns ``root``."""
    rng = np.random.default_rng(seed)
    base = root / category
    for sub in ("train/good", "test/good", "test/broken", "ground_truth/broken"):
        (base / sub).mkdir(parents=True, exist_ok=True)

    def save(arr: np.ndarray, path: Path) -> None:
        Image.fromarray((arr * 255 + 0.5).astype(np.uint8)).save(path)

    for i in range(n_train):
        save(_texture(rng, size), base / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        save(_texture(rng, size), base / "test/good" / f"{i:03d}.png")
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n_bad):
        img = _texture(rng, size)
        cy, cx, r = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size, size * 0.08
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        img[mask] = [1.0, 0.9, 0.2]
        save(img, base / "test/broken" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(base / "ground_truth/broken" / f"{i:03d}_mask.png")
    return root
