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
    assert aupro(masks, maps, max_fpr=0.3) == pytest.approx(0.5)        # 0.3 * 0.5 / 0.3
    assert aupro(masks, maps, max_fpr=1.0) == pytest.approx(0.75)       # .5 * .5 + .5 * 1
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
