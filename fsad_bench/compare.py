"""Reports beyond the papers: paired method comparisons, published reference numbers, cost ratios.

Paired comparison
    Two methods are compared on the cells they share, one pair per
    ``(dataset, category, k, run)``: the same support draw and the same test set, so the
    difference ``a - b`` (in AUROC percentage points) removes the category and support-set
    effects. Per dataset and k (and over all k) we report the number of pairs, the mean
    difference, a percentile-bootstrap 95 % CI of the mean difference (cells resampled with
    replacement, seeded ``numpy.random.Generator``), win / tie / loss counts and the
    two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped).

    Caveats: runs of one category share the category's test set, so pairs are not fully
    independent (the test and the CI treat every cell as one observation). With fewer than
    6 non-zero pairs the exact two-sided Wilcoxon p-value cannot fall below 0.05
    (minimum ``2 / 2**n``), so a 4-category single-run suite can never show a star.

Reference numbers
    ``results/reference/regad_paper.csv`` holds published numbers (``value`` in %); see
    ``results/reference/README.md`` for where each number comes from and what is missing.
    :func:`reference_rows` formats them like :func:`fsad_bench.report.paper_table` columns,
    labelled ``"<Method> (paper)"``; :func:`paper_difference` gives measured − paper for the
    methods whose registry name maps to a paper name (:data:`PAPER_NAMES`).

Cost
    :func:`cost_ratio_table`: per method label, adaptation seconds and its ratio to the
    fastest label, inference ms/image (and ratio), training minutes, peak memory.
"""

from __future__ import annotations

import os
from importlib import resources
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .errors import FsadError

MEAN_ROW, STD_ROW = "Mean", "Std (categories)"  # the same row names as fsad_bench.report
KEYS = ["dataset", "category", "k", "run"]
# registry name -> method name used in the RegAD paper's tables
PAPER_NAMES = {"regad": "RegAD", "diffnet+": "DiffNet+", "tdg+": "TDG+"}
# results/reference/ in the repository, installed as package data of fsad_bench.reference
REFERENCE_CSV = Path(str(resources.files("fsad_bench.reference") / "regad_paper.csv"))


# ---------------------------------------------------------------------------------------
# paired statistics
# ---------------------------------------------------------------------------------------

def resolve_label(df: pd.DataFrame, who: str) -> str:
    """The table label meant by ``who``: a label as is, or a method name with exactly one label."""
    labels = list(dict.fromkeys(df["label"]))
    if who in labels:
        return who
    hits = list(dict.fromkeys(df.loc[df["method"] == who, "label"]))
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise FsadError(f"method {who!r} has several labels {hits}; name one of them")
    raise FsadError(f"no results for {who!r}; labels present: {labels}")


def paired_cells(df: pd.DataFrame, a: str, b: str, metric: str = "image_auroc") -> pd.DataFrame:
    """One row per cell both ``a`` and ``b`` finished: KEYS, ``a``, ``b`` (metric in %) and
    ``diff = a - b`` (percentage points). Cells where either value is missing are dropped."""
    la, lb = resolve_label(df, a), resolve_label(df, b)
    if la == lb:
        raise FsadError(f"{a!r} and {b!r} are the same label {la!r}")
    sides = []
    for lab, col in ((la, "a"), (lb, "b")):
        d = df.loc[df["label"] == lab, KEYS + [metric]].dropna(subset=[metric])
        if d.duplicated(KEYS).any():
            raise FsadError(f"label {lab!r} has several results for one (dataset, category, k, run)")
        sides.append(d.rename(columns={metric: col}))
    pairs = sides[0].merge(sides[1], on=KEYS, how="inner")
    pairs[["a", "b"]] = 100 * pairs[["a", "b"]].astype(float)
    pairs["diff"] = pairs["a"] - pairs["b"]
    return pairs.sort_values(KEYS).reset_index(drop=True)


