"""Issue "No wrong number, ever": records validated on read, export of the current suite only, prune that
never deletes a valid record, one suite per results folder, and `rerun` only between reruns."""

import json

import pandas as pd
import pytest

from fsad_bench.cli import main
from fsad_bench.errors import FsadError
from fsad_bench.metrics import METRICS
from fsad_bench.records.store import ResultStore, check_record
from fsad_bench.report.export import export
from fsad_bench.report.tables import MEAN_ROW, summary, write_tables

SUITE = dict(
    name="t",
    dataset="d",
    data_root="/data/d",
    methods=["m1"],
    k=[1],
    runs=3,
    seed=0,
    image_size=64,
    weights="none",
    preset="cpu",
    train_seeds=1,
    options={},
    categories=["a", "b"],
    description="",
)


def _rec(method, cat, run, h="h1", k=1, t=0, auroc=None):
    """A complete record as the run layer writes it (per-image scores left short)."""
    auroc = 0.6 + 0.1 * run + (0.05 if cat == "b" else 0.0) if auroc is None else auroc
    return {
        "cell_id": f"{method}-{cat}-k{k}-r{run}-t{t}-{h}",
        "method": method,
        "label": method,
        "protocol": "training-free",
        "dataset": "d",
        "category": cat,
        "k": k,
        "run": run,
        "train_seed": t,
        "train_dataset": None,
        "preset": "cpu",
        "weights": "none",
        "seed": 0,
        "hparams": {"x": 1},
        **{m: 0.5 for m in METRICS},
        "image_auroc": auroc,
        "adapt_seconds": 1.0,
        "train_seconds": 0.0,
        "infer_seconds_per_image": 0.01,
        "infer_warm_seconds_per_image": 0.01,
        "peak_memory_mb": 10.0,
        "n_test": 4,
        "n_support": k,
        "support": [f"{run}.png"],
        "image_size": 64,
        "input_size": 64,
        "config_hash": h,
        "device": "cpu",
        "versions": {},
        "finished_at": "2024-01-01T00:00:00+00:00",
        "scores": [0.1, 0.9],
        "labels": [0, 1],
    }


def _folder(path, methods=("m1",), cats=("a", "b"), runs=3, h="h1", **suite):
    store = ResultStore(path)
    recs = [_rec(m, c, r, h) for m in methods for c in cats for r in range(runs)]
    for r in recs:
        store.put(r)
    store.save_suite(dict(SUITE, methods=list(methods), runs=runs, **suite), [r["cell_id"] for r in recs])
    return store, recs


def _mean(out, method="m1"):
    s = summary(ResultStore(out).frame(), "image_auroc")
    row = s[(s["category"] == MEAN_ROW) & (s["label"] == method)].iloc[0]
    return round(row["mean"], 1), int(row["n_runs"])


# -- 1. records validated on read ---------------------------------------------------------------------
def _other_cell(recs):
    return json.dumps(recs[1])


CORRUPT = {
    "empty object": lambda recs: "{}",
    "null": lambda recs: "null",
    "list": lambda recs: "[1]",
    "not json": lambda recs: '{"cell_id": ',
    "NaN metric": lambda recs: json.dumps(dict(recs[0], image_auroc=float("nan"))),
    "one pixel metric NaN": lambda recs: json.dumps(dict(recs[0], aupro=float("nan"))),
    "metric in %": lambda recs: json.dumps(dict(recs[0], image_auroc=74.6)),
    "metric as text": lambda recs: json.dumps(dict(recs[0], image_auroc="0.7")),
    "k as text": lambda recs: json.dumps(dict(recs[0], k="1")),
    "missing metric": lambda recs: json.dumps({k: v for k, v in recs[0].items() if k != "image_f1max"}),
    "another cell's record": _other_cell,
}


