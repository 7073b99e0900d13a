"""Result store: one JSON record per benchmark cell, written atomically.

Layout of a results folder::

    <out>/cells/<cell_id>.json   one finished cell each (write to a temp file, then rename)
    <out>/maps/<cell_id>.npz     a few test images' anomaly maps of one cell (figures)
    <out>/suite.json             the suite as run, with the ids of its cells (``cell_ids``)
    <out>/tables/                reports written by the reporter
    <out>/.lock                  held (flock) by the run writing the folder

A cell file appears whole or not at all, so a killed run loses at most the cells in
flight, parallel workers never clash (different cells, different files) and a rerun skips
every cell whose file holds a valid record (resume). A cell id contains the hash of everything that
changes its numbers (:func:`fsad_bench.run.plan.config_hash`).

Every record is read through :func:`check_record` (a JSON object; ids, names, k and run of the
right types; every metric of :data:`fsad_bench.metrics.METRICS` a finite number in [0, 1], the
pixel metrics all null together where the masks hold no defect pixel; the record's ``cell_id``
equal to its file name): an invalid file is never shown, exported or counted as done — it is
named by :meth:`ResultStore.invalid`, noted under every table, recomputed by ``fsad-bench run``
and deleted by ``fsad-bench prune``.

``suite.json`` holds the suite as last run with the ids of its cells (``cell_ids``: what tables
show, :meth:`ResultStore.frame`) and ``kept_ids``: the records of earlier runs into the folder
that no later run has replaced (e.g. the other methods' cells after ``run --methods random``).
A record claimed by neither is stale — its (method, category, k, run, train seed) was recomputed
under another configuration — and only those, and invalid files, are removed by ``fsad-bench
prune``. A folder holds one suite (:meth:`ResultStore.save_suite` refuses another name). Files are
written with the ordinary mode (0666 minus the umask: 0644 by default) so that other users and the
workers of a cluster can read them; a write that fails (disk full, read-only) leaves no
temporary file and raises FsadError naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fsad_bench.budgets import with_budget_tag
from fsad_bench.errors import FsadError
from fsad_bench.metrics import METRICS


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

#: Metrics every record holds as a number (a test set always has normal and anomalous images).
IMAGE_METRICS: tuple[str, ...] = tuple(m for m in METRICS if m.startswith("image_"))
#: Metrics undefined — all together — when the test masks hold no defect pixel (:func:`fsad_bench.metrics.evaluate`
#: gives NaN; the store writes null, and reads a record written before with NaN for all of them as null).
PIXEL_METRICS: tuple[str, ...] = tuple(m for m in METRICS if m not in IMAGE_METRICS)
#: Fields of every record and their types (``train_seed``, when present, is an integer too).
REQUIRED: dict[str, type] = {
    "cell_id": str,
    "method": str,
    "label": str,
    "dataset": str,
    "category": str,
    "k": int,
    "run": int,
    "config_hash": str,
}
_SLOT = re.compile(r"^(?P<name>.+)-k(?P<k>\d+)-r(?P<run>\d+)(?:-t(?P<t>\d+))?-[^-]+$")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _undefined_as_null(data: Any) -> Any:
    """A record whose pixel metrics are all NaN or null (masks without a defect pixel) with them all null."""
    if isinstance(data, dict) and all(
        m in data and (data[m] is None or (isinstance(data[m], float) and math.isnan(data[m]))) for m in PIXEL_METRICS
    ):
        return dict(data, **{m: None for m in PIXEL_METRICS})
    return data


def check_record(data: Any, cell_id: str) -> str | None:
    """Why ``data`` (the parsed content of ``cells/<cell_id>.json``) is not a valid record, or None.

    Valid: a JSON object with the :data:`REQUIRED` fields of the right types, ``cell_id`` equal to
    the file's name, every metric of :data:`METRICS` a finite number in [0, 1] — the
    :data:`PIXEL_METRICS` may all be null together (undefined: no defect pixel in the masks)."""
    if not isinstance(data, dict):
        return f"not a JSON object but {'null' if data is None else type(data).__name__}"
    for key, typ in REQUIRED.items():
        if key not in data:
            return f"no {key}"
        if not (_is_int(data[key]) if typ is int else isinstance(data[key], typ)):
            return f"{key} is {data[key]!r}, not {'an integer' if typ is int else 'a string'}"
    if "train_seed" in data and not _is_int(data["train_seed"]):
        return f"train_seed is {data['train_seed']!r}, not an integer"
    if data["cell_id"] != cell_id:
        return f"holds the record of another cell ({data['cell_id']})"
    undefined = [m for m in PIXEL_METRICS if m in data and data[m] is None]
    if undefined and len(undefined) < len(PIXEL_METRICS):
        return f"{', '.join(undefined)} null but not every pixel metric (they are undefined all together)"
    for m in METRICS:
        if m not in data:
            return f"no {m}"
        v = data[m]
        if v is None and m in PIXEL_METRICS:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
            return f"{m} is {v!r}, not a number in [0, 1]"
    return None


def slot(cell_id: str) -> str:
    """The (method, category, k, run, train seed) part of a cell id — equal for the same cell under
    two configurations (ids end in the hash of the configuration); an id of another form is its own slot."""
    m = _SLOT.match(cell_id)
    return cell_id if m is None else f"{m['name']}-k{m['k']}-r{m['run']}-t{m['t'] or 0}"


def _unreplaced(ids: set[str], current: set[str]) -> set[str]:
    """The ``ids`` not in ``current`` whose (method, category, k, run, train seed) no ``current`` id has."""
    taken = {slot(c) for c in current}
    return {c for c in ids - current if slot(c) not in taken}


class ResultStore:
    """The records of one results folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.cells = self.root / "cells"
        self._seen: dict[Path, tuple[tuple[int, int, int], dict[str, Any] | None, str | None]] = {}

    def path(self, cell_id: str) -> Path:
        return self.cells / f"{cell_id}.json"

    # -- reading: every record through check_record -------------------------------------
    def read(self, path: Path) -> tuple[dict[str, Any] | None, str | None]:
        """``(record, None)`` for a valid cell file, ``(None, why)`` otherwise (see :func:`check_record`)."""
        try:
            st = path.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if path in self._seen and self._seen[path][0] == key:  # records are large: parse each file once
                return self._seen[path][1:]
            text = path.read_text()
        except OSError as err:
            return None, f"unreadable: {err.strerror or err}"
        try:
            data = _undefined_as_null(json.loads(text))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            out: tuple[dict[str, Any] | None, str | None] = (None, f"not JSON ({err})")
        else:
            why = check_record(data, path.stem)
            out = (None, why) if why else (data, None)
        self._seen[path] = (key, *out)
        return out

    def _scan(self) -> tuple[dict[str, dict[str, Any]], dict[Path, str]]:
        valid, invalid = {}, {}
        for p in sorted(self.cells.glob("*.json")) if self.cells.is_dir() else []:
            rec, why = self.read(p)
            if rec is None:
                invalid[p] = why or "?"
            else:
                valid[p.stem] = rec
        return valid, invalid

    def has(self, cell_id: str) -> bool:
        """Whether the cell has a valid record (an invalid file counts as not done: recomputed)."""
        p = self.path(cell_id)
        return p.is_file() and self.read(p)[0] is not None

    def done_ids(self) -> set[str]:
        """Ids of the cells with a valid record."""
        return set(self._scan()[0])

    def invalid(self) -> dict[Path, str]:
        """Cell files that hold no valid record: path -> why (see :func:`check_record`)."""
        return self._scan()[1]

    def records(self) -> list[dict[str, Any]]:
        """Every valid record (by file name); invalid files are skipped, see :meth:`invalid`."""
        return list(self._scan()[0].values())

    def put(self, record: dict[str, Any]) -> None:
        """Write one record (atomic, mode :data:`FILE_MODE`): undefined pixel metrics (NaN) as null; FsadError
        naming the file when it fails or when the record would not read back as valid."""
        record = _undefined_as_null(record)
        path = self.path(record["cell_id"])
        if why := check_record(record, record["cell_id"]):
            raise FsadError(f"refusing to write {path}: {why}")
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))

    # -- the suite of the folder --------------------------------------------------------
    def save_suite(self, suite: dict[str, Any], cell_ids: list[str] | None = None) -> None:
        """Write ``suite.json``; ``cell_ids``: the cells of the suite as it is now (what tables show).

        FsadError when the folder holds another suite (another ``name``). With ``cell_ids`` the
        store also keeps ``kept_ids``: the cells of earlier runs into this folder (its former
        ``cell_ids`` and ``kept_ids``; every valid record for a folder written before ``kept_ids``)
        whose record is valid and whose (method, category, k, run, train seed) is not a cell of
        this run — a run of a subset of the methods leaves the others' records claimed."""
        try:
            previous = self.load_suite()
        except FsadError:
            previous = None  # a corrupt suite.json: rewritten
        if previous is not None and previous.get("name") is not None and previous.get("name") != suite.get("name"):
            raise FsadError(
                f"{self.root} holds suite {previous['name']!r}, not {suite.get('name')!r}; use another "
                f"--out, or delete {self.root} first"
            )
        if cell_ids is None:
            data = suite
        else:
            new = set(cell_ids)
            valid = self.done_ids()
            if previous is not None and "kept_ids" in previous:
                before = set(previous.get("cell_ids") or []) | set(previous["kept_ids"])
            else:
                before = valid
            data = dict(suite, cell_ids=sorted(new), kept_ids=sorted(_unreplaced(before & valid, new)))
        atomic_write_text(self.root / "suite.json", json.dumps(data, indent=1, sort_keys=True))

    def load_suite(self) -> dict[str, Any] | None:
        p = self.root / "suite.json"
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FsadError(f"corrupt {p}: {err} (rerun `fsad-bench run` to rewrite it)") from None
        if not isinstance(data, dict):
            raise FsadError(f"corrupt {p}: not a JSON object (rerun `fsad-bench run` to rewrite it)")
        return data

    # -- the current suite, the kept records and the others -------------------------------
    def current_ids(self) -> set[str] | None:
        """Ids of the cells of the suite as last run (None for a folder written before ids were kept)."""
        suite = self.load_suite()
        ids = suite.get("cell_ids") if suite else None
        return set(ids) if ids is not None else None

    def kept_ids(self) -> set[str]:
        """Ids of the cells of earlier runs into the folder that no later run replaced (not in the tables).
        A ``suite.json`` written before ``kept_ids`` existed keeps every valid record whose (method,
        category, k, run, train seed) is not a current cell (its history is unknown)."""
        suite = self.load_suite()
        if not suite:
            return set()
        if "kept_ids" in suite or suite.get("cell_ids") is None:
            return set(suite.get("kept_ids") or [])
        return _unreplaced(self.done_ids(), set(suite["cell_ids"]))

    def current_records(self) -> list[dict[str, Any]]:
        """The valid records of the suite as last run (every valid record without ``cell_ids``), as reports
        show them: a ``cpu`` budget that is not calibrated is tagged in ``label``
        (:func:`fsad_bench.budgets.with_budget_tag`; the file keeps the label it was written with)."""
        ids = self.current_ids()
        return [with_budget_tag(r) for r in self.records() if ids is None or r["cell_id"] in ids]

    def frame(self, everything: bool = False) -> pd.DataFrame:
        """The valid records of the current suite as a DataFrame (one row per cell); ``everything``: all valid records."""
        recs = self.records() if everything else self.current_records()
        if not recs:
            raise FsadError(f"no results in {self.root} (expected {self.cells}/*.json from `fsad-bench run`)")
        return pd.DataFrame.from_records(recs)

    def _unclaimed(self) -> dict[str, dict[str, Any]]:
        """Valid records no current or kept configuration claims (their cell was recomputed under another one)."""
        ids = self.current_ids()
        if ids is None:
            return {}
        claimed = ids | self.kept_ids()
        return {c: r for c, r in self._scan()[0].items() if c not in claimed}

    def foreign(self) -> Counter:
        """Valid records of another configuration (no current or kept cell), by method: what ``prune`` deletes."""
        return Counter(r["method"] for r in self._unclaimed().values())

    def foreign_note(self) -> str | None:
        """A line about the records of another configuration (tables ignore them, prune deletes them) and one
        about kept records of earlier runs the tables do not show; or None."""
        lines = []
        if n := self.foreign():
            total = sum(n.values())
            per = ", ".join(f"{m}: {c}" for m, c in sorted(n.items()))
            lines.append(
                f"{total} record{'s' if total > 1 else ''} of another configuration ignored ({per}); "
                f"`fsad-bench prune {self.root}` removes them"
            )
        kept = self.kept_ids() & self.done_ids()
        if kept:
            per = ", ".join(f"{m}: {c}" for m, c in sorted(Counter(self._scan()[0][c]["method"] for c in kept).items()))
            lines.append(
                f"{len(kept)} record{'s' if len(kept) > 1 else ''} of earlier runs into this folder kept but "
                f"not tabulated ({per}); a run of their methods shows them again without recomputing"
            )
        return "\n".join(lines) or None

    def invalid_note(self) -> str | None:
        """One line naming how many invalid cell files the tables skipped, or None."""
        bad = self.invalid()
        if not bad:
            return None
        (first, why), more = next(iter(bad.items())), len(bad) - 1
        return (
            f"{len(bad)} invalid record{'s' if len(bad) > 1 else ''} skipped ({first.name}: {why}"
            f"{f'; {more} more' if more else ''}); `fsad-bench run` recomputes the suite's cells, "
            f"`fsad-bench prune {self.root}` deletes the files"
        )

    def remove(self, cell_ids: set[str]) -> int:
        """Delete the records (and example maps) of ``cell_ids``; returns how many records went."""
        n = 0
        for cid in cell_ids:
            if self.path(cid).is_file():
                self.path(cid).unlink()
                n += 1
            (self.root / "maps" / f"{cid}.npz").unlink(missing_ok=True)
        return n

    def prunable(self) -> dict[Path, str]:
        """Cell files ``prune`` deletes: path -> the method of a record of another configuration (no current or
        kept cell claims it), or ``"invalid: <why>"``. FsadError without ``suite.json`` cell ids."""
        if self.current_ids() is None:
            raise FsadError(f"{self.root / 'suite.json'} lists no cell ids (run `fsad-bench run` on it first)")
        out = {p: f"invalid: {why}" for p, why in self.invalid().items()}
        out.update({self.path(c): r["method"] for c, r in self._unclaimed().items()})
        return dict(sorted(out.items()))

    def prune(self, only: set[Path] | None = None) -> tuple[int, int]:
        """Delete the :meth:`prunable` cell files (those of them in ``only``, when given: what the user
        confirmed), the example maps of no current or kept cell and temporary leftovers; returns
        (records, other files) removed. Only call while holding :meth:`lock`."""
        doomed = [p for p in self.prunable() if only is None or p in only]
        for p in doomed:
            p.unlink(missing_ok=True)
        claimed = (self.current_ids() or set()) | self.kept_ids()
        maps = self.root / "maps"
        stale_maps = [p for p in maps.glob("*.npz") if p.stem not in claimed] if maps.is_dir() else []
        for p in stale_maps:
            p.unlink(missing_ok=True)
        return len(doomed), len(stale_maps) + self.clean_temporary()

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
        created = not self.root.exists()  # a run refused before any work leaves no folder behind
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
                raise FsadError(
                    f"results folder {self.root} is in use by another fsad-bench run (pid {holder}); "
                    f"wait for it to finish or use another --out"
                ) from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as err:
                raise FsadError(f"cannot write to results folder {self.root}: {err.strerror or err}") from None
            _HELD[key] = 1
            try:
                yield
            except FsadError:
                if created and {p.name for p in self.root.iterdir()} <= {".lock"}:
                    path.unlink(missing_ok=True)  # bad input found while holding the lock: nothing to keep
                    with contextlib.suppress(OSError):
                        self.root.rmdir()
                raise
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


