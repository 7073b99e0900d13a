import numpy as np
import pandas as pd

from fsad_bench.report.costs import cost_table
from fsad_bench.report.tables import MEAN_ROW, STD_ROW, paper_table, summary, write_tables
from fsad_bench.run.schedule import run_suite


def _records():
    rows = []
    for cat, base in (("a", 0.6), ("b", 0.8), ("c", 0.9)):
        for k in (2, 4):
            for run in range(3):
                for method, shift in (("m1", 0.0), ("m2", 0.05)):
                    rows.append(
                        dict(
                            dataset="d",
                            category=cat,
                            k=k,
                            run=run,
                            method=method,
                            label=method,
                            image_auroc=base + shift + 0.01 * run,
                            pixel_auroc=np.nan,
                            aupro=np.nan,
                            adapt_seconds=1.0 + k,
                            train_seconds=0.0,
                            infer_seconds_per_image=0.01,
                            peak_memory_mb=100.0,
                        )
                    )
    return pd.DataFrame(rows)


def test_paper_table_shape_and_values():
    t = paper_table(_records(), "image_auroc", methods=["m1", "m2"])
    assert list(t.index) == ["a", "b", "c", MEAN_ROW, STD_ROW]
    assert list(t.columns) == [("k=2", "m1"), ("k=2", "m2"), ("k=4", "m1"), ("k=4", "m2")]
    assert t.loc["a", ("k=2", "m1")] == "61.0 ± 1.0"
    assert t.loc[MEAN_ROW, ("k=4", "m2")] == "82.7 ± 1.0"  # (66 + 86 + 96) / 3; runs differ by 1
    s = summary(_records(), "image_auroc")
    std = s[(s.category == MEAN_ROW) & (s.label == "m1") & (s.k == 2)]["std_categories"].item()
    assert np.isclose(std, np.std([61, 81, 91], ddof=1))


def test_cost_table():
    c = cost_table(_records(), ["m1", "m2"])
    assert list(c.index) == ["m1", "m1", "m2", "m2"] and list(c["k"]) == [2, 4, 2, 4]
    assert c["adapt_s"].tolist() == [3.0, 5.0, 3.0, 5.0]


def test_write_tables_from_store(make_suite, tmp_path):
    out = tmp_path / "r"
    run_suite(make_suite(methods=["random"], k=[1, 2], runs=2), out)
    tables = write_tables(out)
    assert set(tables) == {"synthetic_image_auroc", "synthetic_pixel_auroc", "synthetic_aupro", "cost", "cost_ratio"}
    for name in tables:
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 0
    assert tables["synthetic_image_auroc"].shape == (3 + 2, 2)
