"""What is known about the training budget of each trained method's ``cpu`` preset: measured on real
data by budget sweeps (``docs/budgets.md``), never part of a configuration.

Tables carry it in the label (:func:`budget_tag`, applied when records are read for a report:
:meth:`fsad_bench.records.store.ResultStore.current_records`): a ``calibrated`` preset needs no tag (its
image AUROC lies within 1 point, and inside the ±, of the largest budget measured, on both datasets); a
``capped`` one (the converged budget would cost more than 120 s of adaptation a cell on 2 cores) shows
``capped −x`` with its measured shortfall x (image AUROC points); an ``uncalibrated`` one says so. A
configuration whose budget knobs differ from the calibrated values (another preset, a suite's
``[options]``, a sweep variant) gets no tag: its label names the budget it ran.

This module changes no number (``fsad_bench.identity.NOT_NUMBERS``): updating what is known about a
budget relabels tables without invalidating a record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fsad_bench.registry import base_name


@dataclass(frozen=True)
class Budget:
    """The measured status of the ``cpu`` preset's training budget of one method.

    ``knobs``: the options that set it, with the preset's values (a test keeps them equal to the
    adapter's ``cpu`` preset); ``shortfall``: image AUROC points (%) below the largest budget measured,
    the worse of the datasets (``capped`` only); ``measured``: one line naming the sweep and where its
    numbers are."""

    status: Literal["calibrated", "capped", "uncalibrated"]
    knobs: dict[str, Any] = field(default_factory=dict)
    shortfall: float | None = None
    measured: str = ""

    def __post_init__(self):
        if self.status not in ("calibrated", "capped", "uncalibrated"):
            raise ValueError(f"unknown budget status {self.status!r}")
        if (self.status == "capped") != (self.shortfall is not None):
            raise ValueError("a capped budget states its shortfall, and only a capped one")

    @property
    def tag(self) -> str | None:
        """The label tag: None (calibrated), ``capped −3.1``, ``uncalibrated``."""
        if self.status == "capped":
            return f"capped \N{MINUS SIGN}{self.shortfall:.1f}"
        return None if self.status == "calibrated" else "uncalibrated"


_RUN = "calibrate_cpu_run, 2026-12-02: bottle + magnetic tile, k 2/8, 5 draws, MobileNetV2 (docs/budgets.md)"

#: method -> what the budget sweeps measured of its ``cpu`` preset (docs/budgets.md); only the knobs that
#: set the training length were swept: resolution, widths and pre-training lengths stay the preset's
CPU_BUDGETS: dict[str, Budget] = {
    "regad": Budget("calibrated", {"epochs": 10}, measured=f"epochs 3/10/25, 3 seeds at 10; {_RUN}"),
    "regad-l": Budget(
        "calibrated", {"epochs": 4}, measured=f"epochs 4/12/50 (longer training lowers AUROC), 3 seeds at 4; {_RUN}"
    ),
    "diffnet": Budget("calibrated", {"meta_epochs": 24}, measured=f"meta_epochs 4/16/24 (the paper's), 1 seed; {_RUN}"),
    "diffnet+": Budget(
        "calibrated", {"finetune_epochs": 48}, measured=f"finetune_epochs 16/48/96/192, 3 seeds at 48; {_RUN}"
    ),
    "tdg": Budget("calibrated", {"niter": 1000}, measured=f"niter 40/200/600/1000 (the paper's), 1 seed; {_RUN}"),
    "tdg+": Budget(
        "calibrated", {"adapt_niter": 1000}, measured=f"adapt_niter 20/100/300/1000 (the paper's), 1 seed; {_RUN}"
    ),
}


def budget_tag(method: str, preset: str | None, hparams: dict[str, Any]) -> str | None:
    """The tag of a configuration run with ``preset`` and resolved ``hparams``: its ``cpu`` budget's tag
    while every budget knob has the calibrated value, else None. A variant ``base@option=value`` is
    looked up by its base (its knob values decide)."""
    budget = CPU_BUDGETS.get(base_name(method)) if preset == "cpu" else None
    if budget is None or any(hparams.get(k) != v for k, v in budget.knobs.items()):
        return None
    return budget.tag


def with_budget_tag(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its budget tag after the preset in ``label`` (``diffnet+ [cpu, capped −3.1, ...]``);
    the record itself when it has none (or its label does not start with ``<method> [cpu``)."""
    method = str(record.get("method", ""))
    tag = budget_tag(method, record.get("preset"), record.get("hparams") or {})
    label = str(record.get("label", ""))
    head = f"{base_name(method)} [cpu"
    if tag is None or not label.startswith(head) or tag in label:
        return record
    return {**record, "label": head + ", " + tag + label[len(head) :]}
