"""Result store: one JSON record per benchmark cell, written atomically.

Layout of a results folder::

    <out>/cells/<cell_id>.json   one finished cell each (write to a temp file, then rename)
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
