"""Published reference numbers (``results/reference/*.csv``, installed as ``fsad_bench.reference``).

``results/reference/regad_paper.csv`` holds published numbers (``value`` in %); see
``results/reference/README.md`` for where each number comes from and what is missing.
:func:`reference_rows` formats them like :func:`fsad_bench.report.tables.paper_table` columns,
labelled ``"<Method> (paper)"``; :func:`paper_difference` gives measured − paper for the
methods whose registry name maps to a paper name (:data:`PAPER_NAMES`).

Caveats travel with the numbers (column ``caveat`` of the CSV): RegAD's and DifferNet's
official scripts select the checkpoint with the best *test* AUROC, so their published numbers
are optimistic; the RegAD paper's Table 3 "RegAD-L" is its Table 5 row A (no registration
training), i.e. our training-free ``gaussian``, not our trained ``regad-l``. A caveated
column's label carries a footnote mark (``"RegAD (paper)†"``) and the table's
``attrs["notes"]`` the footnote; :func:`paper_difference` has a ``caveat`` column.

A measured ``Mean`` over fewer categories than the reference's is never silently put beside
the published one: :func:`attach_reference` adds a ``Mean (n of N paper categories)`` row (the
published per-category numbers averaged over the measured categories, where the reference
has them) and a note naming how many of the reference's categories the measured Mean covers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from fsad_bench.errors import FsadError

MEAN_ROW, STD_ROW = "Mean", "Std (categories)"  # the row names of fsad_bench.report.tables's tables
# registry name -> method name used in the RegAD paper's tables
# (gaussian -> RegAD-L: the paper's Table 3 RegAD-L is Table 5 row A, no registration training;
#  regad-l, our individually trained RegAD, has no published counterpart)
PAPER_NAMES = {"regad": "RegAD", "diffnet+": "DiffNet+", "tdg+": "TDG+", "gaussian": "RegAD-L"}
FOOTNOTE_MARKS = "†‡§¶#"
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
        ref = pd.concat(
            [ref]
            + [
                pd.read_csv(p, dtype={"dataset": str, "category": str, "method": str, "metric": str})
                for p in extra
                if p.is_file()
            ],
            ignore_index=True,
        )
    missing = {"dataset", "category", "method", "k", "metric", "value"} - set(ref.columns)
    if missing:
        raise FsadError(f"{path}: missing columns {sorted(missing)}")
    if "caveat" not in ref.columns:
        ref = ref.assign(caveat="")
    return ref.astype({"k": int, "value": float}).assign(caveat=lambda r: r["caveat"].fillna("").astype(str))


def caveat_marks(reference: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """Paper method name -> (footnote mark, caveat text) for every caveated method of ``reference``
    (marks in order of first appearance; one caveat per method)."""
    out: dict[str, tuple[str, str]] = {}
    texts: dict[str, str] = {}
    if "caveat" not in reference.columns:
        return out
    for m, c in reference[["method", "caveat"]].itertuples(index=False):
        if isinstance(c, str) and c and m not in out:
            mark = texts.setdefault(c, FOOTNOTE_MARKS[len(texts) % len(FOOTNOTE_MARKS)])
            out[m] = (mark, c)
    return out


def caveat_notes(marks: dict[str, tuple[str, str]], methods: Iterable[str] | None = None) -> list[str]:
    """Footnote lines ``"† <text> (RegAD, DiffNet+)"`` for the caveated ``methods`` (default all)."""
    by_mark: dict[tuple[str, str], list[str]] = {}
    for m, (mark, text) in marks.items():
        if methods is None or m in set(methods):
            by_mark.setdefault((mark, text), []).append(m)
    return [f"{mark} {text} ({', '.join(ms)})" for (mark, text), ms in by_mark.items()]


def reference_rows(
    dataset: str,
    metric: str = "image_auroc",
    ks: Iterable[int] | None = None,
    methods: Iterable[str] | None = None,
    decimals: int = 1,
    reference: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Published numbers shaped like :func:`fsad_bench.report.tables.paper_table`: index = categories
    + ``Mean`` + ``Std (categories)``, columns ``(f"k={k}", "<Method> (paper)")``, text cells.

    ``Mean`` is the published average; ``Std (categories)`` is computed here from the published
    per-category numbers (sample std), ``–`` where the paper gives no per-category numbers.
    Empty DataFrame when nothing matches."""
    ref = load_reference() if reference is None else reference
    marks = caveat_marks(ref)  # from the whole file: a method keeps its mark on every dataset
    ref = ref[(ref["dataset"] == dataset) & (ref["metric"] == metric)]
    if ks is not None:
        ref = ref[ref["k"].isin(list(ks))]
    if methods is not None:
        ref = ref[ref["method"].isin(list(methods))]
    if ref.empty:
        return pd.DataFrame()
    fmt = f"{{:.{decimals}f}}"

    def col(m: str) -> str:
        return f"{m} (paper){marks[m][0] if m in marks else ''}"

    cats = sorted(c for c in ref["category"].unique() if c != MEAN_ROW)
    cols = pd.MultiIndex.from_tuples(
        [
            (f"k={k}", col(m))
            for k in sorted(ref["k"].unique())
            for m in dict.fromkeys(ref["method"])
            if ((ref["k"] == k) & (ref["method"] == m)).any()
        ],
        names=["k", "method"],
    )
    table = pd.DataFrame("–", index=cats + [MEAN_ROW, STD_ROW], columns=cols, dtype=object)
    for r in ref.itertuples():
        table.loc[r.category, (f"k={r.k}", col(r.method))] = fmt.format(r.value)
    for (k, m), g in ref[ref["category"] != MEAN_ROW].groupby(["k", "method"]):
        if len(g) > 1:
            table.loc[STD_ROW, (f"k={k}", col(m))] = fmt.format(g["value"].std(ddof=1))
    table.index.name = "category"
    table.attrs["notes"] = caveat_notes(marks, ref["method"].unique())
    return table


