"""One self-contained HTML report of a results folder: ``<out>/report.html``.

Built from what the other report modules return — never re-aggregated here:
:func:`fsad_bench.report.tables.write_tables` (paper-style tables with published columns, Δ to the
paper, completeness marks and every footnote in ``attrs["notes"]``; also rewrites ``tables/``),
:func:`fsad_bench.report.plots.write_plots` (figures; also rewrites ``plots/``),
:func:`fsad_bench.report.significance.compare_methods` (every label against one reference) and
the records' own provenance fields (``versions``, ``device``, ``hparams``, ``config_hash``,
``weights``, ``preset``) plus ``suite.json``.

The file needs nothing else to open: images are inline base64 PNG, the CSS is inline, no script,
no font and no link leaves the file (every ``href`` is an in-page anchor). It is written
atomically with the records' file mode.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import re
import shlex
import sys
from datetime import datetime, timezone
from html import escape as html_escape
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fsad_bench.errors import FsadError
from fsad_bench.records.store import ResultStore, atomic_write_text, with_train_seed
from fsad_bench.report.costs import cost_reference
from fsad_bench.report.published import MEAN_ROW, STD_ROW
from fsad_bench.report.tables import METRICS

REPORT_NAME = "report.html"
TEMPLATE = "report.html.j2"


# ---------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "–" if not np.isfinite(v) else f"{v:.4g}"
    return str(v)


def table_html(t: pd.DataFrame, table_id: str) -> str:
    """``t`` as an HTML table (text escaped, floats to 4 significant digits, ``Mean`` rows marked
    ``class="mean"``); Δ tables (``diff`` column) read ``Δ`` with one decimal like the paper tables."""
    t = t.copy()
    if "diff" in t.columns and {"measured", "paper"} <= set(t.columns):
        for c, spec in (("measured", ".1f"), ("paper", ".1f"), ("diff", "+.1f")):
            t[c] = t[c].map(lambda v, spec=spec: format(v, spec))
        t = t.rename(columns={"diff": "Δ (measured − paper)"})
    if t.index.name is not None:  # the index's name in the header's corner, not on a row of its own
        names = [None] * (t.columns.nlevels - 1) + [t.index.name]
        t.columns = t.columns.set_names(names if t.columns.nlevels > 1 else names[0])
        t.index.name = None
    text = t.to_html(
        escape=True, na_rep="–", border=0, classes="tab", table_id=table_id, float_format=lambda v: _fmt(v)
    )
    rows = r"(?:" + re.escape(MEAN_ROW) + r"[^<]*|" + re.escape(html_escape(STD_ROW)) + r")"
    return re.sub(r"<tr>(\s*<th>" + rows + r"</th>)", r'<tr class="mean">\1', text)


def _table_title(name: str, dataset: str | None) -> str:
    rest = name[len(dataset) + 1 :] if dataset else name
    metric = max((m for m in METRICS if rest == m or rest.startswith(m + "_")), key=len, default=None)
    if metric is None:
        return {"cost": "Cost per method and k", "cost_ratio": "Cost per method, relative to the reference"}.get(
            name, name
        )
    suffix = rest[len(metric) :]
    what = {
        "": "per category",
        "_std_components": "std and its components (support draws, training seeds)",
        "_vs_paper": "measured − published (Δ)",
    }.get(suffix, suffix.lstrip("_").replace("_", " "))
    return f"{METRICS[metric]} — {what}"


def _dataset_of(name: str, datasets: list[str]) -> str | None:
    hits = [d for d in datasets if name.startswith(d + "_")]
    return max(hits, key=len) if hits else None


# ---------------------------------------------------------------------------------------
# significance
# ---------------------------------------------------------------------------------------


def significance_rows(df: pd.DataFrame, reference: str, metric: str = "image_auroc") -> tuple[pd.DataFrame, list[str]]:
    """Every label against ``reference`` per dataset and k
    (:func:`fsad_bench.report.significance.compare_methods`), one table; plus a line per label
    that shares no cell with it."""
    from fsad_bench.report.significance import compare_methods

    rows, skipped = [], []
    for ds in sorted(df["dataset"].unique()):
        d = df[df["dataset"] == ds]
        if reference not in set(d["label"]):
            continue
        for lab in dict.fromkeys(d["label"]):
            if lab == reference:
                continue
            try:
                rows.append(compare_methods(d, lab, reference, metric))
            except FsadError as err:
                skipped.append(f"{ds}: {lab}: {err}")
    if not rows:
        return pd.DataFrame(), skipped
    t = pd.concat(rows, ignore_index=True)
    t["95% CI"] = [f"[{lo:+.2f}, {hi:+.2f}]" if np.isfinite(lo) else "–" for lo, hi in zip(t["ci_low"], t["ci_high"])]
    t["W/T/L"] = [f"{w}/{ti}/{lo}" for w, ti, lo in zip(t["wins"], t["ties"], t["losses"])]
    shown = t[["dataset", "a", "k", "n_pairs", "mean_a", "mean_b", "mean_diff", "95% CI", "W/T/L", "p_value"]]
    shown = shown.rename(
        columns={
            "a": "method",
            "mean_a": "mean (method)",
            "mean_b": "mean (reference)",
            "mean_diff": "mean Δ (points)",
            "n_pairs": "pairs",
            "p_value": "Wilcoxon p",
        }
    )
    return shown.set_index(["dataset", "method", "k"]), skipped


# ---------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------


def equivalent_command(suite: dict[str, Any], out: Path) -> str:
    """A ``fsad-bench run`` command line that runs the suite of ``suite.json`` again into ``out``
    (its ``[options.<method>]`` and folder-layout tables, which have no flag, come from the suite file)."""
    args = ["fsad-bench", "run", "--suite", str(suite.get("name", "?"))]

    def add(flag: str, value: Any) -> None:
        if value is None or value == [] or value == "":
            return
        if isinstance(value, list):
            value = ",".join(map(str, value))
        args.extend([flag, str(value)])

    add("--methods", suite.get("methods"))
    add("--k", suite.get("k"))
    add("--runs", suite.get("runs"))
    if not isinstance(suite.get("train_seeds"), dict):
        add("--train-seeds", suite.get("train_seeds"))
    add("--categories", suite.get("categories"))
    roots = suite.get("data_root")
    for r in roots if isinstance(roots, list) else [roots]:
        add("--data-root", r)
    add("--train-data-root", suite.get("train_data_root"))
    for key in ("weights", "arch", "preset", "image_size", "seed", "support_lists"):
        add("--" + key.replace("_", "-"), suite.get(key))
    args += ["--out", str(out)]
    return shlex.join(args)


def _machine() -> dict[str, str]:
    """CPU model, cores and GPUs of the machine building the report (the records name only the device)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):  # no torch import (seconds)
        try:
            gpus += [
                line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("Model:")
            ]
        except OSError:
            pass
    if not gpus and "torch" in sys.modules:  # another platform, torch already loaded
        torch = sys.modules["torch"]
        try:
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001 - a broken CUDA setup only loses this line
            gpus = ["unknown"]
    gpu = ", ".join(gpus) or "none visible"
    return {
        "host CPU": f"{cpu} ({os.cpu_count()} logical cores)",
        "host GPU": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _weights_files(suite: dict[str, Any]) -> list[tuple[str, str]]:
    """(file, sha256 prefix) of what the suite's ``weights`` setting loads, as found on this machine."""
    from fsad_bench.identity import weights_fingerprint

    weights = suite.get("weights")
    if not isinstance(weights, str):
        return []
    try:
        fp = weights_fingerprint(weights)
    except OSError:
        return [(weights, "unreadable")]
    if fp == "none":
        return []
    if fp.startswith("file:"):
        return [(str(Path(weights).expanduser().resolve()), fp[5:21])]
    kind, _, listing = fp.partition(":")
    if kind in ("auto", "imagenet"):
        import torch

        folder = Path(torch.hub.get_dir()) / "checkpoints"
        return [(str(folder / item.split("=", 1)[0]), item.split("=", 1)[1]) for item in listing.split(",") if item]
    return [(weights, "not found")]


def _distinct(values: list[Any]) -> str:
    seen: dict[str, int] = {}
    for v in values:
        text = (
            "not recorded"
            if v is None or (isinstance(v, float) and np.isnan(v))
            else (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v))
        )
        seen[text] = seen.get(text, 0) + 1
    return "; ".join(t if len(seen) == 1 else f"{t} ({n} cells)" for t, n in seen.items())