def save_example_maps(
    path: str | Path,
    maps: Any,
    images: Any,
    masks: Any,
    paths: list[Any],
    labels: Any | None = None,
    n: int = EXAMPLE_MAPS,
) -> Path:
    """Keep a few test images' anomaly maps of one cell for :func:`plot_map_grids`.

    maps ``(N, S, S)`` float (higher = more anomalous), images ``(N, 3, S, S)`` in [0, 1] — or a
    function ``images(index) -> (len(index), 3, S, S)`` that loads only the chosen ones (the
    run layer streams test images and keeps none) —, masks ``(N, S, S)`` 0/1, paths: N image paths,
    labels: optional ``(N,)`` 0/1 image labels (used to pick anomalous examples of several defect
    types — the images' parent folders — plus one normal, see :func:`pick_examples`). numpy
    arrays or torch tensors. Writes ``path`` (``<out>/maps/<cell_id>.npz``) with keys
    ``maps`` (n, S, S) float32 — the maps as predicted, so a map of values ~1e-8 keeps its
    contrast (float16 flushed such maps to zero) —, ``images`` (n, S, S, 3) uint8, ``masks``
    (n, S, S) uint8, ``image_paths`` (n,) str, ``index`` (n,) int (positions in the test set)."""
    maps, masks = _to_numpy(maps), _to_numpy(masks)
    idx = pick_examples(
        None if labels is None else _to_numpy(labels), n, len(maps), groups=[Path(str(p)).parent.name for p in paths]
    )
    chosen = _to_numpy(images(idx) if callable(images) else _to_numpy(images)[idx])
    rgb = np.clip(np.round(255 * chosen.transpose(0, 2, 3, 1)), 0, 255).astype(np.uint8)
    path = Path(path)
    atomic_savez(
        path,
        maps=maps[idx].astype(np.float32),
        images=rgb,
        masks=(masks[idx] > 0.5).astype(np.uint8),
        image_paths=np.array([str(paths[i]) for i in idx]),
        index=idx,
    )
    return path


def with_train_seed(df: pd.DataFrame) -> pd.DataFrame:
    """Records as a DataFrame with an integer ``train_seed`` column: records written before the
    training-seed axis existed (no such field) read as train seed 0."""
    if "train_seed" not in df.columns:
        return df.assign(train_seed=0)
    return df.assign(train_seed=df["train_seed"].fillna(0).astype(int))
