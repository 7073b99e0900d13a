import math

import numpy as np
import pytest

from fsad_bench.metrics import aupro, image_auroc, pixel_auroc


def test_image_auroc():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_pixel_auroc_and_no_defect_is_nan():
    masks = np.array([[[0, 1], [0, 1]]])
    assert pixel_auroc(masks, np.array([[[0.1, 0.9], [0.2, 0.8]]])) == 1.0
    assert math.isnan(pixel_auroc(np.zeros((1, 2, 2)), np.ones((1, 2, 2))))


def test_aupro_single_region_by_hand():
    # Region = top row (2 px, scores 0.9, 0.4); normal = bottom row (0.5, 0.1).
    # PRO/FPR points: (0, .5) (0.5, .5) (0.5, 1) (1, 1).
    masks = np.array([[[1, 1], [0, 0]]])
    maps = np.array([[[0.9, 0.4], [0.5, 0.1]]])
    assert aupro(masks, maps, max_fpr=0.3) == pytest.approx(0.5)  # 0.3 * 0.5 / 0.3
    assert aupro(masks, maps, max_fpr=1.0) == pytest.approx(0.75)  # .5 * .5 + .5 * 1
    assert aupro(masks, maps, max_fpr=0.75) == pytest.approx(0.5 / 0.75)


def test_aupro_averages_regions_not_pixels():
    # Image A: region r1 of 1 px (0.8). Image B: region r2 of 3 px (0.7, 0.2, 0.2).
    # Normal pixels: 0.6, 0.3, 0.0, 0.0 (A) and 0.1, 0.1 (B).
    masks = np.array([[[1, 0, 0, 0, 0]], [[1, 1, 1, 0, 0]]])
    maps = np.array([[[0.8, 0.6, 0.3, 0.0, 0.0]], [[0.7, 0.2, 0.2, 0.1, 0.1]]])
    # normal pixels: 0.6, 0.3, 0.0, 0.0, 0.1, 0.1 -> FPR steps of 1/6
    # curve: (0, .5) (0, 2/3) (1/6, 2/3) (2/6, 2/3) (2/6, 1) ... (1, 1)
    assert aupro(masks, maps, max_fpr=0.3) == pytest.approx(2 / 3)  # cut at 0.3 < 2/6: PRO = 2/3 throughout
    expected_1 = 2 / 6 * 2 / 3 + 4 / 6 * 1
    assert aupro(masks, maps, max_fpr=1.0) == pytest.approx(expected_1)


def test_aupro_perfect_and_nan():
    masks = np.zeros((2, 8, 8))
    masks[0, 2:4, 2:4] = 1
    masks[1, 5:7, 1:3] = 1
    assert aupro(masks, masks * 2.0 + 0.1) == pytest.approx(1.0)
    assert math.isnan(aupro(np.zeros((1, 4, 4)), np.random.rand(1, 4, 4)))


# -- AUPR and F1-max ------------------------------------------------------------------------
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve  # noqa: E402

from fsad_bench.metrics import METRICS, evaluate, image_aupr, image_f1max, pixel_aupr, pixel_f1max  # noqa: E402


def test_aupr_f1max_by_hand():
    # scores sorted: 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg)
    # thresholds: >=0.8: P=1, R=.5, F1=2/3; >=0.4: P=.5, R=.5; >=0.35: P=2/3, R=1, F1=.8; >=0.1: P=.5, R=1
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert image_f1max(labels, scores) == pytest.approx(0.8)
    assert image_aupr(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # Σ ΔR · P
    masks = np.array([[[0, 0], [1, 1]]])
    maps = np.array([[[0.1, 0.4], [0.35, 0.8]]])
    assert pixel_f1max(masks, maps) == pytest.approx(0.8)
    assert pixel_aupr(masks, maps) == pytest.approx(5 / 6)
    assert math.isnan(pixel_aupr(np.zeros((1, 2, 2)), maps)) and math.isnan(pixel_f1max(np.ones((1, 2, 2)), maps))


def test_aupr_f1max_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.3
    s = np.round(rng.random(500) + 0.5 * y, 2)  # rounding -> many ties
    assert image_aupr(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    brute = max(f1_score(y, s >= t) for t in np.unique(s))  # every threshold, by brute force
    assert image_f1max(y, s) == pytest.approx(brute, abs=1e-12)
    masks, maps = y.reshape(5, 10, 10), s.reshape(5, 10, 10)
    assert pixel_aupr(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    p, r, _ = precision_recall_curve(y, s)
    assert pixel_f1max(masks, maps) == pytest.approx(np.nanmax(2 * p * r / (p + r)), abs=1e-12)


def test_evaluate_all_and_subset():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 8, 8))
    masks[2, 2:5, 2:5] = 1
    masks[3, 0:2, 5:8] = 1
    maps = rng.random((4, 8, 8)) + masks
    labels, scores = np.array([0, 0, 1, 1]), maps.reshape(4, -1).max(1)
    out = evaluate(labels, scores, masks, maps)
    assert list(out) == list(METRICS)
    assert out["image_auroc"] == image_auroc(labels, scores)
    assert out["pixel_auroc"] == pixel_auroc(masks, maps) and out["aupro"] == aupro(masks, maps)
    assert out["pixel_aupr"] == pytest.approx(average_precision_score(masks.reshape(-1) > 0.5, maps.reshape(-1)))
    assert out["image_f1max"] == image_f1max(labels, scores)
    assert list(evaluate(labels, scores, masks, maps, ["pixel_f1max", "image_auroc"])) == ["pixel_f1max", "image_auroc"]
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(labels, scores, masks, maps, ["accuracy"])