def _hparams(values: list[Any]) -> str:
    """The distinct hyper-parameter sets of a label's records, pretty-printed JSON (with cell counts if several)."""
    seen: dict[str, int] = {}
    for v in values:
        key = json.dumps(v if isinstance(v, dict) else None, indent=1, sort_keys=True, default=str)
        seen[key] = seen.get(key, 0) + 1
    if len(seen) == 1:
        return next(iter(seen))
    return "\n".join(f"{n} cells:\n{text}" for text, n in seen.items())


def provenance(
    store: ResultStore, df: pd.DataFrame, suite: dict[str, Any], command: str | None, methods: list[str] | None
) -> dict[str, Any]:
    """What ran where: the run command (as recorded, else the equivalent one), the report command,
    per label (method, protocol, preset, weights tag, devices, config hashes, cells, hyper-parameters),
    the package versions of the records, the weights files and the machine building the report."""
    from fsad_bench.report.costs import method_order

    out = store.root
    per_label = []
    for lab in method_order(df, methods):
        g = df[df["label"] == lab]
        hashes = sorted(set(g["config_hash"].astype(str))) if "config_hash" in g.columns else []
        per_label.append(
            {
                "label": lab,
                "method": g["method"].iloc[0],
                "protocol": _distinct(list(g["protocol"])) if "protocol" in g.columns else "not recorded",
                "preset": _distinct(list(g["preset"])) if "preset" in g.columns else "not recorded",
                "weights": _distinct(list(g["weights"])) if "weights" in g.columns else "not recorded",
                "device": _distinct(list(g["device"])) if "device" in g.columns else "not recorded",
                "config_hashes": ", ".join(hashes[:6]) + (f", … ({len(hashes)} in all)" if len(hashes) > 6 else ""),
                "cells": len(g),
                "hparams": _hparams(list(g["hparams"])) if "hparams" in g.columns else "not recorded",
            }
        )
    versions = []
    if "versions" in df.columns:
        counts: dict[str, int] = {}
        for v in df["versions"]:
            key = json.dumps(v if isinstance(v, dict) else None, sort_keys=True)
            counts[key] = counts.get(key, 0) + 1
        for key, n in counts.items():
            v = json.loads(key)
            versions.append(
                {"versions": ", ".join(f"{k} {x}" for k, x in sorted(v.items())) if v else "not recorded", "cells": n}
            )
    finished = sorted(str(x) for x in df["finished_at"].dropna()) if "finished_at" in df.columns else []
    settings = {k: v for k, v in suite.items() if k not in ("cell_ids", "kept_ids")}
    from fsad_bench import __version__

    return {
        "run_command": suite.get("command") or equivalent_command(suite, out) if suite else "no suite.json",
        "run_command_recorded": bool(suite.get("command")),
        "report_command": command or shlex.join(["fsad-bench", "report", str(out)]),
        "results_dir": str(out.resolve()),
        "finished": f"{finished[0]} … {finished[-1]}" if finished else "not recorded",
        "per_label": per_label,
        "versions": versions,
        "weights_setting": str(suite.get("weights", "not recorded")),
        "weights_files": _weights_files(suite),
        "machine": _machine(),
        "fsad_bench": __version__,
        "suite_json": json.dumps(settings, indent=1, sort_keys=True, default=str),
    }


