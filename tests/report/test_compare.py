"""Paired comparison statistics, significance markers, published reference numbers and cost ratios."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fsad_bench.data.roots import KNOWN_DATASETS
from fsad_bench.errors import FsadError
from fsad_bench.report.costs import cost_ratio_table
from fsad_bench.report.published import attach_reference, load_reference, paper_difference, reference_rows
from fsad_bench.report.significance import (
    add_significance,
    bootstrap_ci,
    compare_methods,
    marker,
    paired_cells,
    significance_markers,
    wilcoxon_p,
)

MVTEC = KNOWN_DATASETS["mvtec"]


def records(
    shift: float = 0.08, cats=("c0", "c1", "c2", "c3"), runs=3, ks=(2, 4), seed=0, dataset="synthetic"
) -> pd.DataFrame:
    """Fabricated cells: 'good' beats 'weak' by ``shift`` AUROC (+ small noise) in every cell."""
    rng = np.random.default_rng(seed)
    rows = []
    for method, label, base, t in (("weak", "weak", 0.70, 0.5), ("good", "good [cpu]", 0.70 + shift, 2.0)):
        for c in cats:
            for k in ks:
                for r in range(runs):
                    rows.append(
                        {
                            "cell_id": f"{method}-{c}-k{k}-r{r}",
                            "method": method,
                            "label": label,
                            "protocol": "individual",
                            "dataset": dataset,
                            "category": c,
                            "k": k,
                            "run": r,
                            "image_auroc": float(np.clip(base + 0.02 * rng.standard_normal(), 0, 1)),
                            "pixel_auroc": float(np.clip(base + 0.1 + 0.02 * rng.standard_normal(), 0, 1)),
                            "aupro": np.nan,
                            "adapt_seconds": t,
                            "train_seconds": 3 * t,
                            "infer_seconds_per_image": t / 100,
                            "peak_memory_mb": 100 * t,
                        }
                    )
    return pd.DataFrame(rows)


def test_paired_cells_and_names():
    df = records()
    pairs = paired_cells(df, "good", "weak")  # method name resolves to its single label
    assert len(pairs) == 4 * 2 * 3
    expected = 100 * (
        df[df.method == "good"].set_index(["category", "k", "run"])["image_auroc"]
        - df[df.method == "weak"].set_index(["category", "k", "run"])["image_auroc"]
    )
    got = pairs.set_index(["category", "k", "run"])["diff"]
    np.testing.assert_allclose(got.sort_index().to_numpy(), expected.sort_index().to_numpy())
    with pytest.raises(FsadError):
        paired_cells(df, "good", "nope")
    # a cell only one side finished is not a pair
    assert len(paired_cells(df.drop(index=0), "good", "weak")) == 23


def test_wilcoxon_matches_scipy():
    d = np.array([3.1, -0.4, 2.2, 5.0, 1.7, -1.1, 4.4, 0.9, 2.8, 3.3, -0.2, 1.5])
    stat, p = wilcoxon_p(d)
    ref = stats.wilcoxon(d)
    assert stat == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    # exact two-sided p by enumerating all 2**8 sign patterns of the ranks (n=8, no ties)
    small = np.array([2.5, -0.7, 1.9, 4.1, -0.3, 3.6, 1.2, 5.3])
    ranks = stats.rankdata(np.abs(small))
    w_minus = ranks[small < 0].sum()
    signs = (np.arange(2**8)[:, None] >> np.arange(8)) & 1
    null = (signs * ranks).sum(axis=1)
    exact = min(1.0, 2 * (null <= w_minus).mean())
    assert wilcoxon_p(small) == pytest.approx((w_minus, exact))
    assert wilcoxon_p([0.0, 0.0]) == (0.0, 1.0)
    assert np.isnan(wilcoxon_p([])[1])


def test_bootstrap_matches_scipy_and_hand_computation():
    d = np.array([3.1, -0.4, 2.2, 5.0, 1.7, -1.1, 4.4, 0.9, 2.8, 3.3, -0.2, 1.5])
    lo, hi = bootstrap_ci(d, n_resamples=10_000, seed=7)
    ref = stats.bootstrap(
        (d,), np.mean, n_resamples=10_000, method="percentile", confidence_level=0.95, rng=np.random.default_rng(7)
    )
    assert lo == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=1e-12)
    # hand computation with the same draws
    rng = np.random.default_rng(7)
    means = d[rng.integers(0, d.size, (10_000, d.size))].mean(axis=1)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert lo < d.mean() < hi
    assert bootstrap_ci(d, seed=7) == bootstrap_ci(d, seed=7)  # seeded: reproducible


def test_compare_methods_table():
    df = records()
    t = compare_methods(df, "good [cpu]", "weak", n_resamples=2000)
    assert list(t["k"]) == [2, 4, "all"]
    allk = t[t["k"] == "all"].iloc[0]
    assert allk["n_pairs"] == 24 and allk["wins"] + allk["ties"] + allk["losses"] == 24
    assert allk["wins"] == 24 and allk["mean_diff"] == pytest.approx(8, abs=1.5)
    assert allk["ci_low"] < allk["mean_diff"] < allk["ci_high"] and allk["ci_low"] > 0
    assert allk["p_value"] < 0.001
    k2 = t[t["k"] == 2].iloc[0]
    pairs = paired_cells(df, "good", "weak")
    assert k2["p_value"] == pytest.approx(stats.wilcoxon(pairs.loc[pairs.k == 2, "diff"]).pvalue)
    # reversed order flips the sign and the win/loss counts
    rev = compare_methods(df, "weak", "good", n_resamples=200)
    assert rev.iloc[-1]["mean_diff"] == pytest.approx(-allk["mean_diff"]) and rev.iloc[-1]["losses"] == 24


def test_significance_markers_clear_and_null_difference():
    df = records(shift=0.08)
    marks = significance_markers(df, "weak")
    assert marks == {("k=2", "good [cpu]"): "**↑", ("k=4", "good [cpu]"): "**↑"}
    null = records(shift=0.0, seed=1)
    assert all(m == "" for m in significance_markers(null, "weak").values())
    assert marker(0.03, -1.0) == "*↓" and marker(0.2, 5.0) == "" and marker(0.001, 2.0, arrows=("+", "-")) == "**+"
    from fsad_bench.report.tables import paper_table

    table = add_significance(paper_table(df, "image_auroc"), df, "weak")
    assert table.loc["Mean", ("k=2", "good [cpu]")].endswith("**↑")
    assert "*" not in table.loc["Mean", ("k=2", "weak")]


def test_reference_file_reproduces_published_averages():
    ref = load_reference()
    assert set(ref.columns) >= {"dataset", "category", "method", "k", "metric", "value"}
    mean = ref[ref.category == "Mean"].set_index(["dataset", "method", "metric", "k"])["value"]
    assert mean[("mvtec", "RegAD", "image_auroc", 8)] == 91.2
    assert [mean[("mvtec", "RegAD", "image_auroc", k)] for k in (2, 4, 8)] == [85.7, 88.2, 91.2]
    per_cat = ref[ref.category != "Mean"]
    for (ds, m, metric, k), g in per_cat.groupby(["dataset", "method", "metric", "k"]):
        assert sorted(g.category) == MVTEC
        published = mean[(ds, m, metric, k)]
        # the per-category numbers must average to the published row; the authors' own
        # pixel-AUROC k=8 table is off by 0.13 (96.67 vs 96.8), documented in the README
        tol = 0.15 if (metric, k) == ("pixel_auroc", 8) else 0.05 + 1e-9
        assert abs(g.value.mean() - published) <= tol, (ds, m, metric, k, g.value.mean(), published)
    assert ((ref.value >= 0) & (ref.value <= 100)).all()


def test_reference_rows_and_attach():
    rows = reference_rows("mvtec", "image_auroc", ks=[2, 8])
    # RegAD's and DifferNet's official scripts pick the checkpoint on test AUROC: a footnote mark
    assert {("k=2", "RegAD (paper)†"), ("k=8", "RegAD (paper)†"), ("k=8", "TDG+ (paper)")} <= set(rows.columns)
    assert ("k=8", "DiffNet+ (paper)‡") in rows.columns
    assert any(n.startswith("† checkpoint selected by best test AUROC") and "(RegAD)" in n for n in rows.attrs["notes"])
    assert {c[0] for c in rows.columns} == {"k=2", "k=8"}
    assert rows.loc["Mean", ("k=8", "RegAD (paper)†")] == "91.2"
    assert rows.loc["Mean", ("k=8", "TDG+ (paper)")] == "76.6"  # average only: no per-category numbers
    assert rows.loc["screw", ("k=2", "RegAD (paper)†")] == "52.5"
    assert reference_rows("mpdd", "image_auroc", ks=[8]).loc["Mean", ("k=8", "RegAD (paper)†")] == "71.9"
    assert reference_rows("synthetic").empty
    from fsad_bench.report.tables import paper_table

    df = records(dataset="mvtec", cats=("bottle", "screw"), ks=(2, 4))
    merged = attach_reference(paper_table(df, "image_auroc", "mvtec"), "mvtec", "image_auroc")
    k2 = [c[1] for c in merged.columns if c[0] == "k=2"]
    assert "(paper)" in k2[-1] and "RegAD (paper)†" in k2 and "(paper)" not in k2[0]
    assert ("k=8", "RegAD (paper)†") not in merged.columns  # only the measured k values
    assert merged.index[-2:].tolist() == ["Mean", "Std (categories)"] and "cable" in merged.index


def test_mean_over_fewer_categories_than_the_reference_says_so():
    """Issue 13 §4: a Mean over 2 categories beside the paper's 15-category Mean carries a note and
    a row averaging the paper's numbers over the same 2 categories; per-category rows side by side."""
    from fsad_bench.report.tables import paper_table

    df = records(dataset="mvtec", cats=("bottle", "screw"), ks=(2,))
    merged = attach_reference(paper_table(df, "image_auroc", "mvtec"), "mvtec", "image_auroc")
    row = "Mean (2 of 15 paper categories)"
    assert merged.index.tolist()[-3:] == [row, "Mean", "Std (categories)"]
    assert merged.loc[row, ("k=2", "RegAD (paper)†")] == f"{(99.4 + 52.5) / 2:.1f}"
    assert merged.loc[row, ("k=2", "TDG+ (paper)")] == "–"  # the paper gives only its Mean
    measured = 100 * df[df.label == "good [cpu]"].groupby("category")["image_auroc"].mean().mean()
    assert merged.loc[row, ("k=2", "good [cpu]")] == f"{measured:.1f}"
    notes = merged.attrs["notes"]
    assert any("over 2 of the reference's 15 mvtec categories (bottle, screw)" in n for n in notes)
    assert merged.loc["bottle", ("k=2", "RegAD (paper)†")] == "99.4"  # per category where the paper has it
    full = records(dataset="mvtec", cats=tuple(MVTEC), ks=(2,))
    merged_all = attach_reference(paper_table(full, "image_auroc", "mvtec"), "mvtec", "image_auroc")
    assert not any(str(r).startswith("Mean (") for r in merged_all.index)
    assert not any("not comparable" in n for n in merged_all.attrs["notes"])