def wilcoxon_p(diffs: Iterable[float]) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of paired differences: ``(statistic, p)``.

    ``scipy.stats.wilcoxon`` with ``zero_method="wilcox"`` (zero differences dropped) and its
    automatic choice of exact / normal-approximation p-value. No pair: ``(nan, nan)``;
    every difference zero: ``(0, 1)`` (no evidence of any difference)."""
    d = np.asarray(list(diffs), dtype=float)
    if d.size == 0:
        return float("nan"), float("nan")
    if not np.any(d != 0):
        return 0.0, 1.0
    res = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def bootstrap_ci(diffs: Iterable[float], n_resamples: int = 10_000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of ``diffs`` (resampling the values with replacement).

    Draws ``rng.integers(0, n, (n_resamples, n))`` from ``numpy.random.default_rng(seed)`` —
    the same draws and percentiles as ``scipy.stats.bootstrap(..., method="percentile",
    rng=np.random.default_rng(seed))``. Fewer than two values: ``(nan, nan)``."""
    d = np.asarray(list(diffs), dtype=float)
    if d.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (n_resamples, d.size))].mean(axis=-1)
    alpha = (1 - confidence) / 2
    lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def _summarise(pairs: pd.DataFrame, n_resamples: int, confidence: float, seed: int, tie_tol: float) -> dict:
    d = pairs["diff"].to_numpy(float)
    stat, p = wilcoxon_p(d)
    lo, hi = bootstrap_ci(d, n_resamples, confidence, seed)
    return {
        "n_pairs": int(d.size), "mean_a": float(pairs["a"].mean()) if d.size else np.nan,
        "mean_b": float(pairs["b"].mean()) if d.size else np.nan,
        "mean_diff": float(d.mean()) if d.size else np.nan, "median_diff": float(np.median(d)) if d.size else np.nan,
        "ci_low": lo, "ci_high": hi,
        "wins": int((d > tie_tol).sum()), "ties": int((np.abs(d) <= tie_tol).sum()), "losses": int((d < -tie_tol).sum()),
        "wilcoxon_stat": stat, "p_value": p,
    }


def compare_methods(df: pd.DataFrame, a: str, b: str, metric: str = "image_auroc", n_resamples: int = 10_000,
                    confidence: float = 0.95, seed: int = 0, tie_tol: float = 1e-9) -> pd.DataFrame:
    """Paired comparison of ``a`` against ``b`` (labels or method names), one row per dataset
    and k plus one row per dataset with ``k = "all"``.

    Columns: dataset, k, a, b, metric, n_pairs, mean_a, mean_b, mean_diff, median_diff,
    ci_low, ci_high (percentile bootstrap of the mean difference, ``confidence`` level),
    wins, ties, losses (``|diff| <= tie_tol`` points is a tie), wilcoxon_stat, p_value.
    Values are AUROC percentage points; positive differences favour ``a``."""
    pairs = paired_cells(df, a, b, metric)
    la, lb = resolve_label(df, a), resolve_label(df, b)
    if pairs.empty:
        raise FsadError(f"{la!r} and {lb!r} share no finished cell with a {metric} value")
    rows = []
    for ds, dsp in pairs.groupby("dataset", sort=True):
        groups = [(int(k), g) for k, g in dsp.groupby("k", sort=True)] + [("all", dsp)]
        for k, g in groups:
            rows.append({"dataset": ds, "k": k, "a": la, "b": lb, "metric": metric,
                         **_summarise(g, n_resamples, confidence, seed, tie_tol)})
    return pd.DataFrame(rows)


def marker(p_value: float, mean_diff: float, levels: tuple[float, float] = (0.05, 0.01),
           arrows: tuple[str, str] = ("↑", "↓")) -> str:
    """``"**↑"`` / ``"*↓"`` …: stars for ``p < levels[1]`` / ``p < levels[0]``, arrow for the sign
    of the mean difference (``arrows[0]`` = higher than the reference, e.g. ``("+", "-")`` for
    plain-ASCII LaTeX); ``""`` when not significant."""
    if not np.isfinite(p_value) or p_value >= levels[0]:
        return ""
    return ("**" if p_value < levels[1] else "*") + (arrows[0] if mean_diff > 0 else arrows[1])


def significance_markers(df: pd.DataFrame, reference: str, metric: str = "image_auroc",
                         dataset: str | None = None, levels: tuple[float, float] = (0.05, 0.01),
                         arrows: tuple[str, str] = ("↑", "↓")) -> dict[tuple[str, str], str]:
    """Marker per paper-table column ``(f"k={k}", label)`` for every label other than the
    reference (label or method name), from the paired Wilcoxon test of that label against the
    reference on one dataset (``dataset`` or the only one). Columns with nothing to mark get
    ``""``; the reference's own columns are absent."""
    if dataset is not None:
        df = df[df["dataset"] == dataset]
    if df["dataset"].nunique() > 1:
        raise FsadError(f"results hold several datasets {sorted(df['dataset'].unique())}; pass dataset=")
    ref = resolve_label(df, reference)
    out: dict[tuple[str, str], str] = {}
    for lab in dict.fromkeys(df["label"]):
        if lab == ref:
            continue
        pairs = paired_cells(df, lab, ref, metric)
        for k, g in pairs.groupby("k", sort=True):
            _, p = wilcoxon_p(g["diff"])
            out[(f"k={int(k)}", lab)] = marker(p, float(g["diff"].mean()), levels, arrows)
    return out