# ---------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------

#: Figures larger than this (bytes; anomaly-map grids of noisy maps) are embedded as 256-colour PNG.
QUANTIZE_ABOVE = 200_000


def png_bytes(path: Path) -> bytes:
    """The PNG embedded for ``path``: the file itself, or, above :data:`QUANTIZE_ABOVE` bytes, the same
    image reduced to 256 colours (about 4x smaller; ``plots/`` keeps the full file)."""
    data = Path(path).read_bytes()
    if len(data) <= QUANTIZE_ABOVE:
        return data
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        q = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    q.save(buf, format="PNG", optimize=True)
    return buf.getvalue() if buf.tell() < len(data) else data


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(path)).decode("ascii")


def _table_entry(name: str, table: pd.DataFrame, dataset: str | None, collapsed: bool) -> dict:
    """The template's entry of table ``name`` (its title names ``dataset``; None: every dataset)."""
    from markupsafe import Markup

    return {
        "id": f"table-{name}",
        "name": name,
        "title": _table_title(name, dataset),
        "html": Markup(table_html(table, f"table-{name}")),
        "notes": table.attrs.get("notes", []),
        "collapsed": collapsed,
    }


def _figure(path: Path, caption: str) -> dict[str, Any]:
    from PIL import Image

    with Image.open(path) as im:
        wide = im.width > 1.8 * im.height  # e.g. ROC panels in a row: the page's full width
    return {"src": _png_data_uri(path), "alt": caption, "caption": caption, "file": f"plots/{path.name}", "wide": wide}


