"""Result store: one JSON record per benchmark cell, written atomically.

Layout of a results folder::

    <out>/cells/<cell_id>.json   one finished cell each (write to a temp file, then rename)
    <out>/maps/<cell_id>.npz     a few test images' anomaly maps of one cell (figures)
    <out>/suite.json             the suite as run, with the ids of its cells (``cell_ids``)
    <out>/tables/                reports written by the reporter
    <out>/.lock                  held (flock) by the run writing the folder

A cell file appears whole or not at all, so a killed run loses at most the cells in
flight, parallel workers never clash (different cells, different files) and a rerun skips
every cell whose file exists (resume). A cell id contains the hash of everything that changes
its numbers (:func:`fsad_bench.run.plan.config_hash`), and ``suite.json`` lists the ids of the
suite as last run: tables read only those records (:meth:`ResultStore.frame`); the others are
counted (:meth:`ResultStore.foreign`) and removed by ``fsad-bench prune``. Files are written
with the ordinary mode (0666 minus the umask: 0644 by default) so that other users and the
workers of a cluster can read them; a write that fails (disk full, read-only) leaves no
temporary file and raises FsadError naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fsad_bench.errors import FsadError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: 0644 under the usual umask 022


def _write_error(path: Path, err: OSError) -> FsadError:
    return FsadError(f"cannot write {path}: {err.strerror or err}")


def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write ``path`` through ``write(file)`` into a temp file, then rename: readers see the old
    file or the new one, never a part; on any failure the temp file is removed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp creates 0600
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the new one, never a part."""
    _atomic_write(Path(path), lambda f: f.write(text))


def atomic_savez(path: Path, **arrays: Any) -> None:
    """``np.savez_compressed`` to ``path``, atomically, mode :data:`FILE_MODE`, nothing left on failure."""
    _atomic_write(Path(path), lambda f: np.savez_compressed(f, **arrays), binary=True)


_HELD: dict[str, int] = {}  # results folders whose lock this process holds (depth)


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
        """Write one record (atomic, mode :data:`FILE_MODE`); FsadError naming the file on failure."""
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

    def save_suite(self, suite: dict[str, Any], cell_ids: list[str] | None = None) -> None:
        """Write ``suite.json``; ``cell_ids``: the cells of the suite as it is now (what tables show)."""
        data = dict(suite, cell_ids=sorted(cell_ids)) if cell_ids is not None else suite
        atomic_write_text(self.root / "suite.json", json.dumps(data, indent=1, sort_keys=True))

    def load_suite(self) -> dict[str, Any] | None:
        p = self.root / "suite.json"
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FsadError(f"corrupt {p}: {err} (rerun `fsad-bench run` to rewrite it)") from None

    # -- the current suite and the others ---------------------------------------------
    def current_ids(self) -> set[str] | None:
        """Ids of the cells of the suite as last run (None for a folder written before ids were kept)."""
        suite = self.load_suite()
        ids = suite.get("cell_ids") if suite else None
        return set(ids) if ids is not None else None

    def frame(self, everything: bool = False) -> pd.DataFrame:
        """The records of the current suite as a DataFrame (one row per cell); ``everything``: all records."""
        recs = self.records()
        ids = None if everything else self.current_ids()
        if ids is not None:
            recs = [r for r in recs if r.get("cell_id") in ids]
        if not recs:
            raise FsadError(f"no results in {self.root} (expected {self.cells}/*.json from `fsad-bench run`)")
        return pd.DataFrame.from_records(recs)

    def foreign(self) -> Counter:
        """Records not in the current suite (other configuration, data, code or cells), by method."""
        ids = self.current_ids()
        if ids is None or not self.cells.is_dir():
            return Counter()
        out: Counter = Counter()
        for p in self.cells.glob("*.json"):
            if p.stem not in ids:
                try:
                    out[json.loads(p.read_text()).get("method", "?")] += 1
                except (OSError, json.JSONDecodeError):
                    out["unreadable"] += 1
        return out

    def foreign_note(self) -> str | None:
        """One line about the records tables ignore, or None."""
        n = self.foreign()
        if not n:
            return None
        total = sum(n.values())
        per = ", ".join(f"{m}: {c}" for m, c in sorted(n.items()))
        return (f"{total} record{'s' if total > 1 else ''} of another configuration ignored ({per}); "
                f"`fsad-bench prune {self.root}` removes them")

    def remove(self, cell_ids: set[str]) -> int:
        """Delete the records (and example maps) of ``cell_ids``; returns how many records went."""
        n = 0
        for cid in cell_ids:
            if self.path(cid).is_file():
                self.path(cid).unlink()
                n += 1
            (self.root / "maps" / f"{cid}.npz").unlink(missing_ok=True)
        return n

    def prune(self) -> tuple[int, int]:
        """Delete every record and example map not in the current suite, and temporary leftovers;
        returns (records, other files) removed. FsadError without ``suite.json`` cell ids."""
        ids = self.current_ids()
        if ids is None:
            raise FsadError(f"{self.root / 'suite.json'} lists no cell ids (run `fsad-bench run` on it first)")
        def drop(folder: Path, pattern: str) -> int:
            stale = [p for p in folder.glob(pattern) if p.stem not in ids] if folder.is_dir() else []
            for p in stale:
                p.unlink(missing_ok=True)
            return len(stale)

        return drop(self.cells, "*.json"), drop(self.root / "maps", "*.npz") + self.clean_temporary()

    def clean_temporary(self) -> int:
        """Remove temp files a killed run left (``.<name>.*.tmp``); only call while holding :meth:`lock`."""
        n = 0
        for folder in (self.root, self.cells, self.root / "maps", self.root / "tables"):
            for p in folder.glob(".*.tmp") if folder.is_dir() else []:
                p.unlink(missing_ok=True)
                n += 1
        return n

    # -- one writer at a time ---------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``<out>/.lock`` (flock, released by the kernel even on kill -9). A second run on the
        same folder gets FsadError at once; creating the folder checks that it is writable.
        Re-entrant within one process (the CLI holds it around ``run_suite``, which takes it too)."""
        key = str(self.root.resolve())
        if _HELD.get(key):
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        if self.root.exists() and not self.root.is_dir():
            raise FsadError(f"results folder {self.root} is a file, not a folder")
        path = self.root / ".lock"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as err:
            raise FsadError(f"cannot write to results folder {self.root}: {err.strerror or err}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise FsadError(f"cannot lock {path}: {err.strerror or err}") from None
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise FsadError(f"results folder {self.root} is in use by another fsad-bench run (pid {holder}); "
                                f"wait for it to finish or use another --out") from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as err:
                raise FsadError(f"cannot write to results folder {self.root}: {err.strerror or err}") from None
            _HELD[key] = 1
            try:
                yield
            finally:
                _HELD.pop(key, None)
        finally:
            os.close(fd)  # releases the flock


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
    atomic_savez(path, maps=maps[idx].astype(np.float32), images=rgb, masks=(masks[idx] > 0.5).astype(np.uint8),
                 image_paths=np.array([str(paths[i]) for i in idx]), index=idx)
    return path


def with_train_seed(df: pd.DataFrame) -> pd.DataFrame:
    """Records as a DataFrame with an integer ``train_seed`` column: records written before the
    training-seed axis existed (no such field) read as train seed 0."""
    if "train_seed" not in df.columns:
        return df.assign(train_seed=0)
    return df.assign(train_seed=df["train_seed"].fillna(0).astype(int))
