"""An interrupted run's partial aggregates are never shown as complete: tables mark them, --complete-only
hides them, exports say so, the AUROC-vs-k plot draws them hollow, compare refuses unpaired cells."""

from __future__ import annotations

import pandas as pd
import pytest

from fsad_bench.cli import main
from fsad_bench.errors import FsadError
from fsad_bench.records.store import ResultStore
from fsad_bench.report.completeness import MARK, completeness, planned_cells
from fsad_bench.report.export import export
from fsad_bench.report.significance import check_paired, compare_methods
from fsad_bench.report.tables import MEAN_ROW, STD_ROW, write_tables
from fsad_bench.run.schedule import run_suite

NOTE = "spy-ind k=2: 1/3 categories, 1/2 seeds, 2/12 cells"


@pytest.fixture
def interrupted(make_suite, spies, tmp_path):
    """random (training-free) and spy-ind (individual, 2 train seeds) on 3 categories, k = 1, 2, 2 runs;
    then spy-ind's k=2 cells deleted except one category's train seed 0 (what an interrupted run leaves)."""
    out = tmp_path / "r"
    run_suite(make_suite(methods=["random", "spy-ind"], k=[1, 2], runs=2, train_seeds=2), out)
    store = ResultStore(out)
    first = min(r["category"] for r in store.records())
    gone = {
        r["cell_id"]
        for r in store.records()
        if r["method"] == "spy-ind" and r["k"] == 2 and not (r["category"] == first and r["train_seed"] == 0)
    }
    assert len(gone) == 10
    store.remove(gone)
    return out, first


def test_coverage_counts_planned_against_present(interrupted):
    out, first = interrupted
    comp = completeness(out)
    assert comp.planned and [c.note() for c in comp.incomplete()] == [NOTE]
    assert comp.complete("spy-ind", 1) and comp.complete("random", 2) and not comp.complete("spy-ind", 2)
    assert not comp.complete("spy-ind", 2, first)  # its train seed 1 is missing
    assert comp.per_category[("spy-ind", 2, first)].note() == f"spy-ind k=2 {first}: 1/2 seeds, 2/4 cells"


def test_table_marks_the_partial_mean_and_names_what_it_lacks(interrupted):
    out, first = interrupted
    t = write_tables(out)["synthetic_image_auroc"]
    col = ("k=2", "spy-ind")
    marked = lambda v: f" {MARK}" in str(v).replace(" †", "")  # noqa: E731  (a flag mark † may follow)
    assert marked(t.loc[MEAN_ROW, col]) and marked(t.loc[STD_ROW, col])
    assert marked(t.loc[first, col])
    assert not any(marked(v) for c in t.columns if c != col for v in t[c])  # complete columns unmarked
    assert any(NOTE in n for n in t.attrs["notes"])
    summary = pd.read_csv(out / "tables" / "summary.csv")
    bad = summary[~summary["complete"]]
    assert set(bad["label"]) == {"spy-ind"} and set(bad["k"]) == {2}
    assert NOTE in (out / "tables" / "synthetic_image_auroc.md").read_text()
    cost = write_tables(out)["cost"]
    assert cost["complete"].tolist() == [not (lab == "spy-ind" and k == 2) for lab, k in zip(cost.index, cost["k"])]


def test_complete_only_hides_partial_columns(interrupted, capsys):
    out, _ = interrupted
    t = write_tables(out, complete_only=True)["synthetic_image_auroc"]
    assert ("k=2", "spy-ind") not in t.columns and ("k=1", "spy-ind") in t.columns
    assert any("hidden (--complete-only)" in n and NOTE in n for n in t.attrs["notes"])
    main(["table", str(out), "--complete-only"])
    assert "hidden (--complete-only)" in capsys.readouterr().out
    main(["table", str(out)])
    text = capsys.readouterr().out
    assert NOTE in text and f" {MARK}" in text


def test_export_has_a_complete_column(interrupted, tmp_path):
    out, _ = interrupted
    for fmt, method, k in (("csv", "method", "k"), ("anomalib", "model.class_path", "k_shot")):
        df = export(out, tmp_path / f"{fmt}.csv", fmt)
        assert df["complete"].tolist() == [not (m == "spy-ind" and kk == 2) for m, kk in zip(df[method], df[k])]
        assert list(pd.read_csv(tmp_path / f"{fmt}.csv")["complete"]) == df["complete"].tolist()


def test_compare_refuses_unpaired_cells(interrupted, capsys):
    out, _ = interrupted
    df = ResultStore(out).frame()
    with pytest.raises(
        FsadError,
        match=r"'spy-ind' and 'random' are not paired: 0 cells of 'spy-ind' and 4 of "
        r"'random' have no partner .*--allow-unpaired",
    ):
        check_paired(df, "spy-ind", "random")
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(out), "--a", "spy-ind", "--b", "random"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "not paired" in err and len(err.strip().splitlines()) == 1
    t = compare_methods(df, "spy-ind", "random", allow_unpaired=True, n_resamples=200)
    assert t.loc[t["k"] == 2, "n_pairs"].item() == 2  # the shared cells only
    main(["compare", str(out), "--a", "spy-ind", "--b", "random", "--allow-unpaired", "--resamples", "200"])


def test_compare_pairs_a_training_free_method_with_train_seed_0(make_suite, spies, tmp_path):
    out = tmp_path / "r"
    run_suite(make_suite(methods=["random", "spy-ind"], k=[1], runs=2, train_seeds=2), out)
    df = ResultStore(out).frame()
    check_paired(df, "random", "spy-ind")  # spy-ind's train seed 1 has no partner by design: not refused
    assert compare_methods(df, "random", "spy-ind", n_resamples=200)["n_pairs"].iloc[0] == 6


def test_plot_draws_partial_points_hollow(interrupted, monkeypatch):
    from fsad_bench.report import plots

    legends = []
    real = plots._save

    def keep(fig, path):
        for ax in fig.axes:
            if ax.get_legend():
                legends.extend(t.get_text() for t in ax.get_legend().get_texts())
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    out, _ = interrupted
    df = ResultStore(out).frame()
    plots.plot_metric_vs_k(df, "synthetic", "image_auroc", out / "p.png", incomplete={("spy-ind", 2)})
    assert "spy-ind (* incomplete at k=2)" in legends and "random" in legends


def test_planned_cells_read_back_method_and_category():
    ids = [
        "regad-l-bottle-k2-r0-t1-0123456789",
        "regad-bottle-k2-r0-t0-0123456789",
        "anomalib_Padim-metal_nut-k4-r3-t0-abcdefabcd",
        "regad-l-screw-k2-r1-t0-0123456789",
    ]
    suite = {"methods": ["regad", "regad-l", "anomalib:Padim"], "categories": [], "cell_ids": ids}
    p = planned_cells(suite, {"bottle", "metal_nut"})
    assert list(zip(p["method"], p["category"], p["k"], p["run"], p["train_seed"])) == [
        ("regad-l", "bottle", 2, 0, 1),
        ("regad", "bottle", 2, 0, 0),
        ("anomalib:Padim", "metal_nut", 4, 3, 0),
        ("regad-l", "screw", 2, 1, 0),
    ]  # screw: no record names it, the longest method prefix decides


def test_folder_without_plan_counts_as_complete(make_suite, tmp_path):
    out = tmp_path / "r"
    run_suite(make_suite(methods=["random"], k=[1], runs=1), out)
    (out / "suite.json").unlink()
    assert not completeness(out).planned
    t = write_tables(out)["synthetic_image_auroc"]
    assert not any(f" {MARK}" in str(v) for c in t.columns for v in t[c])
