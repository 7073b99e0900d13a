"""Reporter: paper-style tables from a result store (pandas), as Markdown, CSV and LaTeX.

Accuracy tables have one row per category plus ``Mean`` (macro average over categories)
and ``Std (categories)`` rows, and one column per (k, method) — like Tables 1–2 of the
RegAD paper. Cells read ``mean ± std`` in %: the mean and the sample standard deviation over
every (train seed, run) pair of the cell — support-set draws and training seeds together
(for ``Mean``: the std of the per-(train seed, run) macro averages). The two components are
kept apart in ``summary.csv`` (``std_runs``: pooled within-train-seed std over runs, the
support-draw noise; ``std_train_seeds``: pooled within-run std over train seeds, the training
noise) and in the ``*_std_components`` tables (``--std-components``). Records written before
the training-seed axis read as train seed 0.

A table's footnotes (std definition, caveats of published numbers) travel in
``table.attrs["notes"]``: printed under it and appended to the written Markdown / LaTeX.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fsad_bench.errors import FsadError
from fsad_bench.records.store import ResultStore, atomic_write_text, with_train_seed
from fsad_bench.report.completeness import complete_column, completeness, mark_table
from fsad_bench.report.costs import method_order

METRICS = {
    "image_auroc": "Image AUROC (%)",
    "pixel_auroc": "Pixel AUROC (%)",
    "aupro": "AUPRO (%)",
    "image_aupr": "Image AUPR (%)",
    "image_f1max": "Image F1-max (%)",
    "pixel_aupr": "Pixel AUPR (%)",
    "pixel_f1max": "Pixel F1-max (%)",
}
#: Metrics tabulated unless ``metrics=`` / ``--metrics`` asks for others (every record holds all of them).
DEFAULT_METRICS = ("image_auroc", "pixel_auroc", "aupro")
from fsad_bench.report.published import MEAN_ROW, STD_ROW  # noqa: E402  (one definition of the row names)


def _pooled_std(g: pd.DataFrame, within: str) -> float:
    """Pooled sample std of ``g["value"]`` within the groups of column ``within`` (0 without dof)."""
    ss, dof = 0.0, 0
    for _, x in g.groupby(within)["value"]:
        if len(x) > 1:
            ss += float(((x - x.mean()) ** 2).sum())
            dof += len(x) - 1
    return float(np.sqrt(ss / dof)) if dof else 0.0


def _spread(g: pd.DataFrame) -> pd.Series:
    """Mean and spreads of one column's values, one row per (train seed, run) pair."""
    v = g["value"]
    return pd.Series(
        {
            "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "std_runs": _pooled_std(g, "train_seed"),
            "std_train_seeds": _pooled_std(g, "run"),
            "n": len(v),
            "n_runs": g["run"].nunique(),
            "n_train_seeds": g["train_seed"].nunique(),
        }
    )


