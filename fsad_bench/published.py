"""Published reference numbers (``results/reference/*.csv``, installed as ``fsad_bench.reference``).

``results/reference/regad_paper.csv`` holds published numbers (``value`` in %); see
``results/reference/README.md`` for where each number comes from and what is missing.
:func:`reference_rows` formats them like :func:`fsad_bench.report.paper_table` columns,
labelled ``"<Method> (paper)"``; :func:`paper_difference` gives measured − paper for the
methods whose registry name maps to a paper name (:data:`PAPER_NAMES`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import FsadError

MEAN_ROW, STD_ROW = "Mean", "Std (categories)"  # the row names of fsad_bench.report's tables
# registry name -> method name used in the RegAD paper's tables
PAPER_NAMES = {"regad": "RegAD", "diffnet+": "DiffNet+", "tdg+": "TDG+"}
# results/reference/ in the repository, installed as package data of fsad_bench.reference
REFERENCE_CSV = Path(str(resources.files("fsad_bench.reference") / "regad_paper.csv"))
#: Further published-number files beside it, loaded with it by default (same columns; extra
#: columns such as ``std`` allowed): few-shot PaDiM / PatchCore from the WinCLIP paper.
EXTRA_REFERENCE_CSVS = ("fewshot_baselines.csv",)
PAPER_NAMES["patchcore"] = "PatchCore"


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """Published numbers, tidy: dataset, category (``Mean`` = the published average), method
    (paper spelling), k, metric, value (%). ``path`` defaults to ``$FSAD_BENCH_REFERENCE`` or
    ``results/reference/regad_paper.csv`` (installed as ``fsad_bench.reference``)."""
    explicit = path or os.environ.get("FSAD_BENCH_REFERENCE")
    path = Path(explicit or REFERENCE_CSV)
    if not path.is_file():
        raise FsadError(f"reference numbers not found at {path} (set FSAD_BENCH_REFERENCE to the CSV)")
    ref = pd.read_csv(path, dtype={"dataset": str, "category": str, "method": str, "metric": str})
    if not explicit:  # the default: every shipped file
        extra = [REFERENCE_CSV.parent / name for name in EXTRA_REFERENCE_CSVS]
        ref = pd.concat([ref] + [pd.read_csv(p, dtype={"dataset": str, "category": str, "method": str, "metric": str})
                                 for p in extra if p.is_file()], ignore_index=True)
    missing = {"dataset", "category", "method", "k", "metric", "value"} - set(ref.columns)
    if missing:
        raise FsadError(f"{path}: missing columns {sorted(missing)}")
    return ref.astype({"k": int, "value": float})


def reference_rows(dataset: str, metric: str = "image_auroc", ks: Iterable[int] | None = None,
                   methods: Iterable[str] | None = None, decimals: int = 1,
                   reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Published numbers shaped like :func:`fsad_bench.report.paper_table`: index = categories
    + ``Mean`` + ``Std (categories)``, columns ``(f"k={k}", "<Method> (paper)")``, text cells.

    ``Mean`` is the published average; ``Std (categories)`` is computed here from the published
    per-category numbers (sample std), ``–`` where the paper gives no per-category numbers.
    Empty DataFrame when nothing matches."""
    ref = load_reference() if reference is None else reference
    ref = ref[(ref["dataset"] == dataset) & (ref["metric"] == metric)]
    if ks is not None:
        ref = ref[ref["k"].isin(list(ks))]
    if methods is not None:
        ref = ref[ref["method"].isin(list(methods))]
    if ref.empty:
        return pd.DataFrame()
    fmt = f"{{:.{decimals}f}}"
    cats = sorted(c for c in ref["category"].unique() if c != MEAN_ROW)
    cols = pd.MultiIndex.from_tuples(
        [(f"k={k}", f"{m} (paper)") for k in sorted(ref["k"].unique()) for m in dict.fromkeys(ref["method"])
         if ((ref["k"] == k) & (ref["method"] == m)).any()], names=["k", "method"])
    table = pd.DataFrame("–", index=cats + [MEAN_ROW, STD_ROW], columns=cols, dtype=object)
    for r in ref.itertuples():
        table.loc[r.category, (f"k={r.k}", f"{r.method} (paper)")] = fmt.format(r.value)
    for (k, m), g in ref[ref["category"] != MEAN_ROW].groupby(["k", "method"]):
        if len(g) > 1:
            table.loc[STD_ROW, (f"k={k}", f"{m} (paper)")] = fmt.format(g["value"].std(ddof=1))
    table.index.name = "category"
    return table