def add_significance(table: pd.DataFrame, df: pd.DataFrame, reference: str, metric: str = "image_auroc",
                     dataset: str | None = None, levels: tuple[float, float] = (0.05, 0.01),
                     arrows: tuple[str, str] = ("↑", "↓")) -> pd.DataFrame:
    """Copy of a :func:`fsad_bench.report.paper_table` table whose ``Mean`` cells carry the
    markers of :func:`significance_markers` (e.g. ``"84.1 ± 0.3 **↑"``)."""
    out = table.copy()
    if MEAN_ROW not in out.index:
        return out
    for col, mark in significance_markers(df, reference, metric, dataset, levels, arrows).items():
        if mark and col in out.columns and out.loc[MEAN_ROW, col] not in ("–", None):
            out.loc[MEAN_ROW, col] = f"{out.loc[MEAN_ROW, col]} {mark}"
    return out


def significance_note(reference: str, levels: tuple[float, float] = (0.05, 0.01)) -> str:
    """Footnote for tables with markers."""
    return (f"*: p < {levels[0]}, **: p < {levels[1]}, two-sided Wilcoxon signed-rank test over paired "
            f"(category, run) cells against {reference}; ↑ higher, ↓ lower than {reference}.")


# ---------------------------------------------------------------------------------------
# published reference numbers
# ---------------------------------------------------------------------------------------

def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """Published numbers, tidy: dataset, category (``Mean`` = the published average), method
    (paper spelling), k, metric, value (%). ``path`` defaults to ``$FSAD_BENCH_REFERENCE`` or
    ``results/reference/regad_paper.csv`` (installed as ``fsad_bench.reference``)."""
    path = Path(path or os.environ.get("FSAD_BENCH_REFERENCE") or REFERENCE_CSV)
    if not path.is_file():
        raise FsadError(f"reference numbers not found at {path} (set FSAD_BENCH_REFERENCE to the CSV)")
    ref = pd.read_csv(path, dtype={"dataset": str, "category": str, "method": str, "metric": str})
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


# ---------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------

def cost_ratio_table(df: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """Per label over all cells: adaptation seconds (mean) and its ratio to the fastest label,
    inference ms/image (mean) and its ratio to the fastest, training minutes (mean over cells
    of ``train_seconds``: an aggregated method's one fit per held-out category, an individual
    method's fit on the support set), peak memory (MiB, max) and the number of cells.
    Indexed by label (index name ``method``, like :func:`fsad_bench.report.cost_table`), with
    the registry name in column ``name``; sorted fastest adaptation first; ``methods``
    (registry names) only filters."""
    if methods is not None:
        df = df[df["method"].isin(methods)]
    g = df.groupby("label")
    out = pd.DataFrame({
        "name": g["method"].first(),
        "adapt_s": g["adapt_seconds"].mean(),
        "infer_ms_per_image": 1000 * g["infer_seconds_per_image"].mean(),
        "train_min": g["train_seconds"].mean() / 60,
        "peak_memory_mib": g["peak_memory_mb"].max(),
        "cells": g.size(),
    })
    fastest_adapt = out["adapt_s"].min()
    fastest_infer = out["infer_ms_per_image"].min()
    out.insert(2, "adapt_x_fastest", out["adapt_s"] / fastest_adapt if fastest_adapt > 0 else np.nan)
    out.insert(4, "infer_x_fastest", out["infer_ms_per_image"] / fastest_infer if fastest_infer > 0 else np.nan)
    out["cells"] = out["cells"].astype(int)
    out.index.name = "method"
    return out.sort_values(["adapt_s", "infer_ms_per_image"])


__all__ = ["PAPER_NAMES", "add_significance", "attach_reference", "bootstrap_ci", "compare_methods",
           "cost_ratio_table", "load_reference", "marker", "paired_cells", "paper_difference", "reference_rows",
           "resolve_label", "significance_markers", "significance_note", "wilcoxon_p"]
