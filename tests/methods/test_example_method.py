"""The worked example of docs/adding-a-method.md, ``examples/fsad-knn``, works as the page says: found
through the ``fsad_bench.methods`` entry point, passes the adapter contract, runs through a tiny suite.

The fast test imports the example by path with its entry point simulated; the slow one pip-installs
the package (into a temporary ``--target`` folder, not the shared environment) and runs
``fsad-bench run`` on it in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import tomllib
import torch

from fsad_bench import registry
from fsad_bench.adapter import AdapterConfig, accepts
from fsad_bench.data.images import load_images
from fsad_bench.data.mvtec import MVTecDataset
from fsad_bench.records.store import ResultStore
from fsad_bench.run.schedule import run_suite

PACKAGE = Path(__file__).resolve().parents[2] / "examples" / "fsad-knn"
SOURCE = PACKAGE / "fsad_knn" / "knn.py"


def test_example_is_short_and_declares_its_entry_point():
    assert len(SOURCE.read_text().splitlines()) <= 60
    meta = tomllib.loads((PACKAGE / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"][registry.ENTRY_POINT_GROUP] == {"knn": "fsad_knn.knn:KNN"}


@pytest.fixture
def knn(monkeypatch):
    """The example's entry point, as an installed package would declare it."""
    monkeypatch.syspath_prepend(str(PACKAGE))
    ep = EntryPoint("knn", "fsad_knn.knn:KNN", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    return registry.get("knn")


def test_example_keeps_the_adapter_contract(knn, synth_root):
    assert "knn" in registry.available() and registry.info("knn").protocol == "training-free"
    for preset, values in knn.presets.items():
        knn.check_options(values, f"preset {preset!r}")
        assert all(any(accepts(c, values[k]) for c in cs) for k, cs in knn.option_constraints.items() if k in values)
    split = MVTecDataset(synth_root).split("grid")
    support, images = load_images(split.train[:2], 64), load_images([s.path for s in split.test[-3:]], 64)

    def cell():
        torch.manual_seed(3)  # the run layer seeds torch before it builds the adapter
        a = knn(AdapterConfig(weights="none", preset="paper", seed=3, image_size=64))
        a.adapt(support)
        return a, *a.predict(images)

    a, scores, maps = cell()
    assert scores.shape == (3,) and maps.shape == (3, 64, 64) and torch.isfinite(maps).all()
    assert torch.equal(scores, cell()[1]) and (maps >= 0).all()
    assert a.preset_name == "cpu" and a.label == "knn [resnet18, random-init, cpu]"  # under a paper suite


def test_example_runs_through_a_tiny_suite(knn, make_suite, tmp_path):
    out = tmp_path / "r"
    suite = make_suite(methods=["knn", "gaussian"], k=[1], runs=1, preset="paper", categories=["grid"])
    run_suite(suite, out)  # preset paper: gaussian has it, knn runs its cpu preset
    recs = [r for r in ResultStore(out).records() if r["method"] == "knn"]
    assert len(recs) == 1 and {r["label"] for r in recs} == {"knn [resnet18, random-init, cpu]"}
    assert all(r["preset"] == "cpu" and 0 <= r["image_auroc"] <= 1 for r in recs)


@pytest.mark.slow
def test_installed_example_runs_from_the_command_line(synth_root, tmp_path, demo_args):
    target = tmp_path / "site"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(target),
        str(PACKAGE),
    ]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    run = demo_args(synth_root, tmp_path / "r", "--preset", "paper", methods="knn,gaussian")
    code = f"from fsad_bench.cli import main; main({run!r})"
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "knn [resnet18, random-init, cpu]" in res.stdout
    assert len(list((tmp_path / "r" / "cells").glob("knn-*.json"))) == 3
