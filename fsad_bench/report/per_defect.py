"""Two side tables of a results folder, written beside the paper tables (Markdown and CSV):

* ``tables/per_defect_image_auroc`` — image AUROC per defect type (the record field
  ``per_defect_auroc``: that defect's images against every normal image): rows (dataset,) category,
  defect; columns (k, method); cells ``mean ± std`` in % over the cell's (train seed, run) records.
* ``tables/operating_point`` — the label-free operating point (record field ``operating_point``,
  :mod:`fsad_bench.run.operating_point`): one row per (dataset, k, method, category) and a ``Mean``
  row per (dataset, k, method): the threshold rule, how support images were scored, and the test
  set's FPR, recall and F1 at that threshold beside F1-max (the oracle), means in %.

Records without the field (written before it existed, or an individual method run without
``operating_point = true``) are left out; a table without any record is not written.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fsad_bench.records.store import atomic_write_text
from fsad_bench.report.costs import method_order
from fsad_bench.report.published import MEAN_ROW

OP_FIELDS = ("fpr", "recall", "f1", "f1max")


def _cell_text(v: pd.Series, decimals: int = 1) -> str:
    std = f" ± {v.std(ddof=1):.{decimals}f}" if len(v) > 1 else ""
    return f"{v.mean():.{decimals}f}{std}"


def per_defect_table(df: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """Rows (dataset when several, category, defect), columns ``(f"k={k}", label)``, ``mean ± std`` in %."""
    if "per_defect_auroc" not in df.columns:
        return pd.DataFrame()
    rows = [
        {
            "dataset": r["dataset"],
            "category": r["category"],
            "defect": d,
            "k": r["k"],
            "label": r["label"],
            "value": 100 * float(v),
        }
        for _, r in df.iterrows()
        if isinstance(r["per_defect_auroc"], dict)
        for d, v in r["per_defect_auroc"].items()
    ]
    if not rows:
        return pd.DataFrame()
    long = pd.DataFrame(rows)
    keys = (["dataset"] if long["dataset"].nunique() > 1 else []) + ["category", "defect"]
    labels = [lab for lab in method_order(df, methods) if lab in set(long["label"])]
    cols = [(f"k={k}", lab) for k in sorted(long["k"].unique()) for lab in labels]
    cells = long.groupby(keys + ["k", "label"])["value"].apply(_cell_text)
    table = pd.DataFrame(
        "–",
        index=pd.MultiIndex.from_tuples(sorted({i[: len(keys)] for i in cells.index}), names=keys),
        columns=pd.MultiIndex.from_tuples(cols, names=["k", "method"]),
        dtype=object,
    )
    for idx, text in cells.items():
        table.loc[idx[: len(keys)], (f"k={idx[-2]}", idx[-1])] = text
    table.attrs["notes"] = [
        (
            "image AUROC (%) of each defect type's images against every normal image; "
            "± : sample std over the cell's (train seed, run) records"
        )
    ]
    return table


def operating_point_table(df: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """One row per (dataset, k, method, category) plus a ``Mean`` row per (dataset, k, method): rule,
    scoring, records ``n``, and the means (%) of ``fpr``, ``recall``, ``f1``, ``f1max`` at the support threshold."""
    if "operating_point" not in df.columns:
        return pd.DataFrame()
    rows = [
        {
            "dataset": r["dataset"],
            "k": r["k"],
            "label": r["label"],
            "category": r["category"],
            "rule": op.get("rule"),
            "scoring": op.get("scoring"),
            **{f: 100 * float(op[f]) for f in OP_FIELDS},
        }
        for _, r in df.iterrows()
        if isinstance(op := r["operating_point"], dict) and all(f in op for f in OP_FIELDS)
    ]
    if not rows:
        return pd.DataFrame()
    long = pd.DataFrame(rows)
    order = {lab: i for i, lab in enumerate(method_order(df, methods))}
    keys = ["dataset", "k", "label"]
    per_cat = (
        long.groupby(keys + ["category"])
        .agg(
            rule=("rule", "first"),
            scoring=("scoring", lambda s: "/".join(sorted(set(s)))),
            n=("f1", "size"),
            **{f: (f, "mean") for f in OP_FIELDS},
        )
        .reset_index()
    )
    mean = (
        per_cat.groupby(keys)
        .agg(
            rule=("rule", "first"),
            scoring=("scoring", lambda s: "/".join(sorted(set(s)))),
            n=("n", "sum"),
            **{f: (f, "mean") for f in OP_FIELDS},
        )
        .reset_index()
    )
    mean["category"] = MEAN_ROW
    out = pd.concat([per_cat, mean], ignore_index=True)
    out["_m"] = out["label"].map(order).fillna(len(order))
    out["_mean"] = out["category"] == MEAN_ROW
    out = out.sort_values(["dataset", "k", "_m", "label", "_mean", "category"]).drop(columns=["_m", "_mean"])
    out = out.rename(columns={"label": "method"}).set_index(["dataset", "k", "method", "category"])
    out[list(OP_FIELDS)] = out[list(OP_FIELDS)].astype(float).round(1)
    out.attrs["notes"] = [
        (
            "threshold from the support images alone (rule max: the highest leave-one-out support "
            "score; k=1: the support image scored by the model adapted on it); fpr, recall, f1: test "
            "set at that threshold, f1max: the best threshold (oracle), means in %"
        )
    ]
    return out


def write_side_tables(folder: str | Path, df: pd.DataFrame, methods: list[str] | None = None) -> list[str]:
    """Write ``per_defect_image_auroc`` and ``operating_point`` (``.md`` and ``.csv``) into ``folder``
    when records hold their fields; returns the names written."""
    written = []
    for name, table in (
        ("per_defect_image_auroc", per_defect_table(df, methods)),
        ("operating_point", operating_point_table(df, methods)),
    ):
        if table.empty:
            continue
        flat = table.copy()
        if isinstance(flat.columns, pd.MultiIndex):
            flat.columns = [" ".join(c) for c in flat.columns]
        notes = "".join(f"\n{n}\n" for n in table.attrs.get("notes", []))
        atomic_write_text(
            Path(folder) / f"{name}.md", flat.reset_index().to_markdown(index=False, floatfmt=".1f") + "\n" + notes
        )
        atomic_write_text(Path(folder) / f"{name}.csv", flat.to_csv())
        written.append(name)
    return written
