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
    out = pd.DataFrame(
        {
            "adapt_s": g["adapt_seconds"].mean(),
            "adapt_s_std": g["adapt_seconds"].std(ddof=1).fillna(0),
            "train_s": g["train_seconds"].mean(),
            "infer_ms_per_image": 1000 * g["infer_seconds_per_image"].mean(),
            "infer_warm_ms_per_image": 1000 * g["infer_warm_seconds_per_image"].mean(),
            "peak_memory_mib": g["peak_memory_mb"].max(),
            "cells": g.size(),
        }
    ).reset_index()
    order = {lab: i for i, lab in enumerate(method_order(df, methods))}
    out[["k", "cells"]] = out[["k", "cells"]].astype(int)
    out = out.sort_values(["label", "k"], key=lambda c: c.map(order) if c.name == "label" else c)
    return out.rename(columns={"label": "method"}).set_index("method")


#: Adaptation time of the RegAD paper's Table 4 (seconds per category on an RTX 3090 GPU, k not stated).
PAPER_ADAPT_SECONDS = {"regad": 4.47, "diffnet+": 357.75, "tdg+": 1559.76}
#: The label costs are compared against when present (the training-free Gaussian: what a reader
#: pays for a few-shot model without any training); otherwise the first label that is not ``random``.
REFERENCE_METHOD = "gaussian"


def cost_reference(df: pd.DataFrame, methods: list[str] | None = None, reference: str | None = None) -> str | None:
    """The label the cost ratios divide by: ``reference`` (label or method name), else the label of
    :data:`REFERENCE_METHOD`, else the first label (in ``methods`` order) whose method is not ``random``."""
    labels = method_order(df, methods)
    first = df.drop_duplicates("label").set_index("label")["method"]
    for who in (reference, REFERENCE_METHOD):
        if who is None:
            continue
        if who in labels:
            return who
        hits = [lab for lab in labels if first[lab] == who]
        if hits:
            return hits[0]
    rest = [lab for lab in labels if first[lab] != "random"]
    return rest[0] if rest else None


def cost_ratio_table(df: pd.DataFrame, methods: list[str] | None = None, reference: str | None = None) -> pd.DataFrame:
    """Per label over all cells: adaptation seconds (mean) and its ratio to the reference label
    (:func:`cost_reference`: ``gaussian`` by default, the training-free baseline), cold inference
    ms/image (mean) and its ratio to the reference, warm inference ms/image, training minutes (mean over cells of
    ``train_seconds``: an aggregated method's one fit per held-out category, an individual
    method's fit on the support set), peak memory (MiB, max), the number of cells, and the
    RegAD paper's GPU adaptation seconds where it reports one (``paper_adapt_s``, Table 4;
    their ratios to RegAD's 4.47 s are what the paper compares).
    Indexed by label (index name ``method``, like :func:`cost_table`), with the registry name in
    column ``name`` and the reference label in ``df.attrs["reference"]``; sorted fastest
    adaptation first; ``methods`` (registry names) only filters."""
    if methods is not None:
        df = df[df["method"].isin(methods)]
    df = _warm(df)
    ref = cost_reference(df, methods, reference)
    g = df.groupby("label")
    out = pd.DataFrame(
        {
            "name": g["method"].first(),
            "adapt_s": g["adapt_seconds"].mean(),
            "infer_ms_per_image": 1000 * g["infer_seconds_per_image"].mean(),
            "infer_warm_ms_per_image": 1000 * g["infer_warm_seconds_per_image"].mean(),
            "train_min": g["train_seconds"].mean() / 60,
            "peak_memory_mib": g["peak_memory_mb"].max(),
            "cells": g.size(),
        }
    )
    ref_adapt = out.loc[ref, "adapt_s"] if ref is not None else np.nan
    ref_infer = out.loc[ref, "infer_ms_per_image"] if ref is not None else np.nan
    tag = (ref or "reference").split(" [")[0]
    out.insert(2, f"adapt_x_{tag}", out["adapt_s"] / ref_adapt if ref_adapt > 0 else np.nan)
    out.insert(4, f"infer_x_{tag}", out["infer_ms_per_image"] / ref_infer if ref_infer > 0 else np.nan)
    out["paper_adapt_s"] = out["name"].map(PAPER_ADAPT_SECONDS)
    out["cells"] = out["cells"].astype(int)
    out.index.name = "method"
    out = out.sort_values(["adapt_s", "infer_ms_per_image"])
    out.attrs["reference"] = ref
    return out