def test_regad_l_reference_is_the_gaussian_row():
    """Table 3's RegAD-L is Table 5 row A (no registration training): it maps to gaussian, never to regad-l."""
    ref = load_reference()
    a = ref[(ref.method == "RegAD-L") & (ref.category == "Mean") & (ref.metric == "image_auroc")]
    assert a.sort_values("k")["value"].tolist() == [81.5, 84.9, 87.4]
    assert all("compare with gaussian" in c for c in a["caveat"])
    df = records(dataset="mvtec", cats=("bottle",), ks=(2,))
    df["method"] = df["method"].map({"good": "gaussian", "weak": "regad-l"})
    diff = paper_difference(df, "mvtec")
    assert set(diff["method"]) == {"gaussian"} and set(diff["paper_method"]) == {"RegAD-L"}
    mean = diff[diff.category == "Mean"].iloc[0]
    assert mean["paper"] == 81.5 and "not comparable" in mean["paper_basis"]  # 1 of 15 categories
    assert "compare with gaussian" in mean["caveat"]


def test_paper_difference():
    df = records(dataset="mvtec", cats=("bottle", "screw"), ks=(2,))
    df["method"] = df["method"].map({"good": "regad", "weak": "weak"})
    diff = paper_difference(df, "mvtec")
    assert set(diff["method"]) == {"regad"}
    bottle = diff[diff.category == "bottle"].iloc[0]
    measured = 100 * df[(df.method == "regad") & (df.category == "bottle")]["image_auroc"].mean()
    assert bottle["paper"] == 99.4 and bottle["diff"] == pytest.approx(measured - 99.4)
    mean = diff[diff.category == "Mean"].iloc[0]
    assert mean["paper"] == pytest.approx((99.4 + 52.5) / 2) and mean["paper_basis"] == "mean of 2 categories"
    assert "best test AUROC" in mean["caveat"]  # RegAD's official script selects on the test set


