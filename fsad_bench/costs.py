"""Cost tables: adaptation and inference time, training time, peak memory, and ratios.

Inference cost has two columns: ``infer_ms_per_image`` is the *cold* cost — what a user pays
for one new image: the first test batch predicted with every feature cache of the method
bypassed (record field ``infer_seconds_per_image``) — and ``infer_warm_ms_per_image`` the
*warm* one — the whole test pass as the benchmark runs it, reusing test features that earlier
cells of the same (method, category) cached (``infer_warm_seconds_per_image``; NaN for
records written before the split, whose single figure mixed both).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def method_order(df: pd.DataFrame, methods: list[str] | None) -> list[str]:
    """Labels ordered by the position of their method in ``methods`` (others last), then by name."""
    order = {m: i for i, m in enumerate(methods or [])}
    firsts = df.drop_duplicates("label").set_index("label")["method"]
    return sorted(firsts.index, key=lambda lab: (order.get(firsts[lab], len(order)), lab))


def _warm(df: pd.DataFrame) -> pd.DataFrame:
    if "infer_warm_seconds_per_image" not in df.columns:
        return df.assign(infer_warm_seconds_per_image=np.nan)
    return df


def cost_table(df: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """Per method and k: adaptation seconds (mean ± std over cells), training seconds,
    inference ms/image cold and warm (see the module docstring) and peak memory (MiB)."""
    df = _warm(df)
    g = df.groupby(["label", "k"])
    out = pd.DataFrame({
        "adapt_s": g["adapt_seconds"].mean(), "adapt_s_std": g["adapt_seconds"].std(ddof=1).fillna(0),
        "train_s": g["train_seconds"].mean(), "infer_ms_per_image": 1000 * g["infer_seconds_per_image"].mean(),
        "infer_warm_ms_per_image": 1000 * g["infer_warm_seconds_per_image"].mean(),
        "peak_memory_mib": g["peak_memory_mb"].max(), "cells": g.size(),
    }).reset_index()
    order = {lab: i for i, lab in enumerate(method_order(df, methods))}
    out[["k", "cells"]] = out[["k", "cells"]].astype(int)
    out = out.sort_values(["label", "k"], key=lambda c: c.map(order) if c.name == "label" else c)
    return out.rename(columns={"label": "method"}).set_index("method")


def cost_ratio_table(df: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """Per label over all cells: adaptation seconds (mean) and its ratio to the fastest label,
    cold inference ms/image (mean) and its ratio to the fastest, warm inference ms/image, training minutes (mean over cells
    of ``train_seconds``: an aggregated method's one fit per held-out category, an individual
    method's fit on the support set), peak memory (MiB, max) and the number of cells.
    Indexed by label (index name ``method``, like :func:`fsad_bench.report.cost_table`), with
    the registry name in column ``name``; sorted fastest adaptation first; ``methods``
    (registry names) only filters."""
    if methods is not None:
        df = df[df["method"].isin(methods)]
    df = _warm(df)
    g = df.groupby("label")
    out = pd.DataFrame({
        "name": g["method"].first(),
        "adapt_s": g["adapt_seconds"].mean(),
        "infer_ms_per_image": 1000 * g["infer_seconds_per_image"].mean(),
        "infer_warm_ms_per_image": 1000 * g["infer_warm_seconds_per_image"].mean(),
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
