"""export (csv / anomalib columns), MLflow tracking (local file store; skipped without mlflow),
report metric selection and the CLI options --metrics / --mlflow / export."""

import json
import math

import pandas as pd
import pytest

from fsad_bench.cli import main
from fsad_bench.errors import FsadError
from fsad_bench.metrics import METRICS
from fsad_bench.report.export import ANOMALIB_METRICS, export


def _run(demo_args, synth_root, out, *extra):
    cats = sorted(p.name for p in synth_root.iterdir() if p.is_dir())
    main(demo_args(synth_root, out, "--categories", cats[0], *extra))


def test_records_export_and_metric_tables(synth_root, tmp_path, capsys, demo_args):
    out = tmp_path / "r"
    _run(demo_args, synth_root, out, "--metrics", "image_auroc,image_f1max,pixel_aupr")
    text = capsys.readouterr().out
    assert "image_f1max" in text and "pixel_aupr" in text and "pixel_auroc —" not in text
    rec = json.loads(next((out / "cells").glob("*.json")).read_text())
    assert set(METRICS) <= set(rec) and "hparams" in rec
    assert all(0 <= rec[m] <= 1 for m in METRICS if not math.isnan(rec[m]))

    df = export(out, tmp_path / "cells.csv", "csv")
    back = pd.read_csv(tmp_path / "cells.csv")
    assert len(back) == len(df) == 1 and "scores" not in back.columns and "versions.torch" in back.columns
    assert back.loc[0, "image_f1max"] == pytest.approx(rec["image_f1max"])

    an = export(out, tmp_path / "anomalib.csv", "anomalib")
    for col in (
        "model",
        "category",
        "image_AUROC",
        "pixel_AUROC",
        "pixel_AUPRO",
        "fit_duration",
        "test_duration",
        "model.class_path",
        "data.init_args.category",
        "k_shot",
        "seed",
    ):
        assert col in an.columns
    assert an.loc[0, "pixel_AUPRO"] == pytest.approx(rec["aupro"])
    assert an.loc[0, "test_duration"] == pytest.approx(rec["infer_seconds_per_image"] * rec["n_test"])
    assert set(ANOMALIB_METRICS) == set(METRICS)

    main(["export", str(out), str(tmp_path / "x.csv"), "--format", "anomalib"])
    assert "1 cells" in capsys.readouterr().out
    with pytest.raises(FsadError, match="not a results folder"):
        export(tmp_path / "nothing", tmp_path / "y.csv")
    with pytest.raises(FsadError, match="unknown export format"):
        export(out, tmp_path / "y.csv", "xml")


def test_bad_metric_name(synth_root, tmp_path, capsys, demo_args):
    with pytest.raises(SystemExit) as exc:
        _run(demo_args, synth_root, tmp_path / "r", "--metrics", "image_auroc,accuracy")
    assert exc.value.code == 2 and "--metrics: unknown accuracy" in capsys.readouterr().err


def test_mlflow_missing_is_one_line(synth_root, tmp_path, capsys, monkeypatch, demo_args):
    import builtins

    real = builtins.__import__

    def no_mlflow(name, *a, **kw):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(SystemExit) as exc:
        _run(demo_args, synth_root, tmp_path / "r", "--mlflow")
    assert exc.value.code == 2 and "fsad-bench[mlflow]" in capsys.readouterr().err


def test_mlflow_file_store(synth_root, tmp_path, monkeypatch, demo_args):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("FSAD_BENCH_MLFLOW", "")  # restored after the test (the CLI sets it for its workers)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "r"
    _run(demo_args, synth_root, out, "--mlflow")  # default: a file store under the results folder
    uri = (out / "mlruns").resolve().as_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fsad-bench/r")
    runs = client.search_runs([exp.experiment_id])
    rec = json.loads(next((out / "cells").glob("*.json")).read_text())
    assert len(runs) == 1 and runs[0].info.run_name == rec["cell_id"]
    assert runs[0].data.metrics["image_auroc"] == pytest.approx(rec["image_auroc"])
    assert runs[0].data.params["method"] == "random" and runs[0].data.params["k"] == "1"
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    maps = {a.path for a in client.list_artifacts(runs[0].info.run_id, "maps")}
    assert "record.json" in arts and maps == {f"maps/{rec['cell_id']}.npz"}
