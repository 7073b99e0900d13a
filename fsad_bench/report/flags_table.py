"""Flagged cells in the tables: a ``†`` on every table cell one of whose records carries a flag that
concerns the table's metric, a ``flagged`` column counting them per row, and notes naming the flags.

Records carry ``flags`` (:mod:`fsad_bench.run.flags`): ``[]`` = checked, clean. Records written
before flags existed have none: they are counted as unchecked in a note, never marked and never
taken for clean. Image flags mark image-metric tables, map flags pixel-metric tables (an unknown
name marks both). ``fsad-bench table --strict`` fails when :func:`flagged_records` finds any.

The chance-level reference (method ``random``) is expected to be at chance: its ``chance`` flag stays
in its records but is neither marked nor counted (:data:`EXPECTED`); any other flag of it is.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pandas as pd

from fsad_bench.report.published import MEAN_ROW, STD_ROW
from fsad_bench.run.flags import IMAGE_FLAGS, MAP_FLAGS

MARK = "†"
FLAGGED_COLUMN = ("flagged", "")
#: One phrase per flag, for the tables' column and notes.
FLAG_TEXT = {
    "nonfinite_scores": "non-finite scores",
    "nonfinite_maps": "non-finite maps",
    "constant_scores": "constant scores",
    "auroc_half_from_ties": "AUROC 0.5 from ties",
    "chance": "not better than chance (permutation test)",
    "constant_maps": "constant maps",
    "identical_maps": "maps identical across images (a fixed spatial prior)",
}


#: Flags a method carries by design (method name -> flag names): not marked, not counted by ``--strict``.
EXPECTED: dict[str, set[str]] = {"random": {"chance"}}


def flags_of(value: Any) -> list[str] | None:
    """A record's ``flags`` as a list of names, or None when unknown (absent, or not a list of strings)."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _relevant(flags: list[str], metric: str) -> list[str]:
    other = MAP_FLAGS if metric.startswith("image_") else IMAGE_FLAGS
    return [f for f in flags if f not in other]


def _column(df: pd.DataFrame) -> pd.Series:
    """Each record's flags (those its method carries by design, :data:`EXPECTED`, left out), None when unknown."""
    if "flags" not in df.columns:
        return pd.Series([None] * len(df), index=df.index, dtype=object)
    out = [
        None if (f := flags_of(v)) is None else [n for n in f if n not in EXPECTED.get(m, set())]
        for v, m in zip(df["flags"], df["method"])
    ]
    return pd.Series(out, index=df.index, dtype=object)


def flagged_records(df: pd.DataFrame) -> Counter:
    """Flag name -> how many records of ``df`` carry it (records without flags are not counted)."""
    return Counter(f for flags in _column(df) if flags for f in flags)


def n_flagged(df: pd.DataFrame) -> int:
    """How many records of ``df`` carry at least one flag."""
    return sum(1 for flags in _column(df) if flags)


def n_unchecked(df: pd.DataFrame) -> int:
    """How many records of ``df`` have no ``flags`` field (written before flags existed)."""
    return sum(1 for flags in _column(df) if flags is None)


def _describe(names: set[str]) -> str:
    return ", ".join(FLAG_TEXT.get(n, n) for n in sorted(names))


def mark_flags(table: pd.DataFrame, df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``table`` (a :func:`~fsad_bench.report.tables.paper_table` of ``metric`` built from ``df``) with
    ``†`` after every cell with a flagged record, the ``Mean`` cell of such a column marked too, and a
    ``flagged`` column: per category ``"<n> flagged cells: <flags>"``, on ``Mean`` the total. Unchanged
    (but for a note on unchecked records) when nothing concerning ``metric`` is flagged."""
    table = table.copy()
    table.attrs = dict(table.attrs, notes=list(table.attrs.get("notes", [])))
    flags = _column(df)
    per_cell: dict[tuple[str, str], set[str]] = {}  # (category, column k) -> flags
    cols: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for (_, r), names in zip(df.iterrows(), flags):
        names = _relevant(names or [], metric)
        col = (f"k={r['k']}", r["label"])
        if names and col in table.columns and r["category"] in table.index:
            per_cell.setdefault((r["category"], col), set()).update(names)
    if unchecked := n_unchecked(df):
        table.attrs["notes"].append(
            f"{unchecked} record{'s' if unchecked > 1 else ''} without flags (written "
            f"before flags existed): not checked for degenerate scores"
        )
    if not per_cell:
        return table
    column = pd.Series("", index=table.index, dtype=object)
    for cat, col in per_cell:
        table.loc[cat, col] = f"{table.loc[cat, col]} {MARK}"
        cols.setdefault(cat, []).append(col)
    for cat, marked in cols.items():
        names = set().union(*(per_cell[(cat, c)] for c in marked))
        column[cat] = f"{len(marked)} flagged cell{'s' if len(marked) > 1 else ''}: {_describe(names)}"
    mean_cols = sorted({col for (_, col) in per_cell})
    if MEAN_ROW in table.index:
        for col in mean_cols:
            table.loc[MEAN_ROW, col] = f"{table.loc[MEAN_ROW, col]} {MARK}"
        column[MEAN_ROW] = f"{len(per_cell)} flagged cell{'s' if len(per_cell) > 1 else ''} in all"
    if STD_ROW in table.index:
        column[STD_ROW] = ""
    table[FLAGGED_COLUMN if isinstance(table.columns, pd.MultiIndex) else FLAGGED_COLUMN[0]] = column
    every = set().union(*per_cell.values())
    table.attrs["notes"].append(
        f"{MARK} a record of the cell is flagged ({_describe(every)}; "
        "docs/flags-and-operating-point.md); Mean cells marked when they average one"
    )
    return table


def strict_failure(df: pd.DataFrame) -> str | None:
    """Why ``fsad-bench table --strict`` fails on the records ``df`` (one line), or None when no record is flagged."""
    n = n_flagged(df)
    if not n:
        return None
    per = ", ".join(f"{FLAG_TEXT.get(f, f)}: {c}" for f, c in sorted(flagged_records(df).items()))
    return f"{n} of {len(df)} records flagged ({per})"