@pytest.mark.parametrize("kind", CORRUPT)
def test_invalid_record_is_named_counted_and_recomputed(kind, tmp_path, capsys, cli_exit):
    out = tmp_path / "r"
    store, recs = _folder(out)
    assert _mean(out) == (72.5, 3)
    bad = store.path(recs[0]["cell_id"])
    bad.write_text(CORRUPT[kind](recs))
    assert list(store.invalid()) == [bad] and store.invalid()[bad]
    assert not store.has(recs[0]["cell_id"]) and recs[0]["cell_id"] not in store.done_ids()
    assert store.has(recs[1]["cell_id"]) and len(store.done_ids()) == len(recs) - 1
    assert len(store.records()) == len(recs) - 1
    tables = write_tables(out)
    note = "1 invalid record skipped"
    assert any(note in n for n in tables["d_image_auroc"].attrs["notes"])
    assert note in (out / "tables" / "d_image_auroc.md").read_text()
    assert cli_exit(["table", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count(note) >= 1 and "fsad-bench run" in text and bad.name in text


def test_undefined_pixel_metrics_are_null_not_invalid(tmp_path):
    store = ResultStore(tmp_path / "r")
    pixel = ("pixel_auroc", "aupro", "pixel_aupr", "pixel_f1max")
    rec = dict(_rec("m1", "a", 0), **{m: float("nan") for m in pixel})  # masks without a defect pixel
    store.put(rec)
    on_disk = json.loads(store.path(rec["cell_id"]).read_text())
    assert all(on_disk[m] is None for m in pixel) and "NaN" not in store.path(rec["cell_id"]).read_text()
    assert store.has(rec["cell_id"]) and not store.invalid()
    store.path(rec["cell_id"]).write_text(json.dumps(rec))  # as written before: NaN for all four
    assert store.has(rec["cell_id"]) and all(store.records()[0][m] is None for m in pixel)
    assert check_record(dict(rec, image_auroc=None), rec["cell_id"]) is not None  # image metrics always defined
    with pytest.raises(FsadError, match="image_auroc"):
        store.put(dict(rec, image_auroc=float("nan")))


def test_dry_run_and_run_recompute_an_invalid_record(synth_root, tmp_path, capsys, demo_args):
    out = tmp_path / "r"
    args = demo_args(synth_root, out)
    main(args)
    store = ResultStore(out)
    first = sorted(store.done_ids())[0]
    store.path(first).write_text("{}")
    capsys.readouterr()
    main(args + ["--dry-run"])
    assert "2 done, 1 to do" in capsys.readouterr().out
    main(args)
    assert "3 cells (2 done)" in capsys.readouterr().out
    assert store.has(first) and not store.invalid() and len(store.frame()) == 3


# -- 2. export: the current suite only ------------------------------------------------------------------
def _rerun_with(out, h, methods=("m1",)):
    """What `fsad-bench run` does after a configuration change: new records, suite.json rewritten."""
    store = ResultStore(out)
    recs = [_rec(m, c, r, h) for m in methods for c in ("a", "b") for r in range(3)]
    store.save_suite(dict(SUITE, methods=list(methods)), [r["cell_id"] for r in recs])
    for r in recs:
        store.put(r)
    return recs


def test_export_writes_only_the_current_suite(tmp_path, capsys, cli_exit):
    out = tmp_path / "r"
    _folder(out, h="h1")
    new = _rerun_with(out, "h2")
    df = export(out, tmp_path / "cells.csv")
    assert len(df) == 6 and set(df["config_hash"]) == {"h2"} and "current" not in df.columns
    every = export(out, tmp_path / "all.csv", everything=True)
    assert len(every) == 12 and every.groupby("config_hash")["current"].agg(set).to_dict() == {
        "h1": {False},
        "h2": {True},
    }
    assert cli_exit(["export", str(out), str(tmp_path / "x.csv"), "--all", "--format", "anomalib"]) == 0
    back = pd.read_csv(tmp_path / "x.csv")
    assert len(back) == 12 and back["current"].sum() == 6
    store = ResultStore(out)
    store.path(new[0]["cell_id"]).write_text("{}")
    assert len(export(out, tmp_path / "y.csv")) == 5  # an invalid record is never exported


# -- 3. prune never deletes a valid record ------------------------------------------------------------
def test_method_subset_run_does_not_orphan_the_other_methods(tmp_path, capsys, monkeypatch, cli_exit):
    out = tmp_path / "r"
    store, recs = _folder(out, methods=("m1", "m2"))
    m1 = {r["cell_id"] for r in recs if r["method"] == "m1"}
    new = _rerun_with(out, "h2", methods=("m2",))  # `run --methods m2` after an option change of m2
    assert store.current_ids() == {r["cell_id"] for r in new} and store.kept_ids() == m1
    assert set(store.frame()["method"]) == {"m2"}  # tables: the latest run's cells only
    assert store.prunable() == {store.path(r["cell_id"]): "m2" for r in recs if r["method"] == "m2"}
    junk = store.cells / "m3-a-k1-r0-t0-h9.json"
    junk.write_text("{}")

    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    capsys.readouterr()
    assert cli_exit(["prune", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--yes" in err
    assert len(list(store.cells.glob("*.json"))) == 12 + 6 + 1  # nothing deleted

    assert cli_exit(["prune", str(out), "--yes"]) == 0
    text = capsys.readouterr().out
    assert "m2: 6" in text and "invalid: 1" in text and "removed 7 records" in text
    assert {p.stem for p in store.cells.glob("*.json")} == m1 | {r["cell_id"] for r in new}
    assert store.kept_ids() == m1 and len(store.records()) == 12

    _rerun_with(out, "h3", methods=("m1",))  # m1 recomputed under a new hash: its old records go stale
    assert store.kept_ids() == {r["cell_id"] for r in new}
    assert {store.path(c) for c in m1} == set(store.prunable())


def test_prune_asks_on_a_terminal(tmp_path, capsys, monkeypatch, cli_exit):
    out = tmp_path / "r"
    _folder(out, h="h1")
    _rerun_with(out, "h2")
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("click.confirm", lambda *a, **k: False)
    assert cli_exit(["prune", str(out)]) == 0
    assert "nothing deleted" in capsys.readouterr().out and len(list((out / "cells").glob("*.json"))) == 12
    monkeypatch.setattr("click.confirm", lambda *a, **k: True)
    assert cli_exit(["prune", str(out)]) == 0
    assert "removed 6 records" in capsys.readouterr().out and len(list((out / "cells").glob("*.json"))) == 6


# -- 4. one suite per results folder --------------------------------------------------------------------
def test_a_results_folder_belongs_to_one_suite(synth_root, tmp_path, capsys, cli_exit, demo_args):
    out = tmp_path / "r"
    store, _ = _folder(out)
    with pytest.raises(FsadError, match="holds suite 't'"):
        store.save_suite(dict(SUITE, name="other"), [])
    before = sorted(p.name for p in store.cells.iterdir())
    code = cli_exit(demo_args(synth_root, out))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds suite 't'" in err and "--out" in err
    assert sorted(p.name for p in store.cells.iterdir()) == before and store.load_suite()["name"] == "t"


# -- 5. rerun only compares reruns ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(image_size=96, runs=2), "image_size"),
        (dict(name="x"), "name"),
        (dict(methods=["m1", "m2"]), "methods"),
        (dict(options={"m1": {"x": 2}}), "options"),
        (dict(seed=1), "seed"),
    ],
)
def test_rerun_refuses_another_suite(change, needle, tmp_path, capsys, cli_exit):
    _folder(tmp_path / "ref")
    store, _ = _folder(tmp_path / "other")
    suite = store.load_suite()
    suite.update(change)
    (tmp_path / "other" / "suite.json").write_text(json.dumps(suite))
    capsys.readouterr()
    assert cli_exit(["rerun", str(tmp_path / "ref"), str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and "not a rerun" in err


def test_rerun_refuses_other_config_hashes_and_accepts_another_machine(tmp_path, capsys, cli_exit):
    _folder(tmp_path / "ref")
    _folder(tmp_path / "moved", data_root="/elsewhere/d")  # the same data at another path: another machine
    assert cli_exit(["rerun", str(tmp_path / "ref"), str(tmp_path / "moved")]) == 0
    _folder(tmp_path / "changed", h="h2")  # same suite, same data path, other config hashes: code or data changed
    capsys.readouterr()
    assert cli_exit(["rerun", str(tmp_path / "ref"), str(tmp_path / "changed")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "config_hash" in err
    store, recs = _folder(tmp_path / "hp", data_root="/elsewhere/d")
    store.put(dict(recs[0], hparams={"x": 2}))  # what the records say they ran differs
    assert cli_exit(["rerun", str(tmp_path / "ref"), str(tmp_path / "hp")]) == 2
    assert "hparams" in capsys.readouterr().err


def test_folder_written_before_kept_ids_loses_no_valid_record(tmp_path, capsys, cli_exit):
    out = tmp_path / "r"
    store, recs = _folder(out, methods=("m1", "m2"))
    m2 = [r["cell_id"] for r in recs if r["method"] == "m2"]
    suite = store.load_suite()
    del suite["kept_ids"]
    (out / "suite.json").write_text(json.dumps(dict(suite, cell_ids=m2)))  # the old `run --methods m2`
    assert store.kept_ids() == {r["cell_id"] for r in recs} - set(m2) and not store.prunable()
    assert cli_exit(["prune", str(out), "--yes"]) == 0 and len(store.records()) == 12
    _rerun_with(out, "h2", methods=("m2",))
    assert store.kept_ids() == {r["cell_id"] for r in recs} - set(m2)
    assert set(store.prunable()) == {store.path(c) for c in m2}
