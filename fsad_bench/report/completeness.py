"""Planned against present cells of a results folder: which aggregates are over the whole suite.

A run writes ``suite.json`` (the suite dict and the ids of every planned cell, ``cell_ids``) before
its first cell; an interrupted run leaves fewer records than cells. Every aggregate of the report
layer (a table cell, a ``Mean`` row, a plot point, an export row) covers one (method, k) or one
(method, k, category); :func:`completeness` counts, for each, the planned categories, runs, training
seeds and cells and how many of them hold a valid record. An aggregate missing any planned cell is
*incomplete*: tables append :data:`MARK` to it and a note such as ``regad k=2: 1/4 categories, 1/3
seeds, 2/12 cells``; ``--complete-only`` hides it; exports carry a ``complete`` column; the AUROC-vs-k
plot draws its point hollow.

A folder without ``suite.json`` cell ids has no plan: everything present counts as complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from fsad_bench.records.store import ResultStore

#: Appended to an incomplete aggregate in a table (``83.4 ± 1.4 *``).
MARK = "*"
_ID = re.compile(r"^(?P<name>.+)-k(?P<k>\d+)-r(?P<run>\d+)(?:-t(?P<t>\d+))?-[^-]+$")


def _file_name(text: str) -> str:
    """How :class:`fsad_bench.run.plan.Cell` writes a (method, category) into a cell id."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


@dataclass(frozen=True)
class Coverage:
    """Planned / present counts of one (method, k) or (method, k, category) aggregate."""

    method: str
    k: int
    category: str | None
    categories: tuple[int, int]  # (present, planned): categories with at least one record
    runs: tuple[int, int]  # runs with at least one record
    seeds: tuple[int, int]  # training seeds with at least one record
    cells: tuple[int, int]

    @property
    def complete(self) -> bool:
        return self.cells[0] >= self.cells[1]

    def note(self) -> str:
        """``regad k=2: 1/4 categories, 1/3 seeds, 2/12 cells`` (axes without a gap left out; cells always)."""
        where = f"{self.method} k={self.k}" + (f" {self.category}" if self.category else "")
        parts = [
            f"{p}/{n} {what}"
            for (p, n), what in ((self.categories, "categories"), (self.runs, "runs"), (self.seeds, "seeds"))
            if p < n and not (what == "categories" and self.category)
        ]
        return f"{where}: {', '.join(parts + [f'{self.cells[0]}/{self.cells[1]} cells'])}"


@dataclass
class Completeness:
    """Coverage of every planned (method, k) and (method, k, category) of a results folder."""

    planned: bool  # False: no plan in suite.json, every aggregate counts as complete
    groups: dict[tuple[str, int], Coverage] = field(default_factory=dict)
    per_category: dict[tuple[str, int, str], Coverage] = field(default_factory=dict)
    #: table label -> method, from the records present
    methods_of: dict[str, str] = field(default_factory=dict)

    def complete(self, method: str, k: int, category: str | None = None) -> bool:
        cov = (
            self.groups.get((method, int(k))) if category is None else self.per_category.get((method, int(k), category))
        )
        return cov is None or cov.complete

    def label_complete(self, label: str, k: int, category: str | None = None) -> bool:
        return self.complete(self.methods_of.get(label, label), k, category)

    def incomplete(self) -> list[Coverage]:
        """Incomplete (method, k) aggregates, in plan order."""
        return [c for c in self.groups.values() if not c.complete]

    def notes(self, methods: set[str] | None = None) -> list[str]:
        """One line naming every incomplete (method, k) (of ``methods``, default all), or none."""
        bad = [c for c in self.incomplete() if methods is None or c.method in methods]
        if not bad:
            return []
        return [
            f"{MARK} incomplete, not an aggregate over the suite's planned cells (`fsad-bench run` finishes them; "
            f"--complete-only hides them): " + "; ".join(c.note() for c in bad)
        ]

    def complete_rows(self, df: pd.DataFrame) -> pd.Series:
        """Per record row of ``df`` (``method``, ``k``): whether its (method, k) is complete."""
        return pd.Series([self.complete(m, k) for m, k in zip(df["method"], df["k"])], index=df.index, dtype=bool)


