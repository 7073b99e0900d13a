"""Sweeps: a metric and the adaptation cost against the value of a swept option.

A suite's ``[sweep.<method>]`` runs each value as a method variant ``<method>@<option>=<value>``
(:func:`fsad_bench.registry.variant_name`); every record carries the variant's name in ``method``.
Here the variants of one base method and one set of swept options form a *sweep*:

* :func:`sweep_tables` — per (dataset, sweep, metric), and per (category, sweep, metric) when the
  dataset has several categories, one row per value (``48``; several options:
  ``meta_epochs=3, finetune_epochs=48``), columns ``k=<k>``: the macro average over categories, ``mean ± std`` in % with the std over
  every (train seed, run) pair of macro averages (as the ``Mean`` row of the paper tables), then
  ``adapt_s k=<k>`` (mean seconds) and ``train_s`` (mean seconds of the fit over cells);
* :func:`plot_sweep` / :func:`write_sweep_plots` — ``<out>/plots/<dataset>_sweep_<method>.png``: one
  panel per metric (mean ± std error bars against the swept value, one line per k), and a panel
  of seconds: adaptation (solid; an individual method's training included) and the aggregated fit
  (dashed, ``train_seconds``), mean ± std over cells.

Numbers on a single numeric option are drawn on a numeric axis (logarithmic when the values span
a factor of 10 or more); several options or other values are drawn at evenly spaced positions.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from fsad_bench.metrics import METRICS
from fsad_bench.records.store import with_train_seed
from fsad_bench.registry import split_variant

#: metrics drawn when none are asked for (those with a value in the records)
PLOT_METRICS = ("image_auroc", "pixel_auroc", "aupro")
#: how a metric is named in notes (the plots' axis titles without the unit)
METRICS_TEXT = {
    m: {"image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC", "aupro": "AUPRO"}.get(m, m.replace("_", " "))
    for m in METRICS
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _order_key(values: tuple) -> tuple:
    return tuple((0, float(v), "") if _is_number(v) else (1, 0.0, str(v)) for v in values)


def setting_text(options: dict[str, Any]) -> str:
    """A row of a sweep table: the value (``48``) of a single swept option, else ``meta_epochs=3,
    finetune_epochs=48`` (the index name says which options)."""
    if len(options) == 1:
        return str(next(iter(options.values())))
    return ", ".join(f"{k}={v}" for k, v in options.items())


def _safe(name: str) -> str:
    """``name`` in a file name (as in cell ids: letters, digits and ``_.+-``)."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(name))


def _suffix(found: dict, ds: str, base: str, keys: tuple[str, ...]) -> str:
    """``<method>`` in file and table names; ``<method>_<options>`` when the method has several sweeps."""
    several = sum(1 for (d, b, _) in found if (d, b) == (ds, base)) > 1
    return _safe(base) + ("_" + "_".join(keys) if several else "")


def _over(d: pd.DataFrame) -> str:
    cats = sorted(d["category"].unique())
    return f"category {cats[0]}" if len(cats) == 1 else f"macro average over {len(cats)} categories"


def sweeps(df: pd.DataFrame) -> dict[tuple[str, str, tuple[str, ...]], pd.DataFrame]:
    """The records of method variants by (dataset, base method, swept options), each with the
    columns ``setting`` (:func:`setting_text`) and ``order`` (rank of the swept values: numbers
    numerically); a sweep needs two values at least (a lone variant is no sweep). A dataset of
    several categories also gives one sweep per category, under ``<dataset>_<category>`` (its
    tables and plots are named so: e.g. ``real_pair_bottle_sweep_tdg.png``)."""
    if df.empty or "method" not in df.columns:
        return {}
    parsed = {m: split_variant(m) for m in df["method"].unique()}
    variants = {m: p for m, p in parsed.items() if p[1]}
    out: dict[tuple[str, str, tuple[str, ...]], pd.DataFrame] = {}
    for ds in sorted(df["dataset"].unique()):
        sub = df[df["dataset"] == ds]
        groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        for m in sub["method"].unique():
            if m in variants:
                base, opts = variants[m]
                groups.setdefault((base, tuple(opts)), []).append(m)
        for (base, keys), methods in sorted(groups.items()):
            if len(methods) < 2:
                continue
            ranked = sorted(methods, key=lambda m: _order_key(tuple(variants[m][1].values())))
            d = sub[sub["method"].isin(methods)]
            d = d.assign(
                setting=d["method"].map(lambda m: setting_text(variants[m][1])),
                order=d["method"].map({m: i for i, m in enumerate(ranked)}),
            )
            out[(ds, base, keys)] = d
            categories = sorted(d["category"].unique())
            if len(categories) > 1:  # a budget is chosen per category (dataset) too: one sweep each
                for c in categories:
                    out[(f"{ds}_{c}", base, keys)] = d[d["category"] == c]
    return out