def _leading_number(text: object) -> float | None:
    try:
        return float(str(text).split()[0])
    except (ValueError, IndexError):
        return None


def attach_reference(
    table: pd.DataFrame,
    dataset: str,
    metric: str = "image_auroc",
    decimals: int = 1,
    reference: pd.DataFrame | None = None,
    missing_ok: bool = True,
) -> pd.DataFrame:
    """A paper table with the published columns of the same k values inserted after each k's
    measured columns; rows are the union (measured categories first), so every category the
    reference has is compared side by side. Unchanged when the reference has nothing for this
    dataset / metric / k, or (``missing_ok``) when the reference file is absent.

    The published ``Mean`` averages the paper's N categories; when the measured ``Mean`` runs
    over fewer (n < N), a row ``"Mean (n of N paper categories)"`` is added — measured and
    published per-category numbers averaged over the same n categories (published ``–`` where
    the paper gives only its Mean) — and ``attrs["notes"]`` says over how many of the
    reference's categories the measured Mean runs. Caveats of published columns (footnote marks
    in their labels) are in the notes too."""
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
    notes = list(table.attrs.get("notes", []))
    measured = [r for r in table.index if r not in (MEAN_ROW, STD_ROW) and not str(r).startswith(f"{MEAN_ROW} (")]
    rows = measured + [r for r in ref.index if r not in measured and r not in (MEAN_ROW, STD_ROW)]
    merged = pd.concat([table, ref], axis=1).reindex(rows + [MEAN_ROW, STD_ROW]).fillna("–")
    sub = reference[(reference["dataset"] == dataset) & (reference["metric"] == metric)]
    if ks is not None:
        sub = sub[sub["k"].isin(ks)]
    ref_cats = sorted(set(sub["category"]) - {MEAN_ROW})
    from fsad_bench.data.roots import KNOWN_DATASETS  # the public datasets' category lists

    universe = ref_cats or list(KNOWN_DATASETS.get(dataset, []))
    common = [c for c in measured if c in universe]
    if universe and len(common) < len(universe):
        n, big_n = len(common), len(universe)
        names = ", ".join(common) if n <= 5 else f"{', '.join(common[:5])}, …"
        notes.append(
            f"{MEAN_ROW} of measured columns: over {n} of the reference's {big_n} {dataset} categories"
            f"{f' ({names})' if n else ''}; the published {MEAN_ROW} (paper) averages all {big_n}, so the "
            f"two {MEAN_ROW} rows are not comparable — compare per category"
            + (f" or in the row '{MEAN_ROW} ({n} of {big_n} paper categories)'" if n and ref_cats else "")
        )
        if n and ref_cats:
            label = f"{MEAN_ROW} ({n} of {big_n} paper categories)"
            fmt = f"{{:.{decimals}f}}"
            extra = pd.Series("–", index=merged.columns, dtype=object)
            for c in merged.columns:
                vals = [_leading_number(merged.loc[cat, c]) for cat in common]
                if all(v is not None for v in vals):
                    extra[c] = fmt.format(float(np.mean(vals)))
            merged = pd.concat([merged.loc[rows], extra.to_frame(label).T, merged.loc[[MEAN_ROW, STD_ROW]]])
    order = sorted(range(len(merged.columns)), key=lambda i: (int(merged.columns[i][0].split("=")[1]), i))
    merged = merged.iloc[:, order]
    merged.index.name = table.index.name or "category"
    merged.attrs["notes"] = notes + [x for x in ref.attrs.get("notes", []) if x not in notes]
    return merged