def planned_cells(suite: dict[str, Any], categories: set[str] = frozenset()) -> pd.DataFrame:
    """The suite's planned cells (``suite.json``'s ``cell_ids``) as rows ``cell_id, method, category, k, run,
    train_seed``. The method and category are read back from the id with the suite's ``methods`` and
    the known ``categories`` (the suite's, plus those of the records); a name no pair matches goes to the
    longest method name it starts with."""
    methods = list(suite.get("methods") or [])
    known = set(suite.get("categories") or []) | set(categories)
    by_name = {_file_name(f"{m}-{c}"): (m, c) for m in methods for c in known}
    prefixes = sorted(((_file_name(m) + "-", m) for m in methods), key=lambda p: -len(p[0]))
    rows = []
    for cid in suite.get("cell_ids") or []:
        m = _ID.match(cid)
        if m is None:
            continue
        name = m["name"]
        pair = by_name.get(name) or next(((meth, name[len(p) :]) for p, meth in prefixes if name.startswith(p)), None)
        if pair is None:
            continue
        rows.append(
            {
                "cell_id": cid,
                "method": pair[0],
                "category": pair[1],
                "k": int(m["k"]),
                "run": int(m["run"]),
                "train_seed": int(m["t"] or 0),
            }
        )
    return pd.DataFrame(rows, columns=["cell_id", "method", "category", "k", "run", "train_seed"])


def _coverage(method: str, k: int, category: str | None, plan: pd.DataFrame, have: pd.DataFrame) -> Coverage:
    def count(col: str) -> tuple[int, int]:
        return int(have[col].nunique()), int(plan[col].nunique())

    return Coverage(
        method, int(k), category, count("category"), count("run"), count("train_seed"), (len(have), len(plan))
    )


def completeness(store: ResultStore | str, records: list[dict[str, Any]] | None = None) -> Completeness:
    """Planned against present cells of a results folder (``records``: its current records, read when None)."""
    store = store if isinstance(store, ResultStore) else ResultStore(store)
    suite = store.load_suite() or {}
    records = store.current_records() if records is None else records
    out = Completeness(planned=bool(suite.get("cell_ids")), methods_of={r["label"]: r["method"] for r in records})
    if not out.planned:
        return out
    plan = planned_cells(suite, {r["category"] for r in records})
    have_ids = {r["cell_id"] for r in records}
    plan["present"] = plan["cell_id"].isin(have_ids)
    for (method, k), p in plan.groupby(["method", "k"], sort=False):
        out.groups[(method, int(k))] = _coverage(method, k, None, p, p[p["present"]])
        for cat, pc in p.groupby("category", sort=False):
            out.per_category[(method, int(k), cat)] = _coverage(method, k, cat, pc, pc[pc["present"]])
    return out


def _column_key(col: Any) -> tuple[int, str] | None:
    """``("k=2", label)`` -> ``(2, label)``; None for other columns (published numbers)."""
    if isinstance(col, tuple) and len(col) == 2 and str(col[0]).startswith("k="):
        try:
            return int(str(col[0])[2:]), str(col[1])
        except ValueError:
            return None
    return None


def mark_table(table: pd.DataFrame, comp: Completeness, mean_rows: tuple[str, ...], hide: bool = False) -> pd.DataFrame:
    """A paper table (columns ``(f"k={k}", label)``, rows categories + ``mean_rows``) whose incomplete
    cells carry :data:`MARK`: the ``mean_rows`` of an incomplete (method, k), a category cell missing
    some of its planned runs or seeds; the note (:meth:`Completeness.notes`) goes to ``attrs["notes"]``.
    ``hide``: the columns of incomplete (method, k) are dropped instead."""
    if table.empty or not comp.planned:
        return table
    if hide:
        keep = [c for c in table.columns if (key := _column_key(c)) is None or comp.label_complete(key[1], key[0])]
        out = table[keep].copy()
        out.attrs = dict(table.attrs)
        return out
    out = table.copy()
    methods = set()
    for col in out.columns:
        key = _column_key(col)
        if key is None:
            continue
        k, label = key
        for row in out.index:
            value = out.at[row, col]
            if value in ("–", None) or (isinstance(value, float) and pd.isna(value)):
                continue
            category = None if row in mean_rows else row
            if not comp.label_complete(label, k, category):
                out.at[row, col] = f"{value} {MARK}"
                methods.add(comp.methods_of.get(label, label))
    out.attrs = dict(table.attrs)
    if notes := comp.notes(methods):
        out.attrs["notes"] = [*out.attrs.get("notes", []), *notes]
    return out


def complete_column(
    table: pd.DataFrame, comp: Completeness, label_col: str | None = None, k_col: str | None = "k"
) -> pd.DataFrame:
    """A long table (one row per label, or per (label, k)) with a ``complete`` column: its (method, k) —
    every k of the label when ``k_col`` is None — has every planned cell. ``label_col`` None: the index."""
    out = table.copy()
    labels = out.index if label_col is None else out[label_col]
    ks = out[k_col] if k_col is not None and k_col in out.columns else [None] * len(out)
    flags = []
    for label, k in zip(labels, ks):
        method = comp.methods_of.get(str(label), str(label))
        if k is None or k == "all":
            flags.append(all(c.complete for (m, _), c in comp.groups.items() if m == method))
        else:
            flags.append(comp.complete(method, int(k)))
    out["complete"] = flags
    out.attrs = dict(table.attrs)
    return out