def sweep_summary(d: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (variant, k) of one sweep's records ``d`` (from :func:`sweeps`): ``mean`` (the mean
    over categories of each category's mean over (train seed, run) pairs) and ``std`` (sample std of
    the per-(train seed, run) macro averages), in %; ``adapt_s`` / ``adapt_s_std`` and ``train_s`` /
    ``train_s_std`` (seconds, over cells), ``n`` pairs; sorted by the swept value, then k."""
    d = with_train_seed(d)
    cols = ["setting", "order", "method", "k"]
    cost = (
        d.groupby(cols)
        .agg(
            adapt_s=("adapt_seconds", "mean"),
            adapt_s_std=("adapt_seconds", "std"),
            train_s=("train_seconds", "mean"),
            train_s_std=("train_seconds", "std"),
            protocol=("protocol", "first"),
        )
        .reset_index()
    )
    v = d.dropna(subset=[metric]) if metric in d.columns else d.iloc[0:0]
    if v.empty:
        acc = pd.DataFrame(columns=cols + ["mean", "std", "n"])
    else:
        v = v.assign(value=100 * v[metric].astype(float))
        pairs = v.groupby(cols + ["category", "train_seed", "run"])["value"].mean().reset_index()
        mean = pairs.groupby(cols + ["category"])["value"].mean().groupby(cols).mean().rename("mean")
        macro = pairs.groupby(cols + ["train_seed", "run"])["value"].mean().groupby(cols)
        acc = pd.concat([mean, macro.std(ddof=1).rename("std"), macro.size().rename("n")], axis=1).reset_index()
    out = cost.merge(acc, on=cols, how="left")
    out[["adapt_s_std", "train_s_std", "std"]] = out[["adapt_s_std", "train_s_std", "std"]].fillna(0.0)
    return out.sort_values(["order", "k"]).reset_index(drop=True)


def sweep_tables(
    df: pd.DataFrame, metrics: list[str] | tuple[str, ...] | None = None, decimals: int = 1
) -> dict[str, pd.DataFrame]:
    """``<dataset>_<metric>_sweep_<method>`` (``…_<options>`` when a method has sweeps over other
    options too) -> a table with one row per swept value (see the module docstring); nothing
    without sweeps. ``metrics``: default :data:`PLOT_METRICS`."""
    found = sweeps(df)
    fmt = f"{{:.{decimals}f}}"
    tables: dict[str, pd.DataFrame] = {}
    for (ds, base, keys), d in found.items():
        for metric in metrics or PLOT_METRICS:
            s = sweep_summary(d, metric)
            if s["mean"].isna().all():
                continue
            ks = sorted(s["k"].unique())
            rows = list(dict.fromkeys(s["setting"]))
            t = pd.DataFrame(
                index=rows, columns=[f"k={k}" for k in ks] + [f"adapt_s k={k}" for k in ks] + ["train_s"], dtype=object
            )
            for r in s.itertuples():
                if not pd.isna(r.mean):
                    t.loc[r.setting, f"k={r.k}"] = fmt.format(r.mean) + (f" ± {fmt.format(r.std)}" if r.n > 1 else "")
                t.loc[r.setting, f"adapt_s k={r.k}"] = f"{r.adapt_s:.3g}"
            for setting, g in s.groupby("setting"):
                t.loc[setting, "train_s"] = f"{g['train_s'].mean():.3g}"
            t.index.name = ", ".join(keys)
            t = t.fillna("–")
            t.attrs["notes"] = [
                (
                    f"{base} swept over {', '.join(keys)} on {ds}: {METRICS_TEXT.get(metric, metric)}, "
                    f"{_over(d)}, ± = sample std over (train seed, run) pairs; "
                    f"seconds: mean over cells"
                )
            ]
            tables[f"{_safe(ds)}_{metric}_sweep_{_suffix(found, ds, base, keys)}"] = t
    return tables


__all__ = ["PLOT_METRICS", "setting_text", "sweep_summary", "sweep_tables", "sweeps"]