def test_cost_ratio_table():
    t = cost_ratio_table(records(), ["weak", "good"])  # no gaussian: the first non-random method is the reference
    assert t.attrs["reference"] == "weak" and t.index.name == "method" and t.loc["good [cpu]", "name"] == "good"
    assert t.loc["weak", "adapt_x_weak"] == 1.0 and t.loc["good [cpu]", "adapt_x_weak"] == pytest.approx(4.0)
    assert t.loc["good [cpu]", "infer_ms_per_image"] == pytest.approx(20.0)
    assert t.loc["good [cpu]", "train_min"] == pytest.approx(0.1)
    assert t.loc["good [cpu]", "peak_memory_mib"] == pytest.approx(200.0)
    assert list(t.index) == ["weak", "good [cpu]"]
    # gaussian is the default reference whatever its speed; random never is; the paper's GPU seconds ride along
    df = records()
    df["method"] = df["method"].map({"weak": "random", "good": "gaussian"})
    df["label"] = df["method"]
    t = cost_ratio_table(pd.concat([df, records().assign(method="regad", label="regad [cpu]")]))
    assert t.attrs["reference"] == "gaussian" and t.loc["gaussian", "adapt_x_gaussian"] == 1.0
    assert t.loc["random", "adapt_x_gaussian"] == pytest.approx(0.25)
    assert t.loc["regad [cpu]", "paper_adapt_s"] == 4.47 and np.isnan(t.loc["gaussian", "paper_adapt_s"])
    assert cost_ratio_table(df, reference="random").attrs["reference"] == "random"


def test_fewshot_baselines_loaded_with_the_regad_numbers():
    from fsad_bench.report.published import load_reference, reference_rows

    ref = load_reference()
    pc = ref[(ref["method"] == "PatchCore") & (ref["dataset"] == "mvtec") & (ref["metric"] == "image_auroc")]
    assert dict(zip(pc["k"], pc["value"])) == {1: 83.4, 4: 88.8}
    assert (ref["method"] == "RegAD").any() and ref["source"].notna().all()
    rows = reference_rows("visa", "pixel_auroc", ks=[1], reference=ref)
    assert rows.loc["Mean", ("k=1", "PaDiM (paper)")] == "89.9"
