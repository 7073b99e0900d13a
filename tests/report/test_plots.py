"""Plots from a small fabricated results folder: files written, PNG, non-empty; graceful skips."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import image as mpimg

from fsad_bench.records.store import ResultStore, pick_examples, save_example_maps
from fsad_bench.report.plots import load_example_maps, write_plots

CATS, KS, RUNS, N_TEST, S = ("c0", "c1"), (2, 4), 2, 12, 16


def fabricate(out, with_scores: bool, with_maps: bool) -> None:
    rng = np.random.default_rng(0)
    store = ResultStore(out)
    labels = np.array([0] * 5 + [1] * 7)
    images = rng.random((N_TEST, 3, S, S))
    masks = np.zeros((N_TEST, S, S))
    masks[labels == 1, 4:9, 5:10] = 1
    for method, strength in (("random", 0.0), ("gaussian", 2.0)):
        for c in CATS:
            for k in KS:
                for r in range(RUNS):
                    cell_id = f"{method}-{c}-k{k}-r{r}"
                    scores = strength * labels + rng.standard_normal(N_TEST)
                    rec = {
                        "cell_id": cell_id,
                        "method": method,
                        "label": method,
                        "protocol": "individual",
                        "dataset": "synthetic",
                        "category": c,
                        "k": k,
                        "run": r,
                        "image_auroc": float(rng.uniform(0.5, 0.6) + 0.15 * strength),
                        "pixel_auroc": float(rng.uniform(0.6, 0.7)),
                        "aupro": 0.5,
                        "config_hash": "0",
                        "image_aupr": 0.5,
                        "image_f1max": 0.5,
                        "pixel_aupr": 0.5,
                        "pixel_f1max": 0.5,
                        "adapt_seconds": 1.0,
                        "train_seconds": 1.0,
                        "infer_seconds_per_image": 0.01,
                        "peak_memory_mb": 100.0,
                    }
                    if with_scores:
                        rec.update(scores=scores.tolist(), labels=labels.tolist())
                    store.put(rec)
                    if with_maps and k == max(KS) and r == 0:
                        maps = rng.random((N_TEST, S, S)) + strength * masks
                        save_example_maps(
                            out / "maps" / f"{cell_id}.npz",
                            maps,
                            images,
                            masks,
                            [f"/d/{c}/test/x/{i:03d}.png" for i in range(N_TEST)],
                            labels=labels,
                        )


def check_png(path):
    assert path.is_file() and path.stat().st_size > 2000
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50 and img.std() > 0


#: The plots written whatever the records hold (scores and maps add the ROC and example-map plots).
ALWAYS = {
    "synthetic_image_auroc_vs_k.png",
    "synthetic_image_auroc_categories.png",
    "synthetic_pixel_auroc_vs_k.png",
    "synthetic_pixel_auroc_categories.png",
    "synthetic_aupro_vs_k.png",
    "synthetic_aupro_categories.png",
    "synthetic_image_auroc_vs_adapt_cost.png",
}


def test_all_plots(tmp_path):
    fabricate(tmp_path, with_scores=True, with_maps=True)
    paths = write_plots(tmp_path)
    names = {p.name for p in paths}
    assert names == ALWAYS | {"synthetic_roc.png", "synthetic_c0_maps.png", "synthetic_c1_maps.png"}
    for p in paths:
        assert p.parent == tmp_path / "plots"
        check_png(p)


def test_skips_roc_and_maps_when_absent(tmp_path):
    fabricate(tmp_path, with_scores=False, with_maps=False)
    names = {p.name for p in write_plots(tmp_path)}
    assert names == ALWAYS
    assert not (tmp_path / "maps").exists()


def test_example_maps_format(tmp_path):
    fabricate(tmp_path, with_scores=False, with_maps=True)
    ex = load_example_maps(tmp_path)
    assert len(ex) == 2 * len(CATS)  # two methods, one cell each per category
    e = ex[0]
    assert e["maps"].shape == (4, S, S) and e["maps"].dtype == np.float32
    assert e["images"].shape == (4, S, S, 3) and e["images"].dtype == np.uint8
    assert e["masks"].shape == (4, S, S) and set(np.unique(e["masks"])) <= {0, 1}
    assert list(e["index"]) == [0, 5, 6, 7]  # three anomalous + the first normal image
    assert e["image_paths"][1].endswith("005.png") and e["k"] == max(KS) and e["run"] == 0


def test_example_maps_keep_the_contrast_of_tiny_maps(tmp_path):
    """DiffNet-like maps of values ~1e-8 (below float16's range) keep every value and their contrast;
    images may be given as a loader of the chosen indices only (the run layer streams test images)."""
    rng = np.random.default_rng(0)
    maps = (1e-8 * rng.random((6, S, S))).astype(np.float32)
    images = rng.random((6, 3, S, S)).astype(np.float32)
    masks = np.zeros((6, S, S))
    labels = np.array([0, 0, 1, 1, 1, 1])
    asked = []
    path = save_example_maps(
        tmp_path / "m.npz",
        maps,
        lambda idx: (asked.append(list(idx)), images[idx])[1],
        masks,
        [f"x/{i}.png" for i in range(6)],
        labels=labels,
    )
    with np.load(path) as z:
        saved, index = z["maps"], z["index"]
    assert asked == [list(index)]
    assert np.array_equal(saved, maps[index])  # exact: nothing flushed to zero, full contrast
    assert saved.min() < saved.max() and np.ptp(saved) > 0.5e-8


@pytest.mark.parametrize(
    "labels,n,expected", [(None, 3, [0, 1, 2]), ([1, 1, 1, 1, 1], 3, [0, 1, 2]), ([0, 0, 1, 0, 1], 4, [0, 1, 2, 4])]
)
def test_pick_examples(labels, n, expected):
    got = pick_examples(None if labels is None else np.array(labels), n, 5)
    assert sorted(got.tolist()) == sorted(expected)


def test_pick_examples_spreads_over_defect_types():
    labels = np.array([0, 0, 1, 1, 1, 1, 1])
    groups = ["good", "good", "crack", "crack", "crack", "hole", "hole"]
    assert pick_examples(labels, 4, 7, groups).tolist() == [0, 2, 3, 5]  # crack, hole, crack + first good
