"""Sweep figures: each swept metric against the swept value with its error bars, one line per k, and the
adaptation seconds beside it (``plots/<dataset>_sweep_<method>.png``). The numbers are those of
:mod:`fsad_bench.report.sweeps` (the sweep tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from fsad_bench.records.store import ResultStore
from fsad_bench.registry import split_variant
from fsad_bench.report.plots import METRIC_NAMES, _colors, _save
from fsad_bench.report.sweeps import PLOT_METRICS, _is_number, _safe, _suffix, setting_text, sweep_summary, sweeps


def _axis(
    methods: list[str], key: str, variants: dict[str, dict[str, Any]]
) -> tuple[dict[str, float], list[float], list[str], bool]:
    """x of each variant (its value of ``key``), the ticks and their labels, and whether the axis is
    logarithmic: numbers on a numeric axis, other values at evenly spaced positions."""
    values = list(dict.fromkeys(variants[m][key] for m in methods))
    if all(_is_number(v) for v in values):
        x = {m: float(variants[m][key]) for m in methods}
        lo, hi = min(x.values()), max(x.values())
        return x, [float(v) for v in values], [str(v) for v in values], lo > 0 and hi >= 10 * lo
    pos = {repr(v): float(i) for i, v in enumerate(values)}
    return {m: pos[repr(variants[m][key])] for m in methods}, list(pos.values()), [str(v) for v in values], False


def plot_sweep(
    d: pd.DataFrame,
    dataset: str,
    base: str,
    keys: tuple[str, ...],
    path: Path,
    metrics: list[str] | tuple[str, ...] | None = None,
) -> Path | None:
    """One sweep's figure (see the module docstring) from its records ``d`` (:func:`sweeps`): x is the
    last swept option; several options give one line per k and setting of the others (colour = k,
    marker and line style = the other options). None when no metric of ``metrics`` (default
    :data:`PLOT_METRICS`) has a value."""
    from matplotlib.lines import Line2D

    wanted = [m for m in (metrics or PLOT_METRICS) if m in d.columns and d[m].notna().any()]
    if not wanted:
        return None
    variants = {m: split_variant(m)[1] for m in d["method"].unique()}
    cost = sweep_summary(d, wanted[0])
    methods = list(dict.fromkeys(cost["method"]))
    x, ticks, tick_labels, log = _axis(methods, keys[-1], variants)
    if len(keys) == 2:  # the other option's value alone ("3"; the legend says "meta_epochs=3")
        others = {m: str(variants[m][keys[0]]) for m in methods}
    else:
        others = {
            m: setting_text({k: v for k, v in variants[m].items() if k != keys[-1]}) if len(keys) > 1 else ""
            for m in methods
        }
    series = list(dict.fromkeys(others[m] for m in methods))
    style = {
        o: (("o", "s", "^", "D", "v", "P", "X", "*")[i % 8], ("-", "--", ":", "-.")[i % 4])
        for i, o in enumerate(series)
    }
    ks = sorted(cost["k"].unique())
    colors = _colors([f"k={k}" for k in ks])

    def lines(ax, s: pd.DataFrame, column: str, spread: str) -> None:
        for k in ks:
            for o in series:
                a = s[(s["k"] == k) & (s["method"].map(others) == o)]
                if not a.empty:
                    ax.errorbar(
                        a["method"].map(x),
                        a[column],
                        yerr=a[spread],
                        marker=style[o][0],
                        ls=style[o][1],
                        capsize=3,
                        ms=4,
                        color=colors[f"k={k}"],
                    )

    n = len(wanted) + 1
    fig = Figure(figsize=(3.6 * n, 3.4))
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    for ax, metric in zip(axes, wanted):
        lines(ax, sweep_summary(d, metric).dropna(subset=["mean"]), "mean", "std")
        ax.set_ylabel(METRIC_NAMES.get(metric, metric) + ", macro avg.", fontsize=8)
        ax.set_title(f"{METRIC_NAMES.get(metric, metric)} (mean ± std over train seed × run)", fontsize=8)
    ax = axes[-1]
    lines(ax, cost, "adapt_s", "adapt_s_std")
    trained = any(p in ("aggregated", "cross-dataset") for p in cost["protocol"]) and (cost["train_s"] > 0).any()
    if trained:  # one fit serves every k: drawn once per setting, grey
        fit = cost.groupby("method", sort=False).agg(train_s=("train_s", "mean"), train_s_std=("train_s_std", "mean"))
        for o in series:
            a = fit[fit.index.map(others) == o]
            ax.errorbar(
                a.index.map(x),
                a["train_s"],
                yerr=a["train_s_std"],
                marker=style[o][0],
                ls=style[o][1],
                capsize=3,
                ms=4,
                color="grey",
            )
    ax.set_ylabel("seconds", fontsize=8)
    ax.set_title("adaptation" + (" and fit (grey)" if trained else "") + " seconds (mean ± std over cells)", fontsize=8)
    positive = pd.concat([cost["adapt_s"], cost["train_s"] if trained else cost["adapt_s"]])
    if (positive > 0).all() and positive.max() >= 20 * positive.min():
        ax.set_yscale("log")
    handles = [Line2D([], [], color=colors[f"k={k}"], marker="o", label=f"k={k}") for k in ks]
    if len(series) > 1:
        handles += [
            Line2D(
                [],
                [],
                color="black",
                marker=style[o][0],
                ls=style[o][1],
                label=f"{keys[0]}={o}" if len(keys) == 2 else o,
            )
            for o in series
        ]
    fit_handle = [Line2D([], [], color="grey", marker="o", label="fit (aggregated)")] if trained else []
    for ax in axes:
        if log:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(ticks, tick_labels, fontsize=7)
        ax.set_xlabel(keys[-1], fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        # the grey fit line is drawn in the seconds panel only
        ax.legend(handles=handles + (fit_handle if ax is axes[-1] else []), fontsize=6, loc="best")
    fig.suptitle(f"{dataset}: {base} swept over {', '.join(keys)}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def write_sweep_plots(
    out: str | Path, metrics: list[str] | tuple[str, ...] | None = None, df: pd.DataFrame | None = None
) -> list[Path]:
    """Every sweep of the results folder ``out`` drawn to ``<out>/plots/<dataset>_sweep_<method>.png``
    (``…_<options>`` when a method has sweeps over other options too); returns the paths (none
    without sweeps). ``df``: the records, when the caller has them (default: the current suite's)."""
    df = ResultStore(out).frame() if df is None else df
    found = sweeps(df)
    written = []
    for (ds, base, keys), d in found.items():
        path = Path(out) / "plots" / f"{_safe(ds)}_sweep_{_suffix(found, ds, base, keys)}.png"
        p = plot_sweep(d, ds, base, keys, path, metrics)
        if p is not None:
            written.append(p)
    return written


__all__ = ["plot_sweep", "write_sweep_plots"]
