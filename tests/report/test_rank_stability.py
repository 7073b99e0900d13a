"""How stable a ranking is: P(A beats B) on a new support draw and training seed, the support lottery, P(first)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fsad_bench.cli import main
from fsad_bench.errors import FsadError
from fsad_bench.report.significance import (
    compare_methods,
    lottery_table,
    rank_stability,
    win_probability,
    with_ahead_column,
)


def frame(values: dict[str, dict[tuple[str, int, int], float]], k: int = 2, trained=()) -> pd.DataFrame:
    """Records from ``{label: {(category, run, train_seed): auroc}}``."""
    return pd.DataFrame(
        [
            {
                "cell_id": f"{lab}-{c}-{r}-{s}",
                "method": lab,
                "label": lab,
                "dataset": "d",
                "category": c,
                "k": k,
                "run": r,
                "train_seed": s,
                "image_auroc": v,
                "protocol": "individual" if lab in trained else "training-free",
            }
            for lab, cells in values.items()
            for (c, r, s), v in cells.items()
        ]
    )


def test_win_probability_by_hand():
    a = {("c0", r, 0): v for r, v in enumerate([0.90, 0.80, 0.85, 0.70])}
    b = {("c0", r, 0): v for r, v in enumerate([0.85, 0.85, 0.85, 0.60])}
    w = win_probability(frame({"A": a, "B": b}), "A", "B", n_resamples=2000)
    cat = w[(w["k"] == 2) & (w["category"] == "c0")].iloc[0]
    assert cat["n_draws"] == 4 and cat["p_a_better"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts 1/2
    assert 0 <= cat["p_a_better_low"] <= cat["p_a_better"] <= cat["p_a_better_high"] <= 1
    assert (cat["a_min"], cat["a_max"], cat["b_spread"]) == pytest.approx((70, 90, 25))
    # P(A ahead): bootstrap of the mean difference (+5, -5, 0, +10 points) by hand, same draws
    d = np.array([5.0, -5.0, 0.0, 10.0])
    idx = np.random.default_rng(0).integers(0, 4, (2000, 4))
    m = d[idx].mean(axis=1)
    assert cat["p_a_ahead"] == pytest.approx(np.mean(np.where(m > 1e-9, 1, np.where(m < -1e-9, 0, 0.5))))
    again = win_probability(frame({"A": a, "B": b}), "A", "B", n_resamples=2000)
    pd.testing.assert_frame_equal(w, again)  # seeded
    assert set(w["category"]) == {"c0", "Mean"} and set(w["k"]) == {2, "all"}


def test_mean_row_is_per_draw_mean_over_categories():
    a = {(c, r, 0): 0.9 if c == "c0" else 0.5 for c in ("c0", "c1") for r in range(3)}
    b = {(c, r, 0): 0.7 for c in ("c0", "c1") for r in range(3)}  # A wins c0 by 20, loses c1 by 20: a tie on average
    w = win_probability(frame({"A": a, "B": b}), "A", "B", n_resamples=500)
    rows = w.set_index(["k", "category"])
    assert rows.loc[(2, "c0"), "p_a_better"] == 1 and rows.loc[(2, "c1"), "p_a_better"] == 0
    assert rows.loc[(2, "Mean"), "p_a_better"] == 0.5 and rows.loc[(2, "Mean"), "p_a_ahead"] == 0.5
    assert rows.loc[(2, "Mean"), "a_spread"] == pytest.approx(0)


def test_one_draw_has_no_bootstrap_and_unpaired_is_refused():
    w = win_probability(frame({"A": {("c0", 0, 0): 0.9}, "B": {("c0", 0, 0): 0.8}}), "A", "B", n_resamples=200)
    assert w["p_a_better"].eq(1).all() and w["p_a_ahead"].isna().all() and w["p_a_better_low"].isna().all()
    assert "–" in lottery_table(w).iloc[0]["P(A ahead)"]
    with pytest.raises(FsadError, match="not paired"):
        win_probability(frame({"A": {("c0", 0, 0): 0.9, ("c0", 1, 0): 0.9}, "B": {("c0", 0, 0): 0.8}}), "A", "B")


def test_rank_stability_clear_and_close_races():
    rng = np.random.default_rng(1)
    vals = {
        lab: {(c, r, 0): base + 0.01 * rng.standard_normal() for c in ("c0", "c1") for r in range(6)}
        for lab, base in (("best", 0.95), ("close", 0.949), ("far", 0.6))
    }
    t = rank_stability(frame(vals), n_resamples=3000).set_index("label")
    assert t["p_first"].sum() == pytest.approx(1)
    assert t.loc["far", "p_first"] == 0 and t.loc["far", "rank"] == 3 and t.loc["far", "mean_rank"] == 3
    assert 0.05 < t.loc["close", "p_first"] < 0.95  # a 0.1-point gap within 1-point noise is a coin toss
    assert t.loc["best", "n_draws"] == 6 and t.loc["best", "n_categories"] == 2
    assert t.loc["best", "mean"] == pytest.approx(100 * np.mean(list(vals["best"].values())))
    same = rank_stability(frame(vals), n_resamples=3000).set_index("label")
    pd.testing.assert_frame_equal(t, same)


def test_training_free_method_counts_at_every_train_seed():
    trained = {("c0", r, s): 0.80 + 0.1 * s for r in range(3) for s in range(2)}  # seed 1 much better
    free = {("c0", r, 0): 0.85 for r in range(3)}
    t = rank_stability(frame({"T": trained, "F": free}, trained=("T",)), n_resamples=500).set_index("label")
    assert t.loc["T", "mean"] == pytest.approx(85) and t.loc["F", "n_draws"] == 6
    w = win_probability(frame({"T": trained, "F": free}, trained=("T",)), "T", "F", n_resamples=200)
    assert w["n_draws"].iloc[0] == 3  # compare pairs F with T's train seed 0 only (paired_cells)


def test_ahead_column_joins_the_compare_table():
    a = {(c, r, 0): 0.9 for c in ("c0", "c1") for r in range(3)}
    b = {(c, r, 0): 0.8 for c in ("c0", "c1") for r in range(3)}
    df = frame({"A": a, "B": b})
    t = with_ahead_column(
        compare_methods(df, "A", "B", n_resamples=200), win_probability(df, "A", "B", n_resamples=200)
    )
    assert list(t["k"]) == [2, "all"] and list(t["p_a_ahead"]) == [1.0, 1.0]


def _record_files(out, df: pd.DataFrame):
    from fsad_bench.records.store import METRICS

    (out / "cells").mkdir(parents=True)
    for r in df.to_dict("records"):
        r.update(
            {m: r["image_auroc"] for m in METRICS},
            config_hash="x",
            support=["000.png", "001.png"],
            adapt_seconds=1.0,
            train_seconds=0.0,
            infer_seconds_per_image=0.01,
            peak_memory_mb=100.0,
        )
        (out / "cells" / f"{r['cell_id']}.json").write_text(json.dumps(r))


def test_compare_and_table_commands_write_rank_stability(tmp_path, capsys):
    from fsad_bench.records.store import ResultStore
    from fsad_bench.report.tables import write_tables

    rng = np.random.default_rng(2)
    vals = {
        lab: {(c, r, 0): base + 0.02 * rng.standard_normal() for c in ("c0", "c1") for r in range(4)}
        for lab, base in (("A", 0.9), ("B", 0.85))
    }
    out = tmp_path / "r"
    _record_files(out, frame(vals))
    assert len(ResultStore(out).frame()) == 16
    write_tables(out, metrics=["image_auroc"])
    text = (out / "tables" / "rank_stability.md").read_text()
    assert "p_first" in text and "| A " in text and (out / "tables" / "rank_stability.csv").is_file()
    main(["compare", str(out), "--a", "A", "--b", "B", "--resamples", "500"])
    printed = capsys.readouterr().out
    assert "p_a_ahead" in printed and "on a new support draw and training seed" in printed and "k=2 c1" in printed
    draws = pd.read_csv(out / "tables" / "compare_A_vs_B_image_auroc_draws.csv")
    assert set(draws["category"]) == {"c0", "c1", "Mean"}
