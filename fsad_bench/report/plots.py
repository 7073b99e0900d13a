"""Figures of a results folder, written as PNG to ``<out>/plots/``.

Uses matplotlib's object-oriented API on the Agg canvas (no pyplot, no global backend
switch, safe in worker processes and without a display).

Figures (``<dataset>`` = dataset name):

* ``<dataset>_<metric>_vs_k.png`` — macro average over categories against k, one line per
  method label: the tables' ``Mean`` row (:func:`fsad_bench.report.tables.summary`), the band its
  std over (train seed, run) pairs — support draws, and training seeds where there are several.
* ``<dataset>_<metric>_categories.png`` — per-category bars, one panel per k, one bar per
  label (the tables' cells: mean, error bar = std over (train seed, run) pairs); legend above.
* ``<dataset>_image_auroc_vs_adapt_cost.png`` — accuracy against adaptation cost: one point per
  (label, k), y = the ``Mean`` row's image AUROC ± its std, x = mean adaptation seconds ± std
  over cells (:func:`fsad_bench.report.costs.cost_table`), log scale.
* ``<dataset>_roc.png`` — image-level ROC curves per category (largest k, run 0), one curve
  per label. Needs per-image ``scores`` and ``labels`` lists in the records (see
  :data:`RECORD_KEYS_FOR_ROC`); skipped when no record has them.
* ``<dataset>_<category>_maps.png`` — grid of example test images: image, ground truth and each
  label's anomaly map overlaid. Needs ``<out>/maps/<cell_id>.npz`` files written by
  :func:`fsad_bench.records.store.save_example_maps`; skipped when there are none.
"""

from __future__ import annotations

import io
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fsad_bench.records.store import FILE_MODE, ResultStore, with_train_seed
from fsad_bench.report.costs import cost_table
from fsad_bench.report.published import MEAN_ROW
from fsad_bench.report.tables import summary

METRIC_NAMES = {"image_auroc": "Image AUROC (%)", "pixel_auroc": "Pixel AUROC (%)", "aupro": "AUPRO (%)"}
RECORD_KEYS_FOR_ROC = ("scores", "labels")  # per-image anomaly scores (N,) and 0/1 labels (N,) of a cell
DPI = 110


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to PNG and write it atomically, mode :data:`~fsad_bench.records.store.FILE_MODE`
    (like the tables and records)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _labels(df: pd.DataFrame, methods: list[str] | None) -> list[str]:
    order = {m: i for i, m in enumerate(methods or [])}
    firsts = df.drop_duplicates("label").set_index("label")["method"]
    return sorted(firsts.index, key=lambda lab: (order.get(firsts[lab], len(order)), lab))


