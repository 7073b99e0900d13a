"""Reporter: paper-style tables from a result store (pandas), as Markdown, CSV and LaTeX.

Accuracy tables have one row per category plus ``Mean`` (macro average over categories)
and ``Std (categories)`` rows, and one column per (k, method) — like Tables 1–2 of the
RegAD paper. Cells read ``mean ± std`` in %, the mean over runs and the standard deviation
over runs (for ``Mean``: the std over runs of the per-run macro average).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .costs import method_order
from .store import ResultStore, atomic_write_text

METRICS = {"image_auroc": "Image AUROC (%)", "pixel_auroc": "Pixel AUROC (%)", "aupro": "AUPRO (%)",
           "image_aupr": "Image AUPR (%)", "image_f1max": "Image F1-max (%)", "pixel_aupr": "Pixel AUPR (%)",
           "pixel_f1max": "Pixel F1-max (%)"}
#: Metrics tabulated unless ``metrics=`` / ``--metrics`` asks for others (every record holds all of them).
DEFAULT_METRICS = ("image_auroc", "pixel_auroc", "aupro")
from .published import MEAN_ROW, STD_ROW  # noqa: E402  (one definition of the row names)


def summary(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Tidy table: one row per (dataset, category, k, label) with mean, std over runs, n runs
    (metric in %), plus ``Mean`` rows (macro average) per (dataset, k, label)."""
    d = df.dropna(subset=[metric]).assign(value=lambda x: 100 * x[metric])
    per_cat = (d.groupby(["dataset", "category", "k", "label"])["value"]
               .agg(mean="mean", std_runs=lambda v: v.std(ddof=1) if len(v) > 1 else 0.0, n_runs="count")
               .reset_index())
    per_run = d.groupby(["dataset", "k", "label", "run"])["value"].mean().reset_index()
    macro = (per_run.groupby(["dataset", "k", "label"])["value"]
             .agg(mean="mean", std_runs=lambda v: v.std(ddof=1) if len(v) > 1 else 0.0, n_runs="count")
             .reset_index())
    macro["mean"] = per_cat.groupby(["dataset", "k", "label"])["mean"].mean().values
    macro["std_categories"] = per_cat.groupby(["dataset", "k", "label"])["mean"].std(ddof=1).fillna(0).values
    macro["category"] = MEAN_ROW
    return pd.concat([per_cat, macro], ignore_index=True)


def paper_table(df: pd.DataFrame, metric: str = "image_auroc", dataset: str | None = None,
                methods: list[str] | None = None, show_std: bool = True, decimals: int = 1) -> pd.DataFrame:
    """Wide table: rows = categories + Mean + Std (categories); columns = (k, method label)."""
    if dataset is not None:
        df = df[df["dataset"] == dataset]
    s = summary(df, metric)
    if s.empty:
        return pd.DataFrame()
    cats = [c for c in dict.fromkeys(df["category"]) if c in set(s["category"])]
    labels = method_order(df, methods)
    ks = sorted(s["k"].unique())
    cols = pd.MultiIndex.from_tuples([(f"k={k}", lab) for k in ks for lab in labels], names=["k", "method"])
    table = pd.DataFrame(index=sorted(cats) + [MEAN_ROW, STD_ROW], columns=cols, dtype=object)
    fmt = f"{{:.{decimals}f}}"
    for r in s.itertuples():
        text = fmt.format(r.mean) + (f" ± {fmt.format(r.std_runs)}" if show_std and r.n_runs > 1 else "")
        table.loc[r.category, (f"k={r.k}", r.label)] = text
        if r.category == MEAN_ROW:
            table.loc[STD_ROW, (f"k={r.k}", r.label)] = fmt.format(r.std_categories)
    table.index.name = "category"
    return table.fillna("–")


def _latex(table: pd.DataFrame, caption: str) -> str:
    return table.to_latex(caption=caption, escape=True, multicolumn=True, multicolumn_format="c")


def write_tables(out: str | Path, methods: list[str] | None = None,
                 reference_method: str | None = None, metrics: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Build every table of a results folder and write ``tables/*.{md,csv,tex}``; returns them by name.

    ``metrics``: which accuracy tables (names of :data:`METRICS`; default :data:`DEFAULT_METRICS`).

    Accuracy tables get the published numbers as extra ``"<Method> (paper)"`` columns where
    ``results/reference`` has them, and, with ``reference_method`` (label or method name),
    significance markers on their ``Mean`` row (paired Wilcoxon vs that method)."""
    from .costs import cost_ratio_table, cost_table
    from .published import attach_reference, paper_difference
    from .significance import add_significance

    store = ResultStore(out)
    df = store.frame()
    if methods is None and (suite := store.load_suite()):
        methods = suite.get("methods")
    tables: dict[str, pd.DataFrame] = {}
    for ds in sorted(df["dataset"].unique()):
        sub = df[df["dataset"] == ds]
        for metric in metrics or DEFAULT_METRICS:
            if metric not in df.columns:  # records written before the metric existed
                continue
            t = paper_table(df, metric, ds, methods)
            if t.empty:
                continue
            if reference_method and reference_method in set(sub["label"]) | set(sub["method"]):
                t = add_significance(t, sub, reference_method, metric)
            tables[f"{ds}_{metric}"] = attach_reference(t, ds, metric)  # no-op without published numbers
            diff = paper_difference(df, ds, metric)
            if not diff.empty:
                tables[f"{ds}_{metric}_vs_paper"] = diff.set_index("label")
    tables["cost"] = cost_table(df, methods)
    tables["cost_ratio"] = cost_ratio_table(df, methods)
    folder = Path(out) / "tables"
    for name, t in tables.items():
        caption = next((text for m, text in METRICS.items() if m in name), "Cost") + f" — {name}"
        flat = t.copy()
        if isinstance(flat.columns, pd.MultiIndex):
            flat.columns = [" ".join(c) for c in flat.columns]
        atomic_write_text(folder / f"{name}.md", flat.to_markdown(floatfmt=".3f") + "\n")
        atomic_write_text(folder / f"{name}.csv", flat.to_csv())
        atomic_write_text(folder / f"{name}.tex", _latex(t, caption))
    summaries = [summary(df, m).assign(metric=m) for m in METRICS if m in df.columns and df[m].notna().any()]
    atomic_write_text(folder / "summary.csv", pd.concat(summaries).to_csv(index=False))
    return tables


def print_table(table: pd.DataFrame, title: str, console: Console | None = None) -> None:
    """Print a table with rich; paper-style tables (columns ``(k, method)``) print one block per k
    so that they stay readable in a terminal (the written files keep the full table)."""
    console = console or Console()
    if isinstance(table.columns, pd.MultiIndex) and table.columns.names[0] == "k":
        for k in dict.fromkeys(table.columns.get_level_values(0)):
            _print_one(table[k], f"{title} — {k}", console)
        return
    _print_one(table, title, console)


def _print_one(table: pd.DataFrame, title: str, console: Console) -> None:
    rt = Table(title=title, show_lines=False)
    rt.add_column(table.index.name or "", style="bold", no_wrap=True)
    for col in table.columns:
        head = "\n".join(map(str, col)) if isinstance(col, tuple) else str(col)
        rt.add_column(Text(head.replace(" [", "\n[")), justify="right")  # Text: "[cpu]" is not markup
    index = list(table.index)
    for i, (idx, row) in enumerate(table.iterrows()):
        cells = [f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v) for v in row.tolist()]
        rt.add_row(Text(str(idx)), *map(Text, cells), end_section=i + 1 < len(index) and index[i + 1] == MEAN_ROW)
    console.print(rt)
