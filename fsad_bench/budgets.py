"""What is known about the training budget of each trained method's ``cpu`` preset: measured on real
data by budget sweeps (``docs/budgets.md``), never part of a configuration.

A label carries the result (:func:`budget_tag`): a ``calibrated`` preset needs no tag (its image AUROC
lies within 1 point, and inside the ±, of the largest budget measured, on both datasets); a ``capped``
one (the converged budget would cost more than 120 s of adaptation a cell on 2 cores) shows
``capped −x`` with its measured shortfall x (image AUROC points); an ``uncalibrated`` one says so. A
suite that overrides one of the preset's budget knobs gets no tag: its override tags say the budget.

This module changes no number (``fsad_bench.identity.NOT_NUMBERS``): updating what is known about a
budget relabels tables without invalidating a record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Budget:
    """The measured status of one preset's training budget.

    ``knobs``: the options that set it (epochs, iterations, ...); ``shortfall``: image AUROC points
    (%) below the largest measured budget, the worse of the two datasets (``capped`` only);
    ``measured``: one line naming the sweep and where its numbers are."""

    status: Literal["calibrated", "capped", "uncalibrated"]
    knobs: tuple[str, ...]
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


#: method -> what the budget sweeps measured of its ``cpu`` preset (docs/budgets.md)
CPU_BUDGETS: dict[str, Budget] = {}


def budget_of(method: str, preset: str) -> Budget | None:
    """The measured budget of ``method``'s ``preset`` (only ``cpu`` presets are calibrated; the
    ``paper`` preset is the paper's budget); a variant ``base@option=value`` is looked up by its base."""
    return CPU_BUDGETS.get(method.partition("@")[0]) if preset == "cpu" else None


def budget_tag(method: str, preset: str, hparams: dict[str, Any], preset_values: dict[str, Any]) -> str | None:
    """The label tag of a configuration: the preset's budget tag while every budget knob keeps the
    preset's value, else None (the override tags name the budget run instead)."""
    budget = budget_of(method, preset)
    if budget is None or any(hparams.get(k) != preset_values.get(k) for k in budget.knobs):
        return None
    return budget.tag
