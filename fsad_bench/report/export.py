"""Export a results folder: one row per cell, as a plain CSV or in anomalib's benchmark form.

* ``csv`` — every scalar field of the records (metrics in [0, 1], seconds, memory, config);
  nested ``hparams`` / ``versions`` flattened to ``hparams.<name>`` / ``versions.<lib>``,
  the support image names joined with ``;``; per-image scores and labels left out.
* ``anomalib`` — the columns of anomalib's benchmark pipeline (``anomalib benchmark``,
  ``anomalib.pipelines.benchmark.job.BenchmarkJob``: metric names are ``<prefix><MetricClass>``,
  durations in seconds, the config flattened with dots), so the rows can be concatenated with
  an anomalib ``results.csv``: ``model``, ``category``, ``accelerator``, ``job_duration``,
  ``fit_duration`` (training + adaptation s), ``test_duration`` (inference s over the test
  set), ``image_AUROC``, ``image_AUPR``, ``image_F1Max``, ``pixel_AUROC``, ``pixel_AUPR``,
  ``pixel_F1Max``, ``pixel_AUPRO``, then config columns ``seed``, ``model.class_path``,
  ``data.class_path``, ``data.init_args.category``, ``k_shot``, ``run``, ``preset``,
  ``weights``, ``image_size``, ``config_hash``, ``cell_id``.

Both formats end with a ``complete`` column: the row's (method, k) has a record for every cell ``suite.json``
planned (categories, runs, training seeds); False marks the rows of an interrupted run's partial aggregates
(:mod:`fsad_bench.report.completeness`) and rows of no current cell (``--all``).

Only the valid records of the suite as last run are written (a folder also keeps records of earlier
runs and of other configurations, which would share labels); ``everything`` / ``--all`` writes every
valid record with a ``current`` column saying which is which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fsad_bench.errors import FsadError
from fsad_bench.records.store import ResultStore, atomic_write_text
from fsad_bench.report.completeness import completeness

FORMATS = ("csv", "anomalib")
#: fsad-bench metric -> anomalib benchmark column.
ANOMALIB_METRICS = {
    "image_auroc": "image_AUROC",
    "image_aupr": "image_AUPR",
    "image_f1max": "image_F1Max",
    "pixel_auroc": "pixel_AUROC",
    "pixel_aupr": "pixel_AUPR",
    "pixel_f1max": "pixel_F1Max",
    "aupro": "pixel_AUPRO",
}
_DROP = ("scores", "labels")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = ";".join(map(str, value))
    else:
        out[prefix] = value


def flat_rows(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per record, nested fields flattened (see the module docstring)."""
    rows = []
    for r in records:
        row: dict[str, Any] = {}
        for k, v in r.items():
            if k not in _DROP:
                _flatten(k, v, row)
        rows.append(row)
    df = pd.DataFrame(rows)
    keys = [c for c in ("dataset", "method", "category", "k", "run") if c in df.columns]
    return df.sort_values(keys, kind="stable").reset_index(drop=True) if keys and len(df) else df


def anomalib_rows(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Records in anomalib's benchmark column names (see the module docstring)."""
    rows = []
    for r in records:
        fit = float(r.get("train_seconds") or 0.0) + float(r.get("adapt_seconds") or 0.0)
        test = float(r.get("infer_seconds_per_image") or 0.0) * int(r.get("n_test") or 0)
        row: dict[str, Any] = {
            "model": r.get("label", r["method"]),
            "category": r["category"],
            "accelerator": r.get("device", ""),
            "job_duration": fit + test,
            "fit_duration": fit,
            "test_duration": test,
        }
        row.update({col: r.get(m, float("nan")) for m, col in ANOMALIB_METRICS.items()})
        row.update(
            {
                "seed": r.get("seed"),
                "model.class_path": r["method"],
                "data.class_path": r.get("dataset"),
                "data.init_args.category": r["category"],
                "k_shot": r.get("k"),
                "run": r.get("run"),
                "preset": r.get("preset"),
                "weights": r.get("weights"),
                "image_size": r.get("image_size"),
                "config_hash": r.get("config_hash"),
                "cell_id": r.get("cell_id"),
            }
        )
        for key in ("current", "complete"):
            if key in r:
                row[key] = r[key]
        rows.append(row)
    df = pd.DataFrame(rows)
    return (
        df.sort_values(["model", "category", "k_shot", "run"], kind="stable").reset_index(drop=True) if len(df) else df
    )


def export(results_dir: str | Path, out: str | Path, fmt: str = "csv", everything: bool = False) -> pd.DataFrame:
    """Write the valid records of the suite as last run in ``results_dir`` (the ids of its
    ``suite.json``) to the CSV file ``out`` in format ``fmt``; returns the frame. ``everything``: every
    valid record, with a ``current`` column (True: a cell of the suite as last run; False: kept from
    an earlier run or of another configuration). Invalid cell files are never exported."""
    if fmt not in FORMATS:
        raise FsadError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    results_dir = Path(results_dir)
    if not (results_dir / "cells").is_dir():
        raise FsadError(f"{results_dir} is not a results folder (no cells/ inside)")
    store = ResultStore(results_dir)
    if everything:
        ids = store.current_ids()
        records = [dict(r, current=ids is None or r["cell_id"] in ids) for r in store.records()]
    else:
        records = store.current_records()
    if not records:
        raise FsadError(f"{results_dir} holds no finished cells")
    comp = completeness(store)
    current = store.current_ids()
    records = [
        dict(r, complete=(current is None or r["cell_id"] in current) and comp.complete(r["method"], r["k"]))
        for r in records
    ]
    df = flat_rows(records) if fmt == "csv" else anomalib_rows(records)
    atomic_write_text(Path(out), df.to_csv(index=False))
    return df
