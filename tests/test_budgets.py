"""The measured budgets of the ``cpu`` presets (fsad_bench.budgets): every trained built-in method has one,
its knob values are the preset's, and report labels carry it exactly while that budget is what ran."""

from __future__ import annotations

from typing import ClassVar

import pytest

from fsad_bench import registry
from fsad_bench.adapter import Adapter, Interval
from fsad_bench.budgets import CPU_BUDGETS, Budget, budget_tag, with_budget_tag
from fsad_bench.records.store import ResultStore

TRAINED = [m for m, info in registry.INFO.items() if info.protocol in ("individual", "aggregated")]


def test_every_trained_builtin_declares_its_cpu_budget():
    assert set(TRAINED) == {"regad", "regad-l", "diffnet", "diffnet+", "tdg", "tdg+"}
    assert set(CPU_BUDGETS) == set(TRAINED)
    for m in TRAINED:
        cpu = registry.get(m).presets["cpu"]
        b = CPU_BUDGETS[m]
        assert b.knobs and b.knobs == {k: cpu[k] for k in b.knobs}, (m, b.knobs)  # the preset's values
        assert b.measured, f"{m}: say what was measured"


def test_tags():
    assert Budget("calibrated", {"niter": 40}).tag is None
    assert Budget("capped", {"niter": 40}, shortfall=3.14).tag == "capped \N{MINUS SIGN}3.1"
    assert Budget("uncalibrated", {"niter": 40}).tag == "uncalibrated"
    with pytest.raises(ValueError):
        Budget("capped", {"niter": 40})
    with pytest.raises(ValueError):
        Budget("calibrated", {"niter": 40}, shortfall=1.0)


@pytest.fixture
def probe():
    CPU_BUDGETS["_probe"] = Budget("capped", {"niter": 40}, shortfall=2.5, measured="test")
    yield
    del CPU_BUDGETS["_probe"]


def test_budget_tag_follows_the_knobs(probe):
    assert budget_tag("_probe", "cpu", {"niter": 40, "lr": 1.0}) == "capped \N{MINUS SIGN}2.5"
    assert budget_tag("_probe@lr=2.0", "cpu", {"niter": 40, "lr": 2.0}) == "capped \N{MINUS SIGN}2.5"  # not a knob
    assert budget_tag("_probe@niter=200", "cpu", {"niter": 200}) is None  # the knob moved: the label says so
    assert budget_tag("_probe", "paper", {"niter": 40}) is None  # the paper's budget
    assert budget_tag("other", "cpu", {"niter": 40}) is None


def test_report_labels_carry_the_tag_records_keep_theirs(probe, tmp_path):
    rec = {"method": "_probe", "preset": "cpu", "hparams": {"niter": 40}, "label": "_probe [cpu, resnet18]"}
    assert with_budget_tag(rec)["label"] == "_probe [cpu, capped \N{MINUS SIGN}2.5, resnet18]"
    assert with_budget_tag(with_budget_tag(rec)) == with_budget_tag(rec)  # once
    assert rec["label"] == "_probe [cpu, resnet18]"  # a copy
    moved = {**rec, "hparams": {"niter": 41}, "label": "_probe [cpu, resnet18, niter=41]"}
    assert with_budget_tag(moved) is moved


class _Probe(Adapter):
    """A cheap scorer with a ``cpu`` and a ``paper`` preset and one budget knob."""

    name = "_probe"
    protocol = "training-free"
    presets: ClassVar = {"cpu": {"niter": 40}, "paper": {"niter": 1000}}
    option_constraints: ClassVar = {"niter": [Interval(int, 1)]}

    def adapt(self, support):
        self.mean = support.mean(0)

    def predict(self, images):
        maps = (images - self.mean).abs().mean(1)
        return maps.flatten(1).max(1).values, maps


def test_tables_show_the_tag_records_keep_theirs(probe, make_suite, tmp_path):
    from fsad_bench.report.tables import write_tables
    from fsad_bench.run.schedule import run_suite

    registry.register(_Probe)
    try:
        kw = dict(categories=["stripes"], k=[1], runs=1)
        run_suite(make_suite(methods=["_probe"], sweep={"_probe": {"niter": [40, 41]}}, **kw), tmp_path / "r")
    finally:
        registry.unregister("_probe")
    store = ResultStore(tmp_path / "r")
    raw = {r["method"]: r["label"] for r in store.records()}
    shown = {r["method"]: r["label"] for r in store.current_records()}
    assert raw["_probe@niter=40"] == "_probe [cpu, niter=40]"  # the file keeps what the run wrote
    assert shown["_probe@niter=40"] == "_probe [cpu, capped \N{MINUS SIGN}2.5, niter=40]"
    assert shown["_probe@niter=41"] == raw["_probe@niter=41"] == "_probe [cpu, niter=41]"
    table = write_tables(tmp_path / "r", metrics=["image_auroc"])["synthetic_image_auroc"]
    assert any("capped \N{MINUS SIGN}2.5" in str(c) for c in table.columns)
