"""Result store: one JSON record per benchmark cell, written atomically.

Layout of a results folder::

    <out>/cells/<cell_id>.json   one finished cell each (write to a temp file, then rename)
    <out>/maps/<cell_id>.npz     a few test images' anomaly maps of one cell (figures)
    <out>/suite.json             the suite as run (for ``fsad-bench table``)
    <out>/tables/                reports written by the reporter

A cell file appears whole or not at all, so a killed run loses at most the cells in
flight, parallel workers never clash (different cells, different files) and a rerun skips
every cell whose file exists (resume).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import FsadError


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultStore:
    """The records of one results folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.cells = self.root / "cells"

    def path(self, cell_id: str) -> Path:
        return self.cells / f"{cell_id}.json"

    def has(self, cell_id: str) -> bool:
        return self.path(cell_id).is_file()

    def put(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.path(record["cell_id"]), json.dumps(record, indent=1, sort_keys=True))

    def done_ids(self) -> set[str]:
        return {p.stem for p in self.cells.glob("*.json")} if self.cells.is_dir() else set()

    def records(self) -> list[dict[str, Any]]:
        """Every record; a file that is not valid JSON raises FsadError naming it."""
        out = []
        for p in sorted(self.cells.glob("*.json")) if self.cells.is_dir() else []:
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError) as err:
                raise FsadError(f"corrupt result record {p}: {err} (delete it to recompute that cell)") from None
        return out

    def frame(self) -> pd.DataFrame:
        """All records as a DataFrame (one row per cell)."""
        recs = self.records()
        if not recs:
            raise FsadError(f"no results in {self.root} (expected {self.cells}/*.json from `fsad-bench run`)")
        return pd.DataFrame.from_records(recs)

    def save_suite(self, suite: dict[str, Any]) -> None:
        atomic_write_text(self.root / "suite.json", json.dumps(suite, indent=1, sort_keys=True))

    def load_suite(self) -> dict[str, Any] | None:
        p = self.root / "suite.json"
        return json.loads(p.read_text()) if p.is_file() else None


EXAMPLE_MAPS = 4  # test images per category kept by save_example_maps


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def pick_examples(labels: np.ndarray | None, n: int, n_total: int, groups: list[str] | None = None) -> np.ndarray:
    """Deterministic choice of ``n`` test indices (the same for every method of a category).

    With labels: ``n - 1`` anomalous images, taken round-robin over ``groups`` (e.g. the defect
    type of each image) so several defect types show, plus the first normal image; without
    labels: the first ``n``. Too few of one kind: filled up in test order."""
    if labels is None:
        return np.arange(min(n, n_total))
    labels = np.asarray(labels).reshape(-1)
    bad = [int(i) for i in np.flatnonzero(labels == 1)]
    by_group: dict[str, list[int]] = {}
    for i in bad:
        by_group.setdefault(groups[i] if groups is not None else "", []).append(i)
    queues = list(by_group.values())
    take: list[int] = []
    while len(take) < max(0, n - 1) and any(queues):
        for q in queues:
            if q and len(take) < max(0, n - 1):
                take.append(q.pop(0))
    take += [int(i) for i in np.flatnonzero(labels == 0)[:1]]
    if len(take) < n:
        take += [i for i in range(n_total) if i not in take][: n - len(take)]
    return np.array(sorted(take[:n]), dtype=int)


def save_example_maps(path: str | Path, maps: Any, images: Any, masks: Any, paths: list[Any],
                      labels: Any | None = None, n: int = EXAMPLE_MAPS) -> Path:
    """Keep a few test images' anomaly maps of one cell for :func:`plot_map_grids`.

    maps ``(N, S, S)`` float (higher = more anomalous), images ``(N, 3, S, S)`` in [0, 1] — or a
    function ``images(index) -> (len(index), 3, S, S)`` that loads only the chosen ones (the
    engine streams test images and keeps none) —, masks ``(N, S, S)`` 0/1, paths: N image paths,
    labels: optional ``(N,)`` 0/1 image labels (used to pick anomalous examples of several defect
    types — the images' parent folders — plus one normal, see :func:`pick_examples`). numpy
    arrays or torch tensors. Writes ``path`` (``<out>/maps/<cell_id>.npz``) with keys
    ``maps`` (n, S, S) float32 — the maps as predicted, so a map of values ~1e-8 keeps its
    contrast (float16 flushed such maps to zero) —, ``images`` (n, S, S, 3) uint8, ``masks``
    (n, S, S) uint8, ``image_paths`` (n,) str, ``index`` (n,) int (positions in the test set)."""
    maps, masks = _to_numpy(maps), _to_numpy(masks)
    idx = pick_examples(None if labels is None else _to_numpy(labels), n, len(maps),
                        groups=[Path(str(p)).parent.name for p in paths])
    chosen = _to_numpy(images(idx) if callable(images) else _to_numpy(images)[idx])
    rgb = np.clip(np.round(255 * chosen.transpose(0, 2, 3, 1)), 0, 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, maps=maps[idx].astype(np.float32), images=rgb,
                        masks=(masks[idx] > 0.5).astype(np.uint8),
                        image_paths=np.array([str(paths[i]) for i in idx]), index=idx)
    os.replace(tmp, path)
    return path


def with_train_seed(df: pd.DataFrame) -> pd.DataFrame:
    """Records as a DataFrame with an integer ``train_seed`` column: records written before the
    training-seed axis existed (no such field) read as train seed 0."""
    if "train_seed" not in df.columns:
        return df.assign(train_seed=0)
    return df.assign(train_seed=df["train_seed"].fillna(0).astype(int))
