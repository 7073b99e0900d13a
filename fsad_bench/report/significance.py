"""Paired comparison of two methods on the cells they share (same support draw, same test set).

One pair per ``(dataset, category, k, run, train_seed)`` (records without ``train_seed`` read as
train seed 0; a training-free method, which runs train seed 0 only, pairs with the other
method's train seed 0), so the difference ``a - b`` (in AUROC
percentage points) removes the category and support-set effects. Per dataset and k (and over
all k): number of pairs, mean difference, a percentile-bootstrap 95 % CI of the mean difference
(cells resampled with replacement, seeded ``numpy.random.Generator``), win / tie / loss counts
and the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped).

How stable a ranking is: :func:`win_probability` (the probability that A beats B on a new support draw and
training seed, per category and over categories, and the "support lottery", min–max over the draws) and
:func:`rank_stability` (each method's probability of ranking first when the (run, train seed) draws are
resampled): ``fsad-bench compare`` and ``tables/rank_stability.{md,csv}``.

Caveats: runs of one category share the category's test set, so pairs are not fully
independent (the test and the CI treat every cell as one observation). With fewer than
6 non-zero pairs the exact two-sided Wilcoxon p-value cannot fall below 0.05
(minimum ``2 / 2**n``), so a 4-category single-run suite can never show a star.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from fsad_bench.errors import FsadError
from fsad_bench.records.store import atomic_write_text, with_train_seed
from fsad_bench.report.costs import method_order
from fsad_bench.report.published import MEAN_ROW

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
        keys[lab] = (
            set(map(tuple, rows[KEYS].itertuples(index=False))),
            "protocol" in rows and bool(len(rows)) and (rows["protocol"] == "training-free").all(),
        )
    (ka, free_a), (kb, free_b) = keys[la], keys[lb]
    if free_a or free_b:  # the other side's train seeds > 0 have no partner by design
        ka, kb = ({x for x in s if x[-1] == 0} for s in (ka, kb))
    only_a, only_b = sorted(ka - kb, key=str), sorted(kb - ka, key=str)
    if only_a or only_b:
        lone, who = (only_a, la) if only_a else (only_b, lb)
        _, cat, k, run, seed = lone[0]
        raise FsadError(
            f"{la!r} and {lb!r} are not paired: {len(only_a)} cells of {la!r} and {len(only_b)} of "
            f"{lb!r} have no partner (e.g. {who!r} {cat} k={k} run {run} train seed {seed}); finish "
            f"the run, or --allow-unpaired tests on the {len(ka & kb)} shared cells"
        )


def _shared_cells(df: pd.DataFrame, a: str, b: str, metric: str, allow_unpaired: bool) -> tuple[pd.DataFrame, str, str]:
    """:func:`paired_cells` of ``a`` and ``b`` with their labels; refused (FsadError) when they share no cell,
    or (unless ``allow_unpaired``) do not have the same cells (:func:`check_paired`)."""
    if not allow_unpaired:
        check_paired(df, a, b, metric)
    pairs = paired_cells(df, a, b, metric)
    la, lb = resolve_label(df, a), resolve_label(df, b)
    if pairs.empty:
        raise FsadError(f"{la!r} and {lb!r} share no finished cell with a {metric} value")
    return pairs, la, lb


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


def bootstrap_ci(
    diffs: Iterable[float], n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
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
        "n_pairs": int(d.size),
        "mean_a": float(pairs["a"].mean()) if d.size else np.nan,
        "mean_b": float(pairs["b"].mean()) if d.size else np.nan,
        "mean_diff": float(d.mean()) if d.size else np.nan,
        "median_diff": float(np.median(d)) if d.size else np.nan,
        "ci_low": lo,
        "ci_high": hi,
        "wins": int((d > tie_tol).sum()),
        "ties": int((np.abs(d) <= tie_tol).sum()),
        "losses": int((d < -tie_tol).sum()),
        "wilcoxon_stat": stat,
        "p_value": p,
    }


def compare_methods(
    df: pd.DataFrame,
    a: str,
    b: str,
    metric: str = "image_auroc",
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    tie_tol: float = 1e-9,
    allow_unpaired: bool = False,
) -> pd.DataFrame:
    """Paired comparison of ``a`` against ``b`` (labels or method names), one row per dataset
    and k plus one row per dataset with ``k = "all"``.

    Columns: dataset, k, a, b, metric, n_pairs, mean_a, mean_b, mean_diff, median_diff,
    ci_low, ci_high (percentile bootstrap of the mean difference, ``confidence`` level),
    wins, ties, losses (``|diff| <= tie_tol`` points is a tie), wilcoxon_stat, p_value.
    Values are AUROC percentage points; positive differences favour ``a``. Refused (FsadError, see
    :func:`check_paired`) when ``a`` and ``b`` do not have the same cells, unless ``allow_unpaired``:
    then only the shared cells are tested."""
    pairs, la, lb = _shared_cells(df, a, b, metric, allow_unpaired)
    rows = []
    for ds, dsp in pairs.groupby("dataset", sort=True):
        groups = [(int(k), g) for k, g in dsp.groupby("k", sort=True)] + [("all", dsp)]
        for k, g in groups:
            rows.append(
                {
                    "dataset": ds,
                    "k": k,
                    "a": la,
                    "b": lb,
                    "metric": metric,
                    **_summarise(g, n_resamples, confidence, seed, tie_tol),
                }
            )
    return pd.DataFrame(rows)


def marker(
    p_value: float, mean_diff: float, levels: tuple[float, float] = (0.05, 0.01), arrows: tuple[str, str] = ("↑", "↓")
) -> str:
    """``"**↑"`` / ``"*↓"`` …: stars for ``p < levels[1]`` / ``p < levels[0]``, arrow for the sign
    of the mean difference (``arrows[0]`` = higher than the reference, e.g. ``("+", "-")`` for
    plain-ASCII LaTeX); ``""`` when not significant."""
    if not np.isfinite(p_value) or p_value >= levels[0]:
        return ""
    return ("**" if p_value < levels[1] else "*") + (arrows[0] if mean_diff > 0 else arrows[1])


def significance_markers(
    df: pd.DataFrame,
    reference: str,
    metric: str = "image_auroc",
    dataset: str | None = None,
    levels: tuple[float, float] = (0.05, 0.01),
    arrows: tuple[str, str] = ("↑", "↓"),
) -> dict[tuple[str, str], str]:
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


def add_significance(
    table: pd.DataFrame,
    df: pd.DataFrame,
    reference: str,
    metric: str = "image_auroc",
    dataset: str | None = None,
    levels: tuple[float, float] = (0.05, 0.01),
    arrows: tuple[str, str] = ("↑", "↓"),
) -> pd.DataFrame:
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
    return (
        f"*: p < {levels[0]}, **: p < {levels[1]}, two-sided Wilcoxon signed-rank test over paired "
        f"(category, run, train seed) cells against {reference}; ↑ higher, ↓ lower than {reference}."
    )


# --- how stable is a ranking: new support draws and training seeds ------------------------------------------------

#: The unit a new experiment redraws: one support draw (run) with one training seed.
DRAW = ["run", "train_seed"]


def _win_row(a: np.ndarray, b: np.ndarray, n_resamples: int, rng: np.random.Generator, tie_tol: float) -> dict:
    """Win probabilities and lottery spreads of paired per-draw values ``a``, ``b`` (%)."""
    d = a - b
    n = d.size
    score = np.where(d > tie_tol, 1.0, np.where(d < -tie_tol, 0.0, 0.5))  # A beats B: 1, tie: 1/2
    row = {
        "n_draws": int(n),
        "p_a_better": float(score.mean()),
        "p_a_better_low": np.nan,
        "p_a_better_high": np.nan,
        "p_a_ahead": np.nan,
        "a_min": float(a.min()),
        "a_max": float(a.max()),
        "b_min": float(b.min()),
        "b_max": float(b.max()),
        "a_spread": float(a.max() - a.min()),
        "b_spread": float(b.max() - b.min()),
    }
    if n >= 2:
        idx = rng.integers(0, n, (n_resamples, n))
        lo, hi = np.percentile(score[idx].mean(axis=1), [2.5, 97.5])
        mean_d = d[idx].mean(axis=1)
        ahead = np.where(mean_d > tie_tol, 1.0, np.where(mean_d < -tie_tol, 0.0, 0.5))
        row.update(p_a_better_low=float(lo), p_a_better_high=float(hi), p_a_ahead=float(ahead.mean()))
    return row


def win_probability(
    df: pd.DataFrame,
    a: str,
    b: str,
    metric: str = "image_auroc",
    n_resamples: int = 10_000,
    seed: int = 0,
    tie_tol: float = 1e-9,
    allow_unpaired: bool = False,
) -> pd.DataFrame:
    """How likely ``a`` beats ``b`` on a new support draw and training seed: one row per dataset, k and
    category, a ``Mean`` row per dataset and k (the per-draw mean over categories), and ``k = "all"`` Mean
    rows (a draw is then a (k, run, train seed)).

    Columns (values in %): ``n_draws`` (paired (run, train seed) draws, see :func:`paired_cells`);
    ``p_a_better`` — share of draws where ``a`` scores higher (ties count 1/2): the probability that ``a``
    beats ``b`` on one new draw, with ``p_a_better_low`` / ``_high``, its 95 % percentile-bootstrap interval
    over the draws; ``p_a_ahead`` — share of bootstrap resamples of the draws (with replacement, as many as
    there are) whose mean difference favours ``a``: the probability that a rerun with as many new draws
    keeps ``a`` ahead; ``a_min`` … ``b_max``, ``a_spread`` / ``b_spread`` — the support lottery, min and
    max over the draws and their difference. Bootstrap columns are NaN with fewer than 2 draws. Seeded:
    every row's resamples come from ``numpy.random.default_rng(seed)``, whatever the other rows."""
    pairs, la, lb = _shared_cells(df, a, b, metric, allow_unpaired)
    rows = []
    for ds, dsp in pairs.groupby("dataset", sort=True):
        groups = [(int(k), g, DRAW) for k, g in dsp.groupby("k", sort=True)] + [("all", dsp, ["k", *DRAW])]
        for k, g, draw in groups:
            parts = [] if k == "all" else [(c, gc) for c, gc in g.groupby("category", sort=True)]
            per_draw = g.groupby(draw, sort=True)[["a", "b"]].mean()
            for cat, gc in parts + [(MEAN_ROW, per_draw)]:
                rows.append(
                    {
                        "dataset": ds,
                        "k": k,
                        "category": cat,
                        "a": la,
                        "b": lb,
                        "metric": metric,
                        **_win_row(
                            gc["a"].to_numpy(float),
                            gc["b"].to_numpy(float),
                            n_resamples,
                            np.random.default_rng(seed),
                            tie_tol,
                        ),
                    }
                )
    return pd.DataFrame(rows)


