"""The measured budgets of the ``cpu`` presets (fsad_bench.budgets): every trained built-in method has one,
its knobs are options of the preset, and labels carry it exactly while the preset's budget is run."""

from __future__ import annotations

import pytest

from fsad_bench import registry
from fsad_bench.adapter import AdapterConfig
from fsad_bench.budgets import CPU_BUDGETS, Budget, budget_of, budget_tag

TRAINED = [m for m, info in registry.INFO.items() if info.protocol in ("individual", "aggregated")]


def test_every_trained_builtin_declares_its_cpu_budget():
    assert set(TRAINED) == {"regad", "regad-l", "diffnet", "diffnet+", "tdg", "tdg+"}
    assert set(CPU_BUDGETS) == set(TRAINED)
    for m in TRAINED:
        cpu = registry.get(m).presets["cpu"]
        b = CPU_BUDGETS[m]
        assert b.knobs and all(k in cpu for k in b.knobs), (m, b.knobs)
        assert b.measured, f"{m}: say what was measured"


def test_tags():
    assert Budget("calibrated", ("niter",)).tag is None
    assert Budget("capped", ("niter",), shortfall=3.14).tag == "capped \N{MINUS SIGN}3.1"
    assert Budget("uncalibrated", ("niter",)).tag == "uncalibrated"
    with pytest.raises(ValueError):
        Budget("capped", ("niter",))
    with pytest.raises(ValueError):
        Budget("calibrated", ("niter",), shortfall=1.0)
    preset = {"niter": 40, "lr": 1.0}
    budget = Budget("uncalibrated", ("niter",))
    CPU_BUDGETS["_probe"] = budget
    try:
        assert budget_tag("_probe", "cpu", dict(preset), preset) == "uncalibrated"
        assert budget_tag("_probe@lr=2.0", "cpu", {**preset, "lr": 2.0}, preset) == "uncalibrated"  # not a knob
        assert budget_tag("_probe@niter=200", "cpu", {**preset, "niter": 200}, preset) is None  # the knob moved
        assert budget_tag("_probe", "paper", dict(preset), preset) is None  # the paper's budget
        assert budget_of("_probe@niter=200", "cpu") is budget
    finally:
        del CPU_BUDGETS["_probe"]


@pytest.mark.parametrize("method", TRAINED)
def test_labels_carry_the_budget_tag(method):
    cls = registry.get(method)
    tag = CPU_BUDGETS[method].tag
    label = cls(AdapterConfig(weights="none", preset="cpu")).label
    assert label.startswith(f"{method} [cpu") and ((tag is None) or f"cpu, {tag}" in label), label
    knob = CPU_BUDGETS[method].knobs[0]
    value = cls.presets["cpu"][knob]
    other = cls(AdapterConfig(weights="none", preset="cpu", options={knob: value + 1})).label
    assert (tag is None or tag not in other) and f"{knob}={value + 1}" in other, other
    assert "capped" not in cls(AdapterConfig(weights="none", preset="paper")).label
