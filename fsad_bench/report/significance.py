"""Paired comparison of two methods on the cells they share (same support draw, same test set).

One pair per ``(dataset, category, k, run, train_seed)`` (records without ``train_seed`` read as
train seed 0; a training-free method, which runs train seed 0 only, pairs with the other
method's train seed 0), so the difference ``a - b`` (in AUROC
percentage points) removes the category and support-set effects. Per dataset and k (and over
all k): number of pairs, mean difference, a percentile-bootstrap 95 % CI of the mean difference
(cells resampled with replacement, seeded ``numpy.random.Generator``), win / tie / loss counts
and the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped).

Caveats: runs of one category share the category's test set, so pairs are not fully
independent (the test and the CI treat every cell as one observation). With fewer than
6 non-zero pairs the exact two-sided Wilcoxon p-value cannot fall below 0.05
(minimum ``2 / 2**n``), so a 4-category single-run suite can never show a star.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import stats

from fsad_bench.errors import FsadError
from fsad_bench.report.published import MEAN_ROW
from fsad_bench.records.store import with_train_seed

KEYS = ["dataset", "category", "k", "run", "train_seed"]


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
    df = with_train_seed(df)
    sides = []
    for lab, col in ((la, "a"), (lb, "b")):
        d = df.loc[df["label"] == lab, KEYS + [metric]].dropna(subset=[metric])
        if d.duplicated(KEYS).any():
            raise FsadError(f"label {lab!r} has several results for one (dataset, category, k, run, train seed)")
        sides.append(d.rename(columns={metric: col}))
    pairs = sides[0].merge(sides[1], on=KEYS, how="inner")
    pairs[["a", "b"]] = 100 * pairs[["a", "b"]].astype(float)
    pairs["diff"] = pairs["a"] - pairs["b"]
    return pairs.sort_values(KEYS).reset_index(drop=True)


def check_paired(df: pd.DataFrame, a: str, b: str, metric: str = "image_auroc") -> None:
    """FsadError (one line) unless ``a`` and ``b`` have results on the same (dataset, category, k, run,
    train seed) cells — an interrupted run, or methods run on other categories, would test on the
    cells one side happens to have. A training-free side (train seed 0 only) is compared with the
    other side's train seed 0 (what :func:`paired_cells` pairs)."""
    la, lb = resolve_label(df, a), resolve_label(df, b)
    d = with_train_seed(df).dropna(subset=[metric])
    keys = {}
    for lab in (la, lb):
        rows = d[d["label"] == lab]
        keys[lab] = (set(map(tuple, rows[KEYS].itertuples(index=False))),
                     "protocol" in rows and bool(len(rows)) and (rows["protocol"] == "training-free").all())
    (ka, free_a), (kb, free_b) = keys[la], keys[lb]
    if free_a or free_b:  # the other side's train seeds > 0 have no partner by design
        ka, kb = ({x for x in s if x[-1] == 0} for s in (ka, kb))
    only_a, only_b = sorted(ka - kb, key=str), sorted(kb - ka, key=str)
    if only_a or only_b:
        lone, who = (only_a, la) if only_a else (only_b, lb)
        _, cat, k, run, seed = lone[0]
        raise FsadError(f"{la!r} and {lb!r} are not paired: {len(only_a)} cells of {la!r} and {len(only_b)} of "
                        f"{lb!r} have no partner (e.g. {who!r} {cat} k={k} run {run} train seed {seed}); finish "
                        f"the run, or --allow-unpaired tests on the {len(ka & kb)} shared cells")


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
                    confidence: float = 0.95, seed: int = 0, tie_tol: float = 1e-9,
                    allow_unpaired: bool = False) -> pd.DataFrame:
    """Paired comparison of ``a`` against ``b`` (labels or method names), one row per dataset
    and k plus one row per dataset with ``k = "all"``.

    Columns: dataset, k, a, b, metric, n_pairs, mean_a, mean_b, mean_diff, median_diff,
    ci_low, ci_high (percentile bootstrap of the mean difference, ``confidence`` level),
    wins, ties, losses (``|diff| <= tie_tol`` points is a tie), wilcoxon_stat, p_value.
    Values are AUROC percentage points; positive differences favour ``a``. Refused (FsadError, see
    :func:`check_paired`) when ``a`` and ``b`` do not have the same cells, unless ``allow_unpaired``:
    then only the shared cells are tested."""
    if not allow_unpaired:
        check_paired(df, a, b, metric)
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
    """Copy of a :func:`fsad_bench.report.tables.paper_table` table whose ``Mean`` cells carry the
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
            f"(category, run, train seed) cells against {reference}; ↑ higher, ↓ lower than {reference}.")
