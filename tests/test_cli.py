"""CLI: one clear line and a non-zero exit on bad input, nothing already written lost."""

import shutil

import pytest

from fsad_bench.cli import main


def _ok(args, capsys):
    main(args)
    return capsys.readouterr().out


BASE = ["run", "--suite", "demo", "--k", "1", "--runs", "1", "--weights", "none", "--image-size", "64"]


def test_run_table_methods_datasets(synth_root, tmp_path, capsys):
    out = tmp_path / "r"
    args = BASE + ["--data-root", str(synth_root), "--methods", "random,gaussian", "--out", str(out)]
    text = _ok(args, capsys)
    assert "synthetic_image_auroc" in text and "Mean" in text and "random-init" in text
    assert len(list((out / "cells").glob("*.json"))) == 6
    assert "6 cells (6 done)" in _ok(args, capsys)  # resume: nothing to do
    assert "Mean" in _ok(["table", str(out)], capsys)
    assert "gaussian" in _ok(["methods"], capsys)
    assert "mvtec" in _ok(["datasets"], capsys)
    assert "written" in _ok(["compare", str(out), "--a", "gaussian", "--b", "random"], capsys)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "nosuch"], "unknown method 'nosuch'"),
        (["--k", "99"], "k=99 is larger than the 12 normal training images"),
        (["--k", "two"], "--k must be comma-separated integers"),
        (["--runs", "0"], "runs must be >= 1"),
    ],
)
def test_run_bad_arguments(args, message, synth_root, tmp_path, capsys, cli):
    out = tmp_path / "r"
    code, _, err = cli(BASE + ["--data-root", str(synth_root), "--out", str(out)] + args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (out / "cells").exists()  # validated before anything is written


def test_unknown_suite_and_missing_data_root(tmp_path, capsys, cli):
    code, _, err = cli(["run", "--suite", "nosuch"])
    assert code == 2 and "unknown suite 'nosuch'" in err
    code, _, err = cli(BASE + ["--data-root", str(tmp_path / "missing")])
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(["run", "--suite", "paper_mvtec"])
    assert code == 2 and "needs --data-root" in err


def test_corrupt_image_keeps_finished_cells(synth_root, tmp_path, capsys, cli):
    root = shutil.copytree(synth_root, tmp_path / "d")
    out = tmp_path / "r"
    _ok(BASE + ["--data-root", str(root), "--methods", "random", "--out", str(out)], capsys)
    (root / "washer" / "test" / "good" / "002.png").write_bytes(b"\x89PNG garbage")
    code, _, err = cli(BASE + ["--data-root", str(root), "--methods", "random", "--k", "2", "--out", str(out)])
    assert code == 2 and "cannot read image" in err and "washer/test/good/002.png" in err
    assert len(list((out / "cells").glob("*.json"))) >= 3  # the k=1 cells survive
    assert not list((out / "cells").glob("*.tmp"))


def test_missing_mask(synth_root, tmp_path, capsys, cli):
    root = shutil.copytree(synth_root, tmp_path / "d")
    (root / "grid" / "ground_truth" / "stain" / "001_mask.png").unlink()
    code, _, err = cli(BASE + ["--data-root", str(root), "--out", str(tmp_path / "r")])
    assert code == 2 and "missing ground-truth mask" in err and "stain/001_mask.png" in err


def test_table_on_missing_folder(tmp_path, capsys, cli):
    code, _, err = cli(["table", str(tmp_path / "nothing")])
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli(["table", str(tmp_path / "empty")])
    assert code == 2 and "no results in" in err


def test_synth_command(tmp_path, capsys):
    text = _ok(["synth", "--out", str(tmp_path / "s"), "--categories", "2", "--size", "32", "--train", "3"], capsys)
    assert "stripes, washer" in text
    assert len(list((tmp_path / "s" / "washer" / "train" / "good").glob("*.png"))) == 3


def test_metric_choice_is_the_report_metrics():
    from fsad_bench.cli import METRIC_CHOICE
    from fsad_bench.report.tables import METRICS

    assert list(METRIC_CHOICE.choices) == list(METRICS)