def _colors(labels: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def spread_words(df: pd.DataFrame) -> str:
    """What a ± of the tables spans in ``df``: ``"support draws × training seeds"`` where some cell has
    several training seeds, ``"support draws"`` where only runs vary (``"training seeds"`` / ``""``)."""
    d = with_train_seed(df)
    keys = ["dataset", "category", "k", "label"]
    runs = bool(len(d)) and d.groupby(keys)["run"].nunique().max() > 1
    seeds = bool(len(d)) and d.groupby(keys)["train_seed"].nunique().max() > 1
    return " × ".join(w for w, on in (("support draws", runs), ("training seeds", seeds)) if on)


def _pm(df: pd.DataFrame) -> str:
    words = spread_words(df)
    return f"mean ± std over {words}" if words else "mean (one support draw)"


def wrap_titles(labels: list[str], width: int = 24, max_lines: int = 3) -> tuple[list[str], list[str]]:
    """Column titles for ``labels`` that fit a narrow panel: each wrapped at ``width`` characters (long
    words broken); when one needs more than ``max_lines`` lines, every label becomes ``(a)``, ``(b)`` …
    and the second list holds the key lines (``"(a) <label>"``) to print under the figure."""
    wrapped = [textwrap.fill(lab, width, break_long_words=True, break_on_hyphens=False) for lab in labels]
    if all(w.count("\n") < max_lines for w in wrapped):
        return wrapped, []
    short = [f"({chr(ord('a') + i % 26)}{i // 26 or ''})" for i in range(len(labels))]
    return short, [f"{sh} {lab}" for sh, lab in zip(short, labels)]


# ---------------------------------------------------------------------------------------
# accuracy plots
# ---------------------------------------------------------------------------------------


def plot_metric_vs_k(
    df: pd.DataFrame,
    dataset: str,
    metric: str,
    path: Path,
    methods: list[str] | None = None,
    incomplete: set[tuple[str, int]] | None = None,
) -> Path | None:
    """Macro-average ``metric`` against k per label: the tables' ``Mean`` row, mean ± std over
    (train seed, run) pairs (band). ``incomplete``: (label, k) points missing some planned cell
    (:mod:`fsad_bench.report.completeness`), drawn hollow and named in the legend, never as a mean
    over the suite."""
    d = df[(df["dataset"] == dataset)].dropna(subset=[metric])
    if d.empty:
        return None
    s = summary(d, metric)
    agg = s[s["category"] == MEAN_ROW]
    labels = _labels(d, methods)
    colors = _colors(labels)
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    for lab in labels:
        a = agg[agg["label"] == lab].sort_values("k")
        part = pd.Series([(lab, int(k)) in (incomplete or set()) for k in a["k"]], index=a.index)
        name = lab + (f" (* incomplete at k={', '.join(map(str, a.loc[part, 'k']))})" if part.any() else "")
        ax.plot(a["k"], a["mean"], marker="o", color=colors[lab], label=name)
        ax.plot(
            a.loc[part, "k"],
            a.loc[part, "mean"],
            linestyle="none",
            marker="o",
            markersize=9,
            markerfacecolor="white",
            markeredgecolor=colors[lab],
        )  # incomplete: hollow
        ax.fill_between(a["k"], a["mean"] - a["std"], a["mean"] + a["std"], color=colors[lab], alpha=0.2)
    ks = sorted(agg["k"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (support images)")
    ax.set_ylabel(METRIC_NAMES.get(metric, metric) + ", macro avg.")
    ax.set_title(f"{dataset}: {METRIC_NAMES.get(metric, metric)} vs k\n({_pm(d)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2 if len(labels) > 1 else 1, frameon=False
    )
    return _save(fig, path)


def plot_category_bars(
    df: pd.DataFrame, dataset: str, metric: str, path: Path, methods: list[str] | None = None
) -> Path | None:
    """Per-category grouped bars, one panel per k: the tables' cells (mean, error bar = std over
    (train seed, run) pairs). The legend sits above the panels (never over a bar) and the y range
    is fitted to the bars and their error bars."""
    d = df[(df["dataset"] == dataset)].dropna(subset=[metric])
    if d.empty:
        return None
    s = summary(d, metric)
    s = s[s["category"] != MEAN_ROW]
    labels = _labels(d, methods)
    colors = _colors(labels)
    cats = sorted(s["category"].unique())
    ks = sorted(s["k"].unique())
    width = 0.8 / max(1, len(labels))
    fig = Figure(figsize=(min(16.0, max(5.5, 0.35 * len(cats) * len(labels) + 1.5)), 2.3 * len(ks) + 0.4))
    axes = [fig.add_subplot(len(ks), 1, i + 1) for i in range(len(ks))]
    x = np.arange(len(cats))
    low = float(np.nanmin(s["mean"] - s["std"]))
    high = float(np.nanmax(s["mean"] + s["std"]))
    bottom = max(0.0, 10 * np.floor((low - 3) / 10))
    top = min(100.5, high + 0.08 * max(high - bottom, 10))
    for ax, k in zip(axes, ks):
        for j, lab in enumerate(labels):
            a = s[(s["k"] == k) & (s["label"] == lab)].set_index("category").reindex(cats)
            ax.bar(
                x + (j - (len(labels) - 1) / 2) * width,
                a["mean"],
                width,
                yerr=a["std"],
                capsize=2,
                color=colors[lab],
                label=lab,
                error_kw={"elinewidth": 0.8},
            )
        ax.set_xticks(
            x,
            cats,
            rotation=30 if max(map(len, cats)) > 6 else 0,
            ha="right" if max(map(len, cats)) > 6 else "center",
            fontsize=7,
        )
        ax.set_xlim(-0.5, len(cats) - 0.5)
        ax.set_ylabel(f"k={k}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylim(bottom, top)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    ncol = max(1, min(len(labels), int(fig.get_figwidth() * 72 / (6.5 * max(map(len, labels)) + 30))))
    fig.suptitle(f"{dataset}: {METRIC_NAMES.get(metric, metric)} per category ({_pm(d)})", fontsize=9)
    fig.legend(handles, names, fontsize=7, ncol=ncol, loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_vs_cost(
    df: pd.DataFrame, dataset: str, path: Path, methods: list[str] | None = None, metric: str = "image_auroc"
) -> Path | None:
    """Accuracy against adaptation cost, one point per (label, k): y = the tables' ``Mean`` row
    (macro average, ± std over (train seed, run) pairs), x = mean adaptation seconds per cell
    ± std over cells (the cost table's ``adapt_s``), log scale. Colour = label, marker = k;
    a label's points are joined in order of k. None without ``adapt_seconds`` or ``metric``."""
    d = df[(df["dataset"] == dataset)].dropna(subset=[metric])
    if d.empty or "adapt_seconds" not in d.columns or not d["adapt_seconds"].notna().any():
        return None
    s = summary(d, metric)
    acc = s[s["category"] == MEAN_ROW][["label", "k", "mean", "std"]]
    cost = (
        cost_table(d, methods)
        .reset_index()
        .rename(columns={"method": "label"})[["label", "k", "adapt_s", "adapt_s_std"]]
    )
    pts = acc.merge(cost, on=["label", "k"]).dropna(subset=["adapt_s"])
    if pts.empty:
        return None
    floor = max(1e-4, float(pts.loc[pts["adapt_s"] > 0, "adapt_s"].min()) / 3 if (pts["adapt_s"] > 0).any() else 1e-4)
    pts = pts.assign(x=pts["adapt_s"].clip(lower=floor))
    labels = [lab for lab in _labels(d, methods) if lab in set(pts["label"])]
    colors = _colors(labels)
    ks = sorted(pts["k"].unique())
    markers = dict(zip(ks, "osD^v<>ph*"))
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for lab in labels:
        p = pts[pts["label"] == lab].sort_values("k")
        ax.plot(p["x"], p["mean"], color=colors[lab], lw=0.8, alpha=0.6)
        for r in p.itertuples():
            lo = min(float(r.adapt_s_std), 0.9 * float(r.x))  # a log axis has no room below 0
            ax.errorbar(
                [r.x],
                [r.mean],
                yerr=[[r.std], [r.std]],
                xerr=[[lo], [float(r.adapt_s_std)]],
                fmt=markers[r.k],
                color=colors[lab],
                ms=6,
                capsize=2,
                elinewidth=0.8,
            )
    ax.set_xscale("log")
    ax.set_xlabel("adaptation time per cell (s, mean ± std over cells; log scale)", fontsize=8)
    ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)}, macro avg.", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.08, which="minor")
    ax.set_title(f"{dataset}: accuracy vs adaptation cost\n(y: {_pm(d)})", fontsize=9)
    from matplotlib.lines import Line2D

    by_label = [Line2D([], [], color=colors[lab], marker="o", ls="-", lw=0.8, label=lab) for lab in labels]
    by_k = [Line2D([], [], color="black", marker=markers[k], ls="none", label=f"k={k}") for k in ks]
    ax.legend(
        handles=by_k,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        title="k (support\nimages)",
        title_fontsize=7,
    )
    fig.tight_layout()
    fig.legend(
        handles=by_label,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        frameon=False,
        ncol=2 if len(labels) > 1 else 1,
    )  # below the axes: long labels never squeeze the plot
    if (pts["adapt_s"] < floor).any():
        ax.text(
            0.0,
            -0.2,
            f"adaptation times below {floor:.1e} s drawn at {floor:.1e} s",
            fontsize=6,
            transform=ax.transAxes,
        )
    return _save(fig, path)


def plot_roc(
    df: pd.DataFrame, dataset: str, path: Path, methods: list[str] | None = None, k: int | None = None, run: int = 0
) -> Path | None:
    """Image-level ROC curves per category at ``k`` (default: the largest) and ``run``, from the
    records' per-image ``scores`` / ``labels``. None when no such record exists."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if not set(RECORD_KEYS_FOR_ROC) <= set(df.columns):
        return None
    d = df[(df["dataset"] == dataset) & (df["run"] == run)]
    d = d[
        d["scores"].map(lambda v: isinstance(v, (list, tuple, np.ndarray)) and len(v) > 0)
        & d["labels"].map(lambda v: isinstance(v, (list, tuple, np.ndarray)) and len(v) > 0)
    ]
    if d.empty:
        return None
    d = d[d["k"] == (k if k is not None else d["k"].max())]
    cats = sorted(d["category"].unique())
    labels = _labels(d, methods)
    colors = _colors(labels)
    ncol = min(4, len(cats))
    nrow = -(-len(cats) // ncol)
    fig = Figure(figsize=(3.0 * ncol, 3.0 * nrow))
    drawn = 0
    for i, cat in enumerate(cats):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for r in d[d["category"] == cat].itertuples():
            y, s = np.asarray(r.labels, dtype=int), np.asarray(r.scores, dtype=float)
            if len(y) != len(s) or len(np.unique(y)) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, color=colors[r.label], lw=1.2, label=f"{r.label} ({100 * roc_auc_score(y, s):.1f})")
            drawn += 1
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        ax.set_title(cat, fontsize=8)
        ax.set_xlabel("FPR", fontsize=7)
        ax.set_ylabel("TPR", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5, loc="lower right")
    if not drawn:
        return None
    fig.suptitle(f"{dataset}: image-level ROC (k={int(d['k'].iloc[0])}, run {run}; AUROC % in legend)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------
# anomaly-map examples
# ---------------------------------------------------------------------------------------


def load_example_maps(out: str | Path, df: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """Every ``<out>/maps/*.npz`` joined with its record (by cell id): dicts with dataset,
    category, label, k, run and the arrays. Files without a record are ignored."""
    folder = Path(out) / "maps"
    if not folder.is_dir():
        return []
    if df is None:
        df = ResultStore(out).frame()
    recs = df.set_index("cell_id") if "cell_id" in df.columns else pd.DataFrame()
    found = []
    for p in sorted(folder.glob("*.npz")):
        if p.stem not in recs.index:
            continue
        r = recs.loc[p.stem]
        with np.load(p, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
        found.append(
            {
                "dataset": r["dataset"],
                "category": r["category"],
                "label": r["label"],
                "method": r["method"],
                "k": int(r["k"]),
                "run": int(r["run"]),
                **arrays,
            }
        )
    return found


def plot_map_grids(
    out: str | Path, plots: Path, df: pd.DataFrame | None = None, methods: list[str] | None = None
) -> list[Path]:
    """One figure per (dataset, category): rows = example test images, columns = image,
    ground truth, then each label's map over the image (largest k saved, lowest run).
    Maps are min-max scaled per label over that category's examples, so a label's colours
    are comparable across its rows but not across labels."""
    examples = load_example_maps(out, df)
    if not examples:
        return []
    ex = pd.DataFrame(examples)
    written = []
    for (ds, cat), g in ex.groupby(["dataset", "category"], sort=True):
        g = g[g["k"] == g["k"].max()]
        g = g[g["run"] == g["run"].min()]
        labels = [lab for lab in _labels(g, methods) if lab in set(g["label"])]
        by_label = {lab: g[g["label"] == lab].iloc[0] for lab in labels}
        first = by_label[labels[0]]
        names = list(first["image_paths"])
        rows = [i for i, name in enumerate(names) if all(name in list(by_label[lab]["image_paths"]) for lab in labels)]
        if not rows:
            continue
        ncol = 2 + len(labels)
        titles, key = wrap_titles(labels)
        fig = Figure(figsize=(1.9 * ncol, 1.9 * len(rows) + 0.4))
        for ri, i in enumerate(rows):
            name = names[i]
            img, mask = first["images"][i], first["masks"][i]
            cells = [("image", img, None), ("ground truth", mask, "gray")]
            for lab, title in zip(labels, titles):
                b = by_label[lab]
                j = list(b["image_paths"]).index(name)
                m = b["maps"].astype(np.float32)
                lo, hi = float(m.min()), float(m.max())
                cells.append((title, (m[j] - lo) / (hi - lo) if hi > lo else np.zeros_like(m[j]), "jet"))
            for ci, (title, arr, cmap) in enumerate(cells):
                ax = fig.add_subplot(len(rows), ncol, ri * ncol + ci + 1)
                if ci >= 2:
                    ax.imshow(img)
                    ax.imshow(arr, cmap=cmap, alpha=0.5, vmin=0, vmax=1)
                    ax.contour(mask, levels=[0.5], colors="white", linewidths=0.6)
                elif cmap:
                    ax.imshow(arr, cmap=cmap, vmin=0, vmax=1)
                else:
                    ax.imshow(arr)
                ax.set_xticks([])
                ax.set_yticks([])
                if ri == 0:
                    ax.set_title(title, fontsize=7)
                if ci == 0:
                    ax.set_ylabel(Path(name).parent.name + "/" + Path(name).stem, fontsize=6)
        fig.suptitle(f"{ds} / {cat}: anomaly maps (k={int(g['k'].iloc[0])}, run {int(g['run'].iloc[0])})", fontsize=9)
        fig.tight_layout()
        if key:
            fig.text(0.01, 0.0, "\n".join(key), fontsize=7, va="top", ha="left")
        written.append(_save(fig, plots / f"{_safe(ds)}_{_safe(cat)}_maps.png"))
    return written


# ---------------------------------------------------------------------------------------
# everything
# ---------------------------------------------------------------------------------------


def write_plots(out: str | Path, methods: list[str] | None = None) -> list[Path]:
    """Write every figure of the results folder ``out`` to ``<out>/plots/``; returns the paths.
    Figures whose inputs are absent (per-image scores, saved maps, a metric never computed)
    are skipped."""
    from fsad_bench.report.completeness import completeness

    store = ResultStore(out)
    df = store.frame()
    comp = completeness(store)
    incomplete = {(lab, int(k)) for lab, k in set(zip(df["label"], df["k"])) if not comp.label_complete(lab, k)}
    if methods is None and (suite := store.load_suite()):
        methods = suite.get("methods")
    plots = Path(out) / "plots"
    written: list[Path | None] = []
    for ds in sorted(df["dataset"].unique()):
        for metric in METRIC_NAMES:
            if metric not in df.columns or not df.loc[df["dataset"] == ds, metric].notna().any():
                continue
            written.append(
                plot_metric_vs_k(df, ds, metric, plots / f"{_safe(ds)}_{metric}_vs_k.png", methods, incomplete)
            )
            written.append(plot_category_bars(df, ds, metric, plots / f"{_safe(ds)}_{metric}_categories.png", methods))
        if "image_auroc" in df.columns:
            written.append(plot_accuracy_vs_cost(df, ds, plots / f"{_safe(ds)}_image_auroc_vs_adapt_cost.png", methods))
        written.append(plot_roc(df, ds, plots / f"{_safe(ds)}_roc.png", methods))
    written += plot_map_grids(out, plots, df, methods)
    return [p for p in written if p is not None]


__all__ = [
    "RECORD_KEYS_FOR_ROC",
    "load_example_maps",
    "plot_accuracy_vs_cost",
    "plot_category_bars",
    "plot_map_grids",
    "plot_metric_vs_k",
    "plot_roc",
    "spread_words",
    "wrap_titles",
    "write_plots",
]