def build_report(
    out: str | Path, methods: list[str] | None = None, reference_method: str | None = None, command: str | None = None
) -> Path:
    """Write ``<out>/report.html`` (and, on the way, ``tables/`` and ``plots/``); returns its path.

    ``reference_method``: the label (or method name) every other label is tested against, and whose
    significance markers the tables' ``Mean`` rows carry; default the cost reference
    (:func:`fsad_bench.report.costs.cost_reference`: ``gaussian`` when present). ``command``: the
    command line that built the report (shown under provenance)."""
    import jinja2
    from markupsafe import Markup

    from fsad_bench.report.plots import METRIC_NAMES, _safe, write_plots
    from fsad_bench.report.significance import resolve_label, significance_note
    from fsad_bench.report.tables import write_tables

    out = Path(out)
    if not out.is_dir():
        raise FsadError(f"results folder {out} does not exist")
    store = ResultStore(out)
    df = with_train_seed(store.frame())
    if df.empty:
        raise FsadError(f"results folder {out} holds no record of its suite (run `fsad-bench run` first)")
    suite = store.load_suite() or {}
    if methods is None:
        methods = suite.get("methods")
    reference = None
    if df["label"].nunique() > 1:
        reference = resolve_label(df, reference_method) if reference_method else cost_reference(df, methods)
    tables = write_tables(out, methods, reference_method=reference)
    figures = write_plots(out, methods)
    by_name = {p.name: p for p in figures}
    datasets = sorted(df["dataset"].unique())

    sections = []
    for ds in datasets:
        sub = df[df["dataset"] == ds]
        ts = [
            _table_entry(name, t, ds, collapsed=name.endswith("_std_components"))  # a detail: folded, accuracy first
            for name, t in tables.items()
            if _dataset_of(name, datasets) == ds
        ]
        ts.sort(key=lambda t: t["collapsed"])
        figs = []
        for metric in METRIC_NAMES:
            for suffix, what in (("vs_k", "against k"), ("categories", "per category")):
                p = by_name.get(f"{_safe(ds)}_{metric}_{suffix}.png")
                if p is not None:
                    figs.append(_figure(p, f"{METRIC_NAMES[metric]} {what}"))
        for name, caption in (
            (f"{_safe(ds)}_image_auroc_vs_adapt_cost.png", "Image AUROC vs adaptation cost"),
            (f"{_safe(ds)}_roc.png", "Image-level ROC curves"),
        ):
            if name in by_name:
                figs.append(_figure(by_name[name], caption))
        maps = [
            _figure(by_name[f"{_safe(ds)}_{_safe(c)}_maps.png"], f"{c}: example anomaly maps")
            for c in sorted(sub["category"].unique())
            if f"{_safe(ds)}_{_safe(c)}_maps.png" in by_name
        ]
        sections.append(
            {
                "dataset": ds,
                "id": f"ds-{_safe(ds)}",
                "tables": ts,
                "figures": figs,
                "maps": maps,
                "n_cells": len(sub),
                "categories": sorted(sub["category"].unique()),
                "labels": list(dict.fromkeys(sub["label"])),
            }
        )
    shown = {t["name"] for s in sections for t in s["tables"]}
    cost = [_table_entry(name, t, None, collapsed=False) for name, t in tables.items() if name not in shown]
    placed = {f["file"].split("/", 1)[1] for s in sections for f in s["figures"] + s["maps"]}
    other_figures = [_figure(p, p.stem) for p in figures if p.name not in placed]

    significance = None
    if reference is not None:
        sig, skipped = significance_rows(df, reference)
        significance = {
            "reference": reference,
            "note": significance_note(reference),
            "skipped": skipped,
            "html": Markup(table_html(sig, "table-significance")) if not sig.empty else None,
        }

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = env.from_string(resources.files("fsad_bench.report").joinpath(TEMPLATE).read_text(encoding="utf-8"))
    notes = [n for n in (store.invalid_note(), store.foreign_note()) if n]
    page = template.render(
        title=f"fsad-bench report — {suite.get('name') or out.name}",
        suite=suite,
        out=str(out),
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=notes,
        sections=sections,
        cost=cost,
        other_figures=other_figures,
        significance=significance,
        prov=provenance(store, df, suite, command, methods),
        n_cells=len(df),
        spread=_spread(df),
    )
    path = out / REPORT_NAME
    atomic_write_text(path, page)
    return path


def _spread(df: pd.DataFrame) -> str:
    from fsad_bench.report.plots import spread_words

    words = spread_words(df)
    return f"± is the sample std over {words}" if words else "one support draw per cell: no ±"


__all__ = ["REPORT_NAME", "build_report", "equivalent_command", "provenance", "significance_rows", "table_html"]