def _row(head: list, category: str, measured: float, paper: float, n_runs: int, basis: str, caveat: str) -> list:
    """One row of :func:`paper_difference`: ``head`` (dataset, label, method, paper name, k), then the values."""
    return [*head, category, measured, paper, measured - paper, n_runs, basis, caveat]


def paper_difference(
    df: pd.DataFrame, dataset: str, metric: str = "image_auroc", reference: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Measured − published, for labels whose method maps to a paper name (:data:`PAPER_NAMES`).

    One row per (label, k, category) present in both, plus a ``Mean`` row per (label, k):
    measured = mean over runs (%), the ``Mean`` row the macro average over the measured
    categories. Its paper value is the published average when every published category was
    measured (``paper_basis = "published"``), else the mean of the published per-category
    numbers over the measured categories (``"mean of N categories"``) so both sides average
    the same categories. ``n_runs`` counts (train seed, run) pairs; ``caveat`` is the published
    number's caveat (e.g. checkpoint selected on test AUROC). Columns: dataset, label, method,
    paper_method, k, category, measured, paper, diff, n_runs, paper_basis, caveat."""
    ref = load_reference() if reference is None else reference
    marks = caveat_marks(ref)
    ref = ref[(ref["dataset"] == dataset) & (ref["metric"] == metric)]
    d = df[(df["dataset"] == dataset) & df["method"].isin(list(PAPER_NAMES))].dropna(subset=[metric])
    columns = [
        "dataset",
        "label",
        "method",
        "paper_method",
        "k",
        "category",
        "measured",
        "paper",
        "diff",
        "n_runs",
        "paper_basis",
        "caveat",
    ]
    if d.empty or ref.empty:
        return pd.DataFrame(columns=columns)
    per_cat = (
        d.assign(value=100 * d[metric].astype(float))
        .groupby(["label", "method", "k", "category"])["value"]
        .agg(measured="mean", n_runs="count")
        .reset_index()
    )
    rows = []
    for (label, method, k), g in per_cat.groupby(["label", "method", "k"]):
        pm = PAPER_NAMES[method]
        r = ref[(ref["method"] == pm) & (ref["k"] == k)]
        if r.empty:
            continue
        caveat = marks.get(pm, ("", ""))[1]
        published = dict(zip(r["category"], r["value"]))
        cats_ref = {c for c in published if c != MEAN_ROW}
        head = [dataset, label, method, pm, int(k)]
        for row in g.itertuples():
            if row.category in published:
                rows.append(
                    _row(
                        head, row.category, row.measured, published[row.category], int(row.n_runs), "published", caveat
                    )
                )
        measured_mean = g["measured"].mean()
        measured_cats = set(g["category"])
        if cats_ref and measured_cats == cats_ref and MEAN_ROW in published:
            paper, basis = published[MEAN_ROW], "published"
        elif cats_ref and measured_cats <= cats_ref:
            paper = float(np.mean([published[c] for c in measured_cats]))
            basis = f"mean of {len(measured_cats)} categories"  # the paper's numbers over the measured ones
        elif not cats_ref and MEAN_ROW in published and len(measured_cats) > 0:
            from fsad_bench.data.roots import KNOWN_DATASETS

            big_n = len(KNOWN_DATASETS.get(dataset, []))
            paper = published[MEAN_ROW]
            basis = (
                "published"
                if big_n and measured_cats == set(KNOWN_DATASETS[dataset])
                else f"published Mean over {big_n or 'the paper’s'} categories, measured over {len(measured_cats)}"
                " (not comparable)"
            )
        else:
            continue
        rows.append(_row(head, MEAN_ROW, measured_mean, paper, int(g["n_runs"].min()), basis, caveat))
    return pd.DataFrame(rows, columns=columns)