def summary(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Tidy table: one row per (dataset, category, k, label) with ``mean``, ``std`` (sample std over
    every (train seed, run) pair), its components ``std_runs`` (pooled over train seeds: spread
    over support draws at a fixed training) and ``std_train_seeds`` (pooled over runs: spread
    over training seeds at a fixed support draw), ``n`` pairs, ``n_runs``, ``n_train_seeds``
    (metric in %); plus ``Mean`` rows (macro average over categories) per (dataset, k, label),
    whose spreads are those of the per-(train seed, run) macro averages, and ``std_categories``."""
    keys = ["dataset", "category", "k", "label"]
    d = with_train_seed(df).dropna(subset=[metric]).assign(value=lambda x: 100 * x[metric].astype(float))
    pairs = d.groupby(keys + ["train_seed", "run"])["value"].mean().reset_index()
    per_cat = pairs.groupby(keys).apply(_spread, include_groups=False).reset_index()
    per_pair = pairs.groupby(["dataset", "k", "label", "train_seed", "run"])["value"].mean().reset_index()
    macro = per_pair.groupby(["dataset", "k", "label"]).apply(_spread, include_groups=False).reset_index()
    cat_means = per_cat.groupby(["dataset", "k", "label"])["mean"]
    macro["mean"] = cat_means.mean().values
    macro["std_categories"] = cat_means.std(ddof=1).fillna(0).values
    macro["n_categories"] = cat_means.count().values
    macro["category"] = MEAN_ROW
    out = pd.concat([per_cat, macro], ignore_index=True)
    for c in ("n", "n_runs", "n_train_seeds"):
        out[c] = out[c].astype(int)
    return out


STD_NOTE = "± : sample std over every (train seed, run) pair — support-set draws and training seeds together"


def paper_table(
    df: pd.DataFrame,
    metric: str = "image_auroc",
    dataset: str | None = None,
    methods: list[str] | None = None,
    show_std: bool = True,
    decimals: int = 1,
    std: str = "total",
) -> pd.DataFrame:
    """Wide table: rows = categories + Mean + Std (categories); columns = (k, method label).

    ``std="total"``: cells ``mean ± std`` over (train seed, run) pairs; ``std="components"``:
    cells ``total (runs r, seeds t)`` — the std and its two components (see :func:`summary`)."""
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
        if std == "components":
            text = f"{fmt.format(r.std)} (runs {fmt.format(r.std_runs)}, seeds {fmt.format(r.std_train_seeds)})"
        else:
            text = fmt.format(r.mean) + (f" ± {fmt.format(r.std)}" if show_std and r.n > 1 else "")
        table.loc[r.category, (f"k={r.k}", r.label)] = text
        if r.category == MEAN_ROW and std != "components":
            table.loc[STD_ROW, (f"k={r.k}", r.label)] = fmt.format(r.std_categories)
    table.index.name = "category"
    table = table.fillna("–")
    if std == "components":
        table = table.drop(index=STD_ROW)
        table.attrs["notes"] = [
            "cells: std over (train seed, run) pairs (runs: pooled std over support draws at "
            "a fixed training seed; seeds: pooled std over training seeds at a fixed draw), in %"
        ]
    elif show_std:
        table.attrs["notes"] = [STD_NOTE]
    return table


def rerun_agreement(reference: pd.DataFrame, rerun: pd.DataFrame, metric: str = "image_auroc") -> pd.DataFrame:
    """Does a rerun land inside the reference's printed error bars? One row per (dataset, category,
    k, label) present in both (``Mean`` rows included): ``mean_ref``, ``std_ref`` (the printed ±),
    ``mean_rerun``, ``std_rerun``, ``delta`` (rerun − reference) and ``inside`` (``|delta| <=
    std_ref``; a cell without spread, e.g. a single pair, is inside when ``|delta| <= 0.05``), in %."""
    keys = ["dataset", "category", "k", "label"]
    cols = ["mean", "std", "n"]
    a = summary(with_train_seed(reference), metric)[keys + cols]
    b = summary(with_train_seed(rerun), metric)[keys + cols]
    out = a.merge(b, on=keys, suffixes=("_ref", "_rerun"))
    out["delta"] = out["mean_rerun"] - out["mean_ref"]
    out["inside"] = out["delta"].abs() <= out["std_ref"].clip(lower=0.05)
    out["metric"] = metric
    out["is_mean"] = out["category"] == MEAN_ROW
    return (
        out.sort_values(["dataset", "k", "label", "is_mean", "category"]).drop(columns="is_mean").reset_index(drop=True)
    )


#: suite.json fields that depend on the machine, not on the experiment (the data's content is in the
#: config hashes and in what each record says it ran); ``cell_ids`` / ``kept_ids`` are bookkeeping.
MACHINE_FIELDS = ("data_root", "train_data_root", "support_lists", "description", "cell_ids", "kept_ids")
#: What a record says it ran, compared between a reference and its rerun cell by cell.
RUN_FIELDS = (
    "label",
    "protocol",
    "preset",
    "weights",
    "hparams",
    "image_size",
    "input_size",
    "n_test",
    "n_support",
    "support",
    "train_dataset",
    "seed",
)


def check_rerun(reference: ResultStore, rerun: ResultStore) -> None:
    """FsadError (one line) unless ``rerun`` is a rerun of ``reference``: their ``suite.json`` equal but for
    :data:`MACHINE_FIELDS` (``weights`` compared by file name), the common cells' records equal in
    :data:`RUN_FIELDS` and — when both read the data at the same path — in their config hash
    (code, data or weights changed otherwise; another machine's path and file times change the hash)."""
    a, b = reference.load_suite(), rerun.load_suite()
    head = f"{rerun.root} is not a rerun of {reference.root}"
    if a is None or b is None:
        raise FsadError(f"{head}: no suite.json in {(reference if a is None else rerun).root}")

    def norm(key: str, v):
        return Path(v).name if key == "weights" and isinstance(v, str) else v

    diff = [k for k in sorted(set(a) & set(b)) if k not in MACHINE_FIELDS and norm(k, a[k]) != norm(k, b[k])]
    if diff:
        k = diff[0]
        more = f" and {', '.join(diff[1:])}" if len(diff) > 1 else ""
        raise FsadError(f"{head}: suite.json differs in {k} ({a[k]!r} vs {b[k]!r}){more}")

    def cells(store: ResultStore) -> dict[tuple, dict]:
        return {
            (r["dataset"], r["method"], r["category"], r["k"], r["run"], r.get("train_seed", 0)): r
            for r in store.current_records()
        }

    ra, rb = cells(reference), cells(rerun)
    same_path = a.get("data_root") == b.get("data_root") and a.get("train_data_root") == b.get("train_data_root")
    for key in sorted(set(ra) & set(rb), key=str):
        x, y = ra[key], rb[key]
        fields = RUN_FIELDS + (("config_hash",) if same_path else ())
        for f in fields:
            if x.get(f) != y.get(f):
                why = " (code, data or weights changed)" if f == "config_hash" else ""
                raise FsadError(f"{head}: cell {y['cell_id']} differs in {f} ({x.get(f)!r} vs {y.get(f)!r}){why}")


def _tex_escape(text: str) -> str:
    out = "".join("\\" + c if c in "&%$#_{}" else c for c in text)
    return out.replace("~", "\\textasciitilde{}").replace("^", "\\textasciicircum{}")


def _latex(table: pd.DataFrame, caption: str) -> str:
    return table.to_latex(caption=caption, escape=True, multicolumn=True, multicolumn_format="c")


def write_tables(
    out: str | Path,
    methods: list[str] | None = None,
    reference_method: str | None = None,
    std_components: bool | None = None,
    metrics: list[str] | None = None,
    complete_only: bool = False,
) -> dict[str, pd.DataFrame]:
    """Build every table of a results folder and write ``tables/*.{md,csv,tex}``; returns them by name.

    ``metrics``: which accuracy tables (names of :data:`METRICS`; default :data:`DEFAULT_METRICS`).

    Accuracy tables get the published numbers as extra ``"<Method> (paper)"`` columns where
    ``results/reference`` has them, and, with ``reference_method`` (label or method name),
    significance markers on their ``Mean`` row (paired Wilcoxon vs that method).
    ``std_components``: also the ``<dataset>_<metric>_std_components`` tables (std over
    (train seed, run) pairs and its two components); None = when some cell has several train
    seeds. Notes (``attrs["notes"]``) are appended to the Markdown and LaTeX files; when invalid cell
    files were skipped (:meth:`ResultStore.invalid`), every table carries a note saying how many.

    An aggregate missing some planned cell of ``suite.json`` (an interrupted run) is marked ``*`` with a note
    naming what it lacks (:mod:`fsad_bench.report.completeness`); the long tables and ``summary.csv`` get a
    ``complete`` column. ``complete_only``: incomplete (method, k) are left out of every table (a note says which)."""
    from fsad_bench.report.costs import cost_ratio_table, cost_table
    from fsad_bench.report.flags_table import mark_flags
    from fsad_bench.report.per_defect import write_side_tables
    from fsad_bench.report.published import attach_reference, paper_difference
    from fsad_bench.report.significance import add_significance, write_rank_stability
    from fsad_bench.report.sweeps import sweep_tables

    store = ResultStore(out)
    df = with_train_seed(store.frame())
    comp = completeness(store)
    hidden = []
    if complete_only and comp.incomplete():
        hidden = [f"hidden (--complete-only): {'; '.join(c.note() for c in comp.incomplete())}"]
        df = df[comp.complete_rows(df)]
        if df.empty:
            raise FsadError(f"no (method, k) of {out} has every planned cell; --complete-only leaves no table")
    if std_components is None:
        std_components = bool(
            df.groupby(["dataset", "category", "k", "label", "run"])["train_seed"].nunique().gt(1).any()
        )
    if methods is None and (suite := store.load_suite()):
        methods = suite.get("methods")
    tables: dict[str, pd.DataFrame] = {}
    for ds in sorted(df["dataset"].unique()):
        sub = df[df["dataset"] == ds]
        for metric in metrics or DEFAULT_METRICS:
            if metric not in df.columns:  # records written before the metric existed
                continue
            t = mark_table(paper_table(df, metric, ds, methods), comp, (MEAN_ROW, STD_ROW), hide=complete_only)
            if t.empty:
                continue
            if reference_method and reference_method in set(sub["label"]) | set(sub["method"]):
                t = add_significance(t, sub, reference_method, metric)
            t = attach_reference(t, ds, metric)  # no-op without published numbers
            tables[f"{ds}_{metric}"] = mark_flags(t, sub, metric)  # † on cells with a flagged record
            if std_components:
                tables[f"{ds}_{metric}_std_components"] = mark_table(
                    paper_table(df, metric, ds, methods, std="components"), comp, (MEAN_ROW,), hide=complete_only
                )
            diff = paper_difference(df, ds, metric)
            if not diff.empty:
                tables[f"{ds}_{metric}_vs_paper"] = complete_column(diff, comp, "label").set_index("label")
    tables["cost"] = complete_column(cost_table(df, methods), comp)
    tables["cost_ratio"] = complete_column(cost_ratio_table(df, methods), comp, k_col=None)
    tables.update(sweep_tables(df, metrics or DEFAULT_METRICS))  # one row per swept value (report/sweeps.py)
    notes = hidden + (
        [note] if (note := store.invalid_note()) else []
    )  # never silently: every table says it lacks records
    for t in tables.values():
        t.attrs["notes"] = [*t.attrs.get("notes", []), *notes]
    folder = Path(out) / "tables"
    for name, t in tables.items():
        caption = next((text for m, text in METRICS.items() if m in name), "Cost") + f" — {name}"
        flat = t.copy()
        if isinstance(flat.columns, pd.MultiIndex):
            flat.columns = [" ".join(c) for c in flat.columns]
        notes = t.attrs.get("notes", [])
        md_notes = "".join(f"\n{n}\n" for n in notes)
        atomic_write_text(folder / f"{name}.md", flat.to_markdown(floatfmt=".3f") + "\n" + md_notes)
        atomic_write_text(folder / f"{name}.csv", flat.to_csv())
        tex_notes = "".join(f"\\par\\noindent{{\\footnotesize {_tex_escape(n)}}}\n" for n in notes)
        atomic_write_text(folder / f"{name}.tex", _latex(t, caption) + tex_notes)
    write_side_tables(folder, df, methods)  # per_defect_image_auroc, operating_point (.md, .csv)
    write_rank_stability(folder, df, metrics or DEFAULT_METRICS, methods)  # P(first) over resampled draws
    summaries = pd.concat([summary(df, m).assign(metric=m) for m in METRICS if m in df.columns and df[m].notna().any()])
    summaries["complete"] = [
        comp.label_complete(lab, k, None if cat == MEAN_ROW else cat)
        for lab, k, cat in zip(summaries["label"], summaries["k"], summaries["category"])
    ]
    atomic_write_text(folder / "summary.csv", summaries.to_csv(index=False))
    return tables


def print_table(table: pd.DataFrame, title: str, console: Console | None = None) -> None:
    """Print a table with rich; paper-style tables (columns ``(k, method)``) print one block per k
    so that they stay readable in a terminal (the written files keep the full table)."""
    console = console or Console()
    if isinstance(table.columns, pd.MultiIndex) and table.columns.names[0] == "k":
        heads = list(dict.fromkeys(table.columns.get_level_values(0)))
        extra = [h for h in heads if not str(h).startswith("k=")]  # e.g. the flagged column: beside every block
        for k in (h for h in heads if h not in extra):
            beside = [table[[c]].set_axis([" ".join(c).strip()], axis=1) for c in table.columns if c[0] in extra]
            _print_one(pd.concat([table[k], *beside], axis=1), f"{title} — {k}", console)
    else:
        _print_one(table, title, console)
    for note in table.attrs.get("notes", []):
        console.print(Text(note, style="dim"), soft_wrap=True)  # one line each, however long


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
