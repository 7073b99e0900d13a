"""Flags of degenerate cells, the label-free operating point and per-defect AUROC (small generated data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsad_bench.cli import main
from fsad_bench.errors import FsadError
from fsad_bench.metrics import (
    at_threshold,
    auroc_permutation_p,
    evaluate,
    per_defect_auroc,
    support_threshold,
    tied_pair_fraction,
)
from fsad_bench.protocols import check_types
from fsad_bench.records.store import check_record
from fsad_bench.report.tables import write_tables
from fsad_bench.run.flags import cell_flags
from fsad_bench.run.schedule import run_suite

# -- metrics: hand-computable cases ------------------------------------------------------------------


def test_operating_point_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.5, 0.4, 0.6, 0.9])
    t = support_threshold(np.array([0.1, 0.3]))  # max
    assert t == 0.3
    # above 0.3: 0.5 (normal), 0.4, 0.6, 0.9 (anomalous) -> TP 3, FP 1, FN 0
    assert at_threshold(labels, scores, t) == pytest.approx(
        {"fpr": 1 / 3, "recall": 1.0, "precision": 0.75, "f1": 6 / 7}
    )
    assert support_threshold(np.array([0.1, 0.3, 0.5]), "q0.5") == pytest.approx(0.3)
    # strictly above: a score equal to the threshold is normal; 0.55 -> TP 2 (0.6, 0.9), FP 0, FN 1
    assert at_threshold(labels, scores, 0.55) == pytest.approx(
        {"fpr": 0.0, "recall": 2 / 3, "precision": 1.0, "f1": 0.8}
    )
    assert at_threshold(labels, scores, 5.0) == {"fpr": 0.0, "recall": 0.0, "precision": 1.0, "f1": 0.0}
    with pytest.raises(ValueError, match="unknown threshold rule"):
        support_threshold(np.array([1.0]), "median")


def test_permutation_p_perfect_and_constant():
    labels = np.array([0] * 10 + [1] * 10)
    perfect = np.arange(20, dtype=float)
    assert auroc_permutation_p(labels, perfect, 1000, seed=3) == pytest.approx(1 / 1001)
    assert auroc_permutation_p(labels, np.ones(20), 1000, seed=3) == 1.0
    reversed_ = auroc_permutation_p(labels, -perfect, 1000, seed=3)
    assert reversed_ == 1.0  # one-sided: worse than chance is not better than chance
    assert 0.2 < auroc_permutation_p(labels, np.r_[np.arange(10), np.arange(10)], 500, seed=1) <= 1  # unrelated


def test_tied_pairs_and_per_defect_auroc():
    labels = np.array([0, 0, 1, 1])
    assert tied_pair_fraction(labels, np.array([1.0, 2.0, 1.0, 3.0])) == 0.25  # (0, 2) tie, of 4 pairs
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.3, 0.2, 0.9, 0.8])
    defects = ["good", "good", "crack", "hole", "crack"]
    # crack {0.2, 0.8} vs good {0.1, 0.3}: pairs won 1 + 2 = 3 of 4; hole {0.9}: 2 of 2
    assert per_defect_auroc(labels, scores, defects) == {"crack": 0.75, "hole": 1.0}


def test_evaluate_unchanged_by_the_new_metrics():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 6 + [1] * 6)
    scores = rng.random(12).astype(np.float32)
    masks = (rng.random((12, 8, 8)) > 0.8).astype(np.uint8)
    masks[:6] = 0
    maps = rng.random((12, 8, 8)).astype(np.float32)
    assert set(evaluate(labels, scores, masks, maps)) == {
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "image_aupr",
        "image_f1max",
        "pixel_aupr",
        "pixel_f1max",
    }


# -- flags ---------------------------------------------------------------------------------------------


def test_cell_flags():
    labels = np.array([0] * 8 + [1] * 8)
    rng = np.random.default_rng(0)
    maps = rng.random((16, 4, 4))
    const = cell_flags(labels, np.full(16, 0.3), maps, seed=1)
    assert const["flags"] == ["chance", "constant_scores"] and const["chance_test"]["p"] == 1.0
    good = cell_flags(labels, np.arange(16.0), maps, seed=1)
    assert good["flags"] == [] and good["chance_test"]["p"] == pytest.approx(1 / 1001)
    prior = np.broadcast_to(rng.random((4, 4)), (16, 4, 4))
    assert "identical_maps" in cell_flags(labels, np.arange(16.0), prior, seed=1)["flags"]
    assert "constant_maps" in cell_flags(labels, np.arange(16.0), np.zeros((16, 4, 4)), seed=1)["flags"]
    ties = np.r_[np.arange(8.0), np.arange(8.0)]  # AUROC exactly 0.5, every pair (i, i) tied
    assert "auroc_half_from_ties" in cell_flags(labels, ties, maps, seed=1)["flags"]
    assert "nonfinite_scores" in cell_flags(labels, np.r_[np.nan, np.arange(15.0)], maps, seed=1)["flags"]
    assert cell_flags(labels, np.arange(16.0), maps, seed=1) == cell_flags(labels, np.arange(16.0), maps, seed=1)


def _gray_dataset(root: Path, size: int = 32) -> Path:
    """One MVTec-layout category whose every image is the same gray; defect masks in the centre."""
    cat = root / "gray"
    gray = Image.fromarray(np.full((size, size, 3), 128, dtype=np.uint8))
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    for sub, n in (("train/good", 4), ("test/good", 4), ("test/blob", 4)):
        (cat / sub).mkdir(parents=True)
        for i in range(n):
            gray.save(cat / sub / f"{i:03d}.png")
    (cat / "ground_truth/blob").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(mask).save(cat / "ground_truth/blob" / f"{i:03d}_mask.png")
    return root


def test_gray_category_is_flagged(make_suite, tmp_path):
    root = _gray_dataset(tmp_path / "gray")
    suite = make_suite(dataset="gray", data_root=str(root), methods=["gaussian"], k=[1], runs=1, image_size=32)
    (rec,) = run_suite(suite, tmp_path / "out").records()
    assert rec["image_auroc"] == 0.5
    assert {"constant_scores", "chance"} <= set(rec["flags"])
    assert {"identical_maps", "constant_maps"} & set(rec["flags"])
    assert rec["chance_test"]["p"] == 1.0
    assert rec["per_defect_auroc"] == {"blob": 0.5}


# -- the operating point through the run layer ----------------------------------------------------------


def test_operating_point_leave_one_out(make_suite, spies, tmp_path, synth_root):
    from fsad_bench.data.images import load_images
    from fsad_bench.data.mvtec import MVTecDataset
    from fsad_bench.data.sampler import SupportSampler

    suite = make_suite(methods=["meandiff"], k=[1, 3], runs=1, categories=["grid"])
    recs = {r["k"]: r for r in run_suite(suite, tmp_path / "a").records()}
    assert recs[1]["operating_point"]["scoring"] == "self (k=1)"
    op = recs[3]["operating_point"]
    assert op["scoring"] == "leave-one-out" and op["rule"] == "max" and len(op["support_scores"]) == 3
    assert op["threshold"] == max(op["support_scores"])
    assert op["f1max"] == recs[3]["image_f1max"] and recs[3]["operating_point_seconds"] >= 0
    at = at_threshold(np.array(recs[3]["labels"]), np.array(recs[3]["scores"]), op["threshold"])
    assert {f: op[f] for f in at} == pytest.approx(at)
    # by hand: the mean of the other two support images scores the one left out
    support = load_images(SupportSampler(0).support(MVTecDataset(synth_root, name="synthetic").split("grid"), 3, 0), 64)
    for i in range(3):
        rest = torch.cat([support[:i], support[i + 1 :]])
        by_hand = (support[i] - rest.mean(0)).abs().mean(0).max()
        assert op["support_scores"][i] == pytest.approx(float(by_hand), rel=1e-6)
    # numbers of the cell are those of a run without the operating point
    off = {
        r["k"]: r
        for r in run_suite(
            make_suite(methods=["meandiff"], k=[1, 3], runs=1, categories=["grid"], operating_point=False),
            tmp_path / "b",
        ).records()
    }
    assert "operating_point" not in off[3]
    for k in (1, 3):
        for key in ("scores", "image_auroc", "pixel_auroc", "aupro", "image_f1max", "flags", "per_defect_auroc"):
            assert off[k][key] == recs[k][key]


def test_individual_operating_point_only_on_request(make_suite, spies, tmp_path):
    suite = make_suite(methods=["spy-ind"], k=[2], runs=1, categories=["grid"])
    (rec,) = run_suite(suite, tmp_path / "a").records()
    assert "operating_point" not in rec
    n_fits = len(spies["spy-ind"].fit_calls)
    on = make_suite(methods=["spy-ind"], k=[2], runs=1, categories=["grid"], operating_point=True)
    (rec_on,) = run_suite(on, tmp_path / "b").records()
    assert len(spies["spy-ind"].fit_calls) - n_fits == 1 + 2  # the cell's training + one per left-out image
    assert rec_on["operating_point"]["scoring"] == "leave-one-out"
    assert rec_on["cell_id"] != rec["cell_id"]  # another record: a run without it is not reused
    assert rec_on["scores"] == rec["scores"]


def test_fine_tuning_aggregated_method_operating_point_only_on_request(make_suite, spies, tmp_path, monkeypatch):
    """An aggregated method whose adaptation trains (``adapt_trains``, e.g. tdg+) is treated as an individual
    one: off by default, and ``true`` makes other records (not reused from a run without it)."""
    from fsad_bench.run import operating_point as op

    agg = spies["spy-agg"]
    assert op.by_default(agg) and not op.by_default(spies["spy-ind"])
    monkeypatch.setattr(agg, "adapt_trains", True)
    assert not op.by_default(agg) and op.wanted(agg, True) and not op.wanted(agg, None)
    (rec,) = run_suite(make_suite(methods=["spy-agg"], k=[2], runs=1, categories=["grid"]), tmp_path / "a").records()
    assert "operating_point" not in rec
    on = make_suite(methods=["spy-agg"], k=[2], runs=1, categories=["grid"], operating_point=True)
    (rec_on,) = run_suite(on, tmp_path / "b").records()
    assert rec_on["operating_point"]["scoring"] == "leave-one-out" and rec_on["cell_id"] != rec["cell_id"]
    assert rec_on["scores"] == rec["scores"]
    assert len(agg.fit_calls) == 1  # one shared fit, the operating point did not enter its key


def test_shipped_defaults():
    from fsad_bench import registry
    from fsad_bench.run import operating_point as op

    off = {m for m in registry.available() if not op.by_default(registry.get(m))}
    assert {"diffnet+", "tdg+", "diffnet", "tdg", "regad-l"} <= off
    assert not off & {"regad", "gaussian", "patchcore", "random"}


def test_operating_point_suite_key_type():
    assert check_types({"operating_point": True}, "s")["operating_point"] is True
    with pytest.raises(FsadError, match="operating_point.*true or false"):
        check_types({"operating_point": "yes"}, "s")


# -- records and tables ---------------------------------------------------------------------------------


def test_records_with_and_without_flags_are_valid(make_suite, tmp_path):
    store = run_suite(make_suite(methods=["random"], k=[1], runs=1, categories=["grid"]), tmp_path / "r")
    (rec,) = store.records()
    assert isinstance(rec["flags"], list) and check_record(rec, rec["cell_id"]) is None
    old = {k: v for k, v in rec.items() if k not in ("flags", "chance_test")}
    assert check_record(old, rec["cell_id"]) is None


def _with_flags(out: Path, flags_by_k: dict[int, list[str] | None]) -> None:
    for p in (out / "cells").glob("*.json"):
        rec = json.loads(p.read_text())
        flags = flags_by_k[rec["k"]]
        if flags is None:
            rec.pop("flags", None)
        else:
            rec["flags"] = flags
        p.write_text(json.dumps(rec))


def test_tables_mark_flagged_cells_and_strict(make_suite, tmp_path, capsys):
    out = tmp_path / "r"
    run_suite(make_suite(methods=["random"], k=[1, 2], runs=1), out)
    _with_flags(out, {1: ["constant_scores"], 2: []})
    tables = write_tables(out)
    image = tables["synthetic_image_auroc"]
    assert all(str(v).endswith("†") for v in image[("k=1", "random")].iloc[:4])  # 3 categories + Mean
    assert not any("†" in str(v) for v in image[("k=2", "random")])
    assert image.loc["grid", ("flagged", "")] == "1 flagged cell: constant scores"
    assert "flagged" not in tables["synthetic_pixel_auroc"].columns.get_level_values(0)  # an image flag only
    assert "†" in (out / "tables" / "synthetic_image_auroc.md").read_text()
    assert (out / "tables" / "per_defect_image_auroc.csv").is_file()
    assert (out / "tables" / "operating_point.md").is_file()
    with pytest.raises(SystemExit) as exit_:
        main(["table", str(out), "--strict"])
    assert exit_.value.code == 3
    assert "3 of 6 records flagged (constant scores: 3)" in capsys.readouterr().err
    _with_flags(out, {1: [], 2: None})  # clean and unchecked (records written before flags existed)
    main(["table", str(out), "--strict"])
    tables = write_tables(out)
    assert any("3 records without flags" in n for n in tables["synthetic_image_auroc"].attrs["notes"])
    assert not any("†" in str(v) for v in tables["synthetic_image_auroc"].values.ravel())