def attach_reference(table: pd.DataFrame, dataset: str, metric: str = "image_auroc", decimals: int = 1,
                     reference: pd.DataFrame | None = None, missing_ok: bool = True) -> pd.DataFrame:
    """A paper table with the published columns of the same k values inserted after each k's
    measured columns; rows are the union (measured categories first). Unchanged when the
    reference has nothing for this dataset / metric / k, or (``missing_ok``) when the
    reference file is absent.

    The published ``Mean`` averages the paper's categories; a measured ``Mean`` over fewer
    categories is not comparable with it (use :func:`paper_difference` for that)."""
    if reference is None:
        try:
            reference = load_reference()
        except FsadError:
            if missing_ok:
                return table
            raise
    ks = [int(c[0].split("=", 1)[1]) for c in table.columns] if len(table.columns) else None
    ref = reference_rows(dataset, metric, ks, decimals=decimals, reference=reference)
    if ref.empty:
        return table
    rows = [r for r in table.index if r not in (MEAN_ROW, STD_ROW)]
    rows += [r for r in ref.index if r not in rows and r not in (MEAN_ROW, STD_ROW)]
    merged = pd.concat([table, ref], axis=1).reindex(rows + [MEAN_ROW, STD_ROW]).fillna("–")
    order = sorted(range(len(merged.columns)), key=lambda i: (int(merged.columns[i][0].split("=")[1]), i))
    merged = merged.iloc[:, order]
    merged.index.name = table.index.name or "category"
    return merged


def paper_difference(df: pd.DataFrame, dataset: str, metric: str = "image_auroc",
                     reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Measured − published, for labels whose method maps to a paper name (:data:`PAPER_NAMES`).

    One row per (label, k, category) present in both, plus a ``Mean`` row per (label, k):
    measured = mean over runs (%), the ``Mean`` row the macro average over the measured
    categories. Its paper value is the published average when every published category was
    measured (``paper_basis = "published"``), else the mean of the published per-category
    numbers over the measured categories (``"mean of N categories"``) so both sides average
    the same categories. Columns: dataset, label, method, paper_method, k, category,
    measured, paper, diff, n_runs, paper_basis."""
    ref = load_reference() if reference is None else reference
    ref = ref[(ref["dataset"] == dataset) & (ref["metric"] == metric)]
    d = df[(df["dataset"] == dataset) & df["method"].isin(list(PAPER_NAMES))].dropna(subset=[metric])
    columns = ["dataset", "label", "method", "paper_method", "k", "category", "measured", "paper", "diff",
               "n_runs", "paper_basis"]
    if d.empty or ref.empty:
        return pd.DataFrame(columns=columns)
    per_cat = (d.assign(value=100 * d[metric].astype(float))
               .groupby(["label", "method", "k", "category"])["value"].agg(measured="mean", n_runs="count")
               .reset_index())
    rows = []
    for (label, method, k), g in per_cat.groupby(["label", "method", "k"]):
        pm = PAPER_NAMES[method]
        r = ref[(ref["method"] == pm) & (ref["k"] == k)]
        if r.empty:
            continue
        published = dict(zip(r["category"], r["value"]))
        cats_ref = {c for c in published if c != MEAN_ROW}
        for row in g.itertuples():
            if row.category in published:
                rows.append([dataset, label, method, pm, int(k), row.category, row.measured,
                             published[row.category], row.measured - published[row.category], int(row.n_runs),
                             "published"])
        measured_mean = g["measured"].mean()
        measured_cats = set(g["category"])
        if cats_ref and measured_cats == cats_ref and MEAN_ROW in published:
            paper, basis = published[MEAN_ROW], "published"
        elif cats_ref and measured_cats <= cats_ref:
            paper = float(np.mean([published[c] for c in measured_cats]))
            basis = f"mean of {len(measured_cats)} categories"
        elif not cats_ref and MEAN_ROW in published and len(measured_cats) > 0:
            paper, basis = published[MEAN_ROW], "published (categories may differ)"
        else:
            continue
        rows.append([dataset, label, method, pm, int(k), MEAN_ROW, measured_mean, paper, measured_mean - paper,
                     int(g["n_runs"].min()), basis])
    return pd.DataFrame(rows, columns=columns)