def _draw_values(g: pd.DataFrame, metric: str) -> tuple[list[str], np.ndarray]:
    """Labels and their per-draw mean over categories ``(labels, draws)`` in % for one (dataset, k); a label
    run at train seed 0 only (training-free) stands for itself at every train seed of the others."""
    seeds = sorted(g["train_seed"].unique())
    parts = []
    for _, gl in g.groupby("label", sort=False):
        if gl["train_seed"].nunique() == 1 and int(gl["train_seed"].iloc[0]) == 0 and len(seeds) > 1:
            gl = pd.concat([gl.assign(train_seed=s) for s in seeds])
        parts.append(gl)
    wide = pd.concat(parts).groupby(["label", *DRAW])[metric].mean().unstack(DRAW) * 100  # mean over categories
    return list(wide.index), wide.to_numpy(float)


def rank_stability(
    df: pd.DataFrame, metric: str = "image_auroc", n_resamples: int = 10_000, seed: int = 0
) -> pd.DataFrame:
    """Each label's probability of ranking first among the labels of a dataset and k when the (run, train
    seed) draws are resampled (bootstrap with replacement, as many as there are; ``default_rng(seed)`` per
    (dataset, k)).

    One row per (dataset, k, label): ``mean`` (% over categories and draws), ``rank`` (1 = best, by
    ``mean``), ``p_first`` (share of resamples in which the label has the highest mean; a tie shares the
    resample), ``mean_rank`` (its average rank over the resamples), ``n_draws``, ``n_categories``. The mean
    over categories is taken per draw first (a draw missing some category averages the ones present)."""
    df = with_train_seed(df).dropna(subset=[metric])
    rows = []
    for (ds, k), g in df.groupby(["dataset", "k"], sort=True):
        labels, v = _draw_values(g, metric)
        n = v.shape[1]
        rng = np.random.default_rng(seed)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a label without some draw: NaN there
            means = np.nanmean(v[:, rng.integers(0, n, (n_resamples, n))], axis=-1)  # (labels, resamples)
            observed = np.nanmean(v, axis=1)
        filled = np.where(np.isnan(means), -np.inf, means)
        best = filled == filled.max(axis=0, keepdims=True)
        p_first = (best / best.sum(axis=0, keepdims=True)).mean(axis=1)
        ranks = 1 + (filled[None, :, :] > filled[:, None, :]).sum(axis=1)  # labels strictly above each one
        order = np.argsort(-np.where(np.isnan(observed), -np.inf, observed), kind="stable")
        rank = np.empty(len(labels), int)
        rank[order] = np.arange(1, len(labels) + 1)
        for i, lab in enumerate(labels):
            rows.append(
                {
                    "dataset": ds,
                    "k": int(k),
                    "label": lab,
                    "metric": metric,
                    "mean": float(observed[i]),
                    "rank": int(rank[i]),
                    "p_first": float(p_first[i]),
                    "mean_rank": float(ranks[i].mean()),
                    "n_draws": int(np.isfinite(v[i]).sum()),
                    "n_categories": int(g.loc[g["label"] == lab, "category"].nunique()),
                }
            )
    return pd.DataFrame(rows)


