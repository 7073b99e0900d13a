import json

import pytest
import torch

from fsad_bench.data.images import load_images
from fsad_bench.data.mvtec import MVTecDataset
from fsad_bench.data.sampler import SupportSampler
from fsad_bench.records.store import ResultStore
from fsad_bench.run.plan import plan
from fsad_bench.run.schedule import run_suite


def _stable(untimed, records):
    return sorted(json.dumps(untimed(r), sort_keys=True) for r in records)


def test_aggregated_fit_never_sees_the_held_out_category(make_suite, spies, synth_root):
    suite = make_suite(methods=["spy-agg"], k=[1, 2], runs=2)
    run_suite(suite, synth_root.parent / "out-agg")
    calls = spies["spy-agg"].fit_calls
    assert len(calls) == 3  # one training per held-out category, shared by its 2 k x 2 runs
    cats = {"grid", "stripes", "washer"}
    for call, held_out in zip(calls, sorted(cats)):
        assert set(call) == cats - {held_out}
        for ds in call.values():
            assert all(held_out not in p.parts for p in ds.paths)
            assert all("train" in p.parts for p in ds.paths)  # never a test image


def test_category_selection_evaluates_one_and_aggregated_trains_on_the_others(make_suite, spies, tmp_path):
    """`--categories grid` scores grid only; the aggregated fit still sees every other category."""
    from fsad_bench.errors import FsadError

    suite = make_suite(methods=["spy-agg", "meandiff"], k=[1], runs=1, categories=["grid"])
    cells = plan(suite).cells
    assert {c.category for c in cells} == {"grid"} and len(cells) == 2
    store = run_suite(suite, tmp_path / "out")
    assert [set(call) for call in spies["spy-agg"].fit_calls] == [{"stripes", "washer"}]
    assert {r["category"] for r in store.records()} == {"grid"}
    with pytest.raises(FsadError, match="category 'nope' not found"):
        plan(make_suite(methods=["spy-agg"], categories=["nope"]))


def test_individual_fit_sees_only_the_support_set(make_suite, spies, synth_root):
    suite = make_suite(methods=["spy-ind"], k=[2], runs=2)
    run_suite(suite, synth_root.parent / "out-ind")
    calls = spies["spy-ind"].fit_calls
    assert len(calls) == 3 * 2  # one training per cell
    ds = MVTecDataset(synth_root, name="synthetic")
    sampler = SupportSampler(0)
    expected = [(c, load_images(sampler.support(ds.split(c), 2, r), 64)) for c in ds.categories for r in range(2)]
    for call, (cat, support) in zip(calls, expected):
        assert list(call) == [cat]
        assert torch.equal(call[cat].images, support)


def test_aggregated_training_is_cached_across_runs(make_suite, spies, tmp_path):
    suite = make_suite(methods=["spy-agg"], k=[1], runs=1)
    run_suite(suite, tmp_path / "a")
    run_suite(suite, tmp_path / "b")  # new results folder, same model cache
    assert len(spies["spy-agg"].fit_calls) == 3


def test_resume_after_interruption_runs_only_missing_cells(make_suite, spies, tmp_path, monkeypatch, untimed):
    suite = make_suite(methods=["meandiff", "random"], k=[1, 2], runs=2, operating_point=False)  # adapt once a cell
    full = run_suite(suite, tmp_path / "full")

    calls = {"n": 0}
    original = spies["meandiff"].adapt

    def crash_on_fifth(self, support):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the process is killed while this cell is in flight
        return original(self, support)

    monkeypatch.setattr(spies["meandiff"], "adapt", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, tmp_path / "part")
    part = ResultStore(tmp_path / "part")
    assert len(part.records()) == 4  # the four finished cells are on disk, nothing else
    assert not list((tmp_path / "part" / "cells").glob("*.tmp"))

    monkeypatch.setattr(spies["meandiff"], "adapt", original)
    done_before = part.done_ids()
    ran = []
    monkeypatch.setattr(
        "fsad_bench.run.cell.ResultStore.put",
        lambda self, rec, _put=ResultStore.put: (ran.append(rec["cell_id"]), _put(self, rec)),
    )
    run_suite(suite, tmp_path / "part")
    cells = plan(suite).cells
    assert set(ran) == {c.cell_id for c in cells} - done_before  # only the missing cells ran
    assert _stable(untimed, part.records()) == _stable(untimed, full.records())


def test_same_command_same_numbers(make_suite, tmp_path, untimed):
    suite = make_suite(methods=["random"], k=[2], runs=2)
    a = run_suite(suite, tmp_path / "a").records()
    b = run_suite(suite, tmp_path / "b").records()
    assert _stable(untimed, a) == _stable(untimed, b)
    assert len({r["image_auroc"] for r in a}) > 1  # runs differ from each other


def test_test_subset_scores_the_same_images_for_every_method(make_suite, tmp_path):
    full = plan(make_suite(methods=["random", "gaussian"], categories=["stripes"], k=[1], runs=1))
    suite = make_suite(methods=["random", "gaussian"], categories=["stripes"], k=[1], runs=1, test_subset=6)
    sub = plan(suite)
    assert {c.config_hash for c in sub.cells}.isdisjoint(c.config_hash for c in full.cells)  # its own cells
    run_suite(suite, tmp_path / "r")
    recs = ResultStore(tmp_path / "r").current_records()
    n_full = len(full.dataset.split("stripes").test)
    assert n_full > 6 and {r["n_test"] for r in recs} == {6} and {r["test_subset"] for r in recs} == {6}
    assert len({tuple(r["labels"]) for r in recs}) == 1 and 0 < sum(recs[0]["labels"]) < 6
