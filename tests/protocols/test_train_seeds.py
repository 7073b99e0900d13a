"""The training-seed axis: cells, fit seeds and model-cache keys, records, table spreads, pairing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fsad_bench.records.store import ResultStore
from fsad_bench.report.significance import paired_cells
from fsad_bench.report.tables import MEAN_ROW, paper_table, summary, write_tables
from fsad_bench.run.plan import Cell, plan
from fsad_bench.run.schedule import run_suite


def test_plan_repeats_trained_methods_only(make_suite, spies):
    suite = make_suite(methods=["spy-agg", "spy-ind", "meandiff"], k=[1, 2], runs=2, train_seeds=3)
    cells = plan(suite).cells
    seeds = {m: sorted({c.train_seed for c in cells if c.method == m}) for m in suite.methods}
    assert seeds == {"spy-agg": [0, 1, 2], "spy-ind": [0, 1, 2], "meandiff": [0]}  # training-free: seed 0 only
    assert len(cells) == 3 * 2 * 2 * (3 + 3 + 1)
    assert len({c.cell_id for c in cells}) == len(cells)
    a = Cell("m", "aggregated", "d", "c", 2, 0, "h", 0)
    assert a.cell_id != Cell("m", "aggregated", "d", "c", 2, 0, "h", 1).cell_id and "-t0-" in a.cell_id


def test_train_seeds_table_gives_each_method_its_own_count(make_suite, spies, tmp_path):
    suite = make_suite(
        methods=["spy-agg", "spy-ind", "meandiff"], k=[1], runs=1, train_seeds={"default": 2, "spy-ind": 4}
    )
    cells = plan(suite).cells
    seeds = {m: sorted({c.train_seed for c in cells if c.method == m}) for m in suite.methods}
    assert seeds == {"spy-agg": [0, 1], "spy-ind": [0, 1, 2, 3], "meandiff": [0]}
    toml = tmp_path / "s.toml"
    toml.write_text(
        'name = "s"\ndataset = "synthetic"\nmethods = ["random", "tdg"]\nk = [1]\n'
        'train_seeds = { default = 3, "tdg+" = 5 }\n'
    )
    from fsad_bench.errors import FsadError
    from fsad_bench.protocols import load_suite

    with pytest.raises(FsadError, match=r"s.toml: train_seeds names 'tdg\+', which is not a method"):
        load_suite(str(toml))
    toml.write_text(toml.read_text().replace('"tdg+" = 5', "tdg = 0"))
    with pytest.raises(FsadError, match=r"train_seeds must be an integer >= 1, got 0 for 'tdg'"):
        load_suite(str(toml))
    toml.write_text(toml.read_text().replace("tdg = 0", "tdg = 5"))
    assert load_suite(str(toml)).train_seeds_for("tdg") == 5 and load_suite(str(toml)).train_seeds_for("random") == 3


def test_aggregated_fit_once_per_held_out_and_train_seed_and_cached(make_suite, spies, tmp_path, monkeypatch):
    seeds = []
    original = spies["spy-agg"].fit

    def fit(self, train):
        import torch

        seeds.append((self.config.seed, int(torch.randint(2**30, (1,)))))  # adapter seed, torch state at fit
        original(self, train)

    monkeypatch.setattr(spies["spy-agg"], "fit", fit)
    suite = make_suite(methods=["spy-agg"], k=[1], runs=2, train_seeds=2)
    store = run_suite(suite, tmp_path / "a")
    assert len(seeds) == 3 * 2  # one fit per (held-out category, train seed), shared by k and runs
    assert len({s for s, _ in seeds}) == 2  # config.seed differs per train seed
    assert len(set(seeds)) == 6  # the fit seed differs per (held-out, train seed)
    models = list(Path(os.environ["FSAD_BENCH_CACHE"]).glob("models/spy-agg/*/*.pt"))
    assert len(models) == 6 and {p.name.split("-")[3] for p in models} == {"t0", "t1"}
    recs = store.records()
    assert sorted({r["train_seed"] for r in recs}) == [0, 1] and len(recs) == 3 * 2 * 2
    run_suite(suite, tmp_path / "b")  # new results folder, same model cache: nothing refitted
    assert len(seeds) == 6


def test_individual_cell_seed_includes_the_train_seed(make_suite, spies, tmp_path, monkeypatch):
    seen = []
    original = spies["spy-ind"].fit
    monkeypatch.setattr(
        spies["spy-ind"], "fit", lambda self, train: (seen.append(self.config.seed), original(self, train))
    )
    run_suite(make_suite(methods=["spy-ind"], k=[1], runs=1, train_seeds=2), tmp_path / "r")
    assert len(seen) == 3 * 2 and len(set(seen)) == 6


def test_single_seed_numbers_unchanged_by_the_axis(make_suite, tmp_path):
    """train_seeds = 1 runs exactly the cells (and numbers) of train seed 0 of a longer suite."""
    one = run_suite(make_suite(methods=["random"], k=[1], runs=2), tmp_path / "one").records()
    two = run_suite(make_suite(methods=["random"], k=[1], runs=2, train_seeds=2), tmp_path / "two").records()
    assert {r["cell_id"]: r["scores"] for r in one} == {r["cell_id"]: r["scores"] for r in two}


def _fabricated(with_seed: bool = True) -> tuple[pd.DataFrame, np.ndarray]:
    """Two categories, 2 train seeds x 3 runs; x[c, t, r] in AUROC (0-1)."""
    x = np.array([[[0.60, 0.64, 0.62], [0.70, 0.72, 0.77]], [[0.80, 0.81, 0.86], [0.84, 0.90, 0.83]]])
    rows = []
    for ci, cat in enumerate(("a", "b")):
        for t in range(2):
            for r in range(3):
                row = dict(
                    dataset="d",
                    category=cat,
                    k=2,
                    run=r,
                    method="m",
                    label="m",
                    image_auroc=x[ci, t, r],
                    pixel_auroc=np.nan,
                    aupro=np.nan,
                )
                if with_seed:
                    row["train_seed"] = t
                rows.append(row)
    return pd.DataFrame(rows), 100 * x


def _pooled(groups):
    ss = sum(((g - g.mean()) ** 2).sum() for g in groups)
    return np.sqrt(ss / sum(len(g) - 1 for g in groups))


def test_table_std_over_train_seed_and_run_pairs_and_components():
    df, x = _fabricated()
    s = summary(df, "image_auroc").set_index("category")
    a = x[0]
    assert s.loc["a", "mean"] == pytest.approx(a.mean())
    assert s.loc["a", "std"] == pytest.approx(a.reshape(-1).std(ddof=1))  # all 6 (train seed, run) pairs
    assert s.loc["a", "std_runs"] == pytest.approx(_pooled([a[0], a[1]]))  # over runs within a train seed
    assert s.loc["a", "std_train_seeds"] == pytest.approx(_pooled([a[:, r] for r in range(3)]))
    assert (s.loc["a", "n"], s.loc["a", "n_runs"], s.loc["a", "n_train_seeds"]) == (6, 3, 2)
    macro = x.mean(axis=0)  # (train seed, run) macro averages over categories
    assert s.loc[MEAN_ROW, "std"] == pytest.approx(macro.reshape(-1).std(ddof=1))
    assert s.loc[MEAN_ROW, "std_train_seeds"] == pytest.approx(_pooled([macro[:, r] for r in range(3)]))
    t = paper_table(df, "image_auroc")
    assert t.loc["a", ("k=2", "m")] == f"{a.mean():.1f} ± {a.reshape(-1).std(ddof=1):.1f}"
    assert t.loc[MEAN_ROW, ("k=2", "m")] == f"{x.mean():.1f} ± {macro.reshape(-1).std(ddof=1):.1f}"
    assert "train seed, run" in t.attrs["notes"][0]
    c = paper_table(df, "image_auroc", std="components")
    assert c.loc["a", ("k=2", "m")] == (
        f"{a.reshape(-1).std(ddof=1):.1f} (runs {_pooled([a[0], a[1]]):.1f}, "
        f"seeds {_pooled([a[:, r] for r in range(3)]):.1f})"
    )


def test_old_records_without_train_seed_read_as_seed_zero():
    df, x = _fabricated(with_seed=False)
    df = df[df.index % 6 < 3]  # train seed 0's runs only, without the field
    s = summary(df, "image_auroc").set_index("category")
    assert s.loc["a", "std"] == pytest.approx(x[0, 0].std(ddof=1)) == pytest.approx(s.loc["a", "std_runs"])
    assert s.loc["a", "std_train_seeds"] == 0 and s.loc["a", "n_train_seeds"] == 1


def test_pairs_match_on_train_seed():
    df, _ = _fabricated()
    other = df.assign(method="o", label="o", image_auroc=df["image_auroc"] - 0.01 * df["train_seed"])
    pairs = paired_cells(pd.concat([df, other]), "m", "o")
    assert len(pairs) == 12 and set(pairs["train_seed"]) == {0, 1}
    assert np.allclose(pairs["diff"], 1.0 * pairs["train_seed"])  # seed t of m against seed t of o
    free = other[other.train_seed == 0].drop(columns="train_seed")  # a training-free method's old records
    assert len(paired_cells(pd.concat([df, free]), "m", "o")) == 6


def test_written_tables_show_components_with_several_train_seeds(make_suite, spies, tmp_path):
    out = tmp_path / "r"
    run_suite(make_suite(methods=["spy-ind", "meandiff"], k=[1], runs=2, train_seeds=2), out)
    tables = write_tables(out)
    assert "synthetic_image_auroc_std_components" in tables
    text = (out / "tables" / "synthetic_image_auroc.md").read_text()
    assert "sample std over every (train seed, run) pair" in text
    summ = pd.read_csv(out / "tables" / "summary.csv")
    assert {"std", "std_runs", "std_train_seeds", "n_train_seeds"} <= set(summ.columns)
    assert set(summ[summ.label == "spy-ind"]["n_train_seeds"]) == {2}
    assert set(summ[summ.label == "meandiff"]["n_train_seeds"]) == {1}
    assert "synthetic_image_auroc_std_components" not in write_tables(out, std_components=False)
    assert len(ResultStore(out).records()) == 3 * 2 * 2 + 3 * 2