def with_ahead_column(table: pd.DataFrame, wins: pd.DataFrame) -> pd.DataFrame:
    """:func:`compare_methods`' table with the column ``p_a_ahead`` of the ``Mean`` rows of
    :func:`win_probability` (the probability that ``a`` stays ahead when the draws are redrawn)."""
    mean = wins[wins["category"] == MEAN_ROW][["dataset", "k", "p_a_ahead"]]
    keyed = table.assign(_k=table["k"].astype(str)).merge(
        mean.assign(_k=mean["k"].astype(str)).drop(columns="k"), on=["dataset", "_k"], how="left"
    )
    return keyed.drop(columns="_k")


def lottery_table(wins: pd.DataFrame) -> pd.DataFrame:
    """:func:`win_probability` for printing: rows ``"<dataset> k=<k> <category>"``; P(A better) with its
    interval, P(A ahead) and each side's min–max over the draws (%)."""
    several = wins["dataset"].nunique() > 1

    def pct(v: float) -> str:
        return "–" if not np.isfinite(v) else f"{100 * v:.0f}%"

    out = pd.DataFrame(
        {
            "draws": wins["n_draws"].to_numpy(),
            "P(A better), 95% CI": [
                f"{pct(r.p_a_better)} [{pct(r.p_a_better_low)}, {pct(r.p_a_better_high)}]" for r in wins.itertuples()
            ],
            "P(A ahead)": [pct(v) for v in wins["p_a_ahead"]],
            "A min–max": [f"{r.a_min:.1f}–{r.a_max:.1f} ({r.a_spread:.1f})" for r in wins.itertuples()],
            "B min–max": [f"{r.b_min:.1f}–{r.b_max:.1f} ({r.b_spread:.1f})" for r in wins.itertuples()],
        }
    )
    out.index = [(f"{r.dataset} " if several else "") + f"k={r.k} {r.category}" for r in wins.itertuples()]
    return out


