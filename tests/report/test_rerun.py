"""`fsad-bench rerun`: a rerun of a suite checked against the reference's printed error bars."""

import json
import shutil

from fsad_bench.cli import main
from fsad_bench.records.store import ResultStore
from fsad_bench.report.tables import rerun_agreement

CATEGORIES = ["--categories", "grid,washer"]


def _shift(folder, method, points):
    for p in (folder / "cells").glob(f"{method}-*.json"):
        r = json.loads(p.read_text())
        r["image_auroc"] += points / 100
        p.write_text(json.dumps(r))


def test_rerun_inside_and_outside_the_error_bars(synth_root, tmp_path, capsys, cli_exit, demo_args):
    ref = tmp_path / "ref"
    main(demo_args(synth_root, ref, *CATEGORIES, methods="random,gaussian", runs="2"))
    again = shutil.copytree(ref, tmp_path / "again")
    capsys.readouterr()
    assert cli_exit(["rerun", str(ref), str(again)]) == 0
    out = capsys.readouterr().out
    assert "Mean rows inside the reference's ±: 2 of 2" in out
    assert (again / "tables" / "rerun_vs_ref_image_auroc.csv").is_file()

    t = rerun_agreement(ResultStore(ref).frame(), ResultStore(again).frame())
    std = float(t[(t["category"] == "Mean") & t["label"].str.startswith("random")]["std_ref"].iloc[0])
    _shift(again, "random", std + 1.0)  # every random cell moves by more than the printed ±
    assert cli_exit(["rerun", str(ref), str(again)]) == 1
    out = capsys.readouterr().out
    assert "Mean rows inside the reference's ±: 1 of 2" in out and "NO" in out
    t = rerun_agreement(ResultStore(ref).frame(), ResultStore(again).frame())
    moved = t[t["label"].str.startswith("random")]
    assert moved["delta"].round(6).eq(round(std + 1.0, 6)).all()
    assert not moved[moved["category"] == "Mean"]["inside"].any()
    assert t[t["label"].str.startswith("gaussian")]["inside"].all()


def test_rerun_of_a_missing_folder_is_a_one_line_error(tmp_path, capsys, cli_exit):
    assert cli_exit(["rerun", str(tmp_path), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing" in err