def rank_stability_table(
    df: pd.DataFrame, metrics: Iterable[str], labels: list[str] | None = None, n_resamples: int = 10_000, seed: int = 0
) -> pd.DataFrame:
    """:func:`rank_stability` of every metric of ``metrics`` present in ``df``, rows in ``labels`` order
    (the tables' method order) within each (dataset, metric, k); empty when no metric has a value."""
    parts = [rank_stability(df, m, n_resamples, seed) for m in metrics if m in df.columns and df[m].notna().any()]
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame()
    t = pd.concat(parts, ignore_index=True)
    order = {lab: i for i, lab in enumerate(labels or [])}
    t["_o"] = [order.get(lab, len(order)) for lab in t["label"]]
    t["_m"] = [list(dict.fromkeys(t["metric"])).index(m) for m in t["metric"]]  # metrics in the order given
    return (
        t.sort_values(["dataset", "_m", "k", "_o", "rank"], kind="stable")
        .drop(columns=["_o", "_m"])
        .reset_index(drop=True)
    )


RANK_NOTE = (
    "p_first: share of 10000 bootstrap resamples of the (run, train seed) draws (seed 0) in which the method "
    "has the highest mean over categories and draws; mean_rank: its average rank there (1 = best). "
    "A training-free method (train seed 0 only) counts at every train seed."
)


def write_rank_stability(
    folder: Path, df: pd.DataFrame, metrics: Iterable[str], methods: list[str] | None = None
) -> pd.DataFrame:
    """Write ``tables/rank_stability.md`` and ``.csv`` (:func:`rank_stability_table`, methods in the tables'
    order); nothing when there is nothing to rank. Returns the table."""
    t = rank_stability_table(df, metrics, method_order(df, methods) if len(df) else None)
    if t.empty:
        return t
    shown = t.assign(p_first=(100 * t["p_first"]).round(1)).rename(columns={"label": "method", "p_first": "p_first %"})
    atomic_write_text(
        Path(folder) / "rank_stability.md", shown.to_markdown(index=False, floatfmt=".2f") + "\n\n" + RANK_NOTE + "\n"
    )
    atomic_write_text(Path(folder) / "rank_stability.csv", t.to_csv(index=False))
    return t
