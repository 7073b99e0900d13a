"""Sweeps: ``[sweep.<method>]`` expands into method variants (one configuration per value, product of
the options), each with its own label, config hash and cells on the same support sets and training
seeds; bad sweeps are one line before any work; ``table`` has one row per value; ``plot`` draws it."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import ClassVar

import pytest
import torch
from matplotlib import image as mpimg

from fsad_bench import registry
from fsad_bench.adapter import Adapter, Interval
from fsad_bench.cli import main
from fsad_bench.errors import FsadError
from fsad_bench.protocols import load_suite
from fsad_bench.records.store import ResultStore
from fsad_bench.report.sweep_plots import write_sweep_plots
from fsad_bench.report.sweeps import sweep_tables
from fsad_bench.report.tables import write_tables
from fsad_bench.run.plan import expand_sweeps, plan
from fsad_bench.run.schedule import run_suite


class Powered(Adapter):
    """|image - mean support|^power + shift, channel-averaged: a cheap scorer with two options."""

    name = "powered"
    protocol = "training-free"
    presets: ClassVar = {"cpu": {"power": 1, "shift": 0.0}, "paper": {"power": 2, "shift": 0.0}}
    option_constraints: ClassVar = {"power": [Interval(int, 1, 4)], "shift": [Interval(float, 0)]}

    def adapt(self, support):
        self.mean = support.mean(0)

    def predict(self, images):
        maps = (images - self.mean).abs().pow(self.hparams["power"]).mean(1) + self.hparams["shift"]
        return maps.flatten(1).max(1).values, maps


class PoweredInd(Powered):
    """The same, trained on the support set (individual protocol): runs every training seed."""

    name = "powered-ind"
    protocol = "individual"

    def fit(self, train):
        (ds,) = train.values()
        self.mean = torch.stack([ds[i] for i in range(len(ds))]).mean(0) + 1e-3 * torch.randn(())

    def adapt(self, support):
        pass


@pytest.fixture
def powered():
    for cls in (Powered, PoweredInd):
        registry.register(cls)
    yield
    for cls in (Powered, PoweredInd):
        registry.unregister(cls.name)


# -- names -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"finetune_epochs": 48},
        {"lr": 1e-5, "betas": [0.5, 0.9]},
        {"arch": "resnet18"},
        {"arch": "true"},
        {"arch": "a,b"},
        {"clahe": False},
    ],
)
def test_variant_names_read_back(options):
    name = registry.variant_name("m", options)
    base, back = registry.split_variant(name)
    assert base == "m" and back == options and all(type(back[k]) is type(v) for k, v in options.items())
    assert registry.method_names(f"random,{name},gaussian") == ["random", name, "gaussian"]


def test_variant_class(powered):
    cls = registry.get("powered@power=3")
    assert issubclass(cls, Powered) and cls.name == "powered@power=3" and cls.base_method == "powered"
    assert registry.get("powered@power=3") is cls and cls.__module__ == Powered.__module__
    a = cls()
    assert a.hparams == {"power": 3, "shift": 0.0} and a.label == "powered [cpu, power=3]"
    assert registry.get("powered@power=1")().label == "powered [cpu, power=1]"  # the preset's value: tagged too
    for bad, msg in (
        ("powered@power=9", "must be an integer in [1, 4]"),
        ("powered@nope=1", "unknown option 'nope'"),
        ("powered@power", "malformed method variant"),
    ):
        with pytest.raises(FsadError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            registry.get(bad)


# -- expansion and runs ---------------------------------------------------------------------------------
def test_sweep_expands_into_one_configuration_per_value(powered, make_suite, tmp_path):
    sweep = {"powered": {"power": [1, 2, 3], "shift": [0.0, 0.5]}, "powered-ind": {"power": [1, 2]}}
    suite = make_suite(
        methods=["random", "powered", "powered-ind"],
        sweep=sweep,
        categories=["stripes"],
        k=[1],
        runs=2,
        train_seeds={"default": 1, "powered-ind": 2},
    )
    planned = plan(suite)
    variants = [f"powered@power={p},shift={s}" for p in (1, 2, 3) for s in (0.0, 0.5)]
    assert planned.suite.methods == ["random", *variants, "powered-ind@power=1", "powered-ind@power=2"]
    assert suite.methods == ["random", "powered", "powered-ind"]  # the suite itself is unchanged
    assert expand_sweeps(planned.suite) is planned.suite  # expanding twice changes nothing
    run_suite(suite, tmp_path / "r")
    recs = ResultStore(tmp_path / "r").current_records()
    by_method = defaultdict(list)
    for r in recs:
        by_method[r["method"]].append(r)
    assert set(by_method) == set(planned.suite.methods)
    swept = [m for m in by_method if "@" in m]
    labels = {m: {r["label"] for r in by_method[m]} for m in swept}
    hashes = {m: {r["config_hash"] for r in by_method[m]} for m in swept}
    assert all(len(v) == 1 for v in (*labels.values(), *hashes.values()))
    assert len({next(iter(v)) for v in labels.values()}) == len(swept) == 8  # distinct labels
    assert len({next(iter(v)) for v in hashes.values()}) == len(swept)  # distinct configurations
    assert by_method["powered@power=3,shift=0.5"][0]["hparams"] == {"power": 3, "shift": 0.5}
    # the same support sets for every value (and every method), training seeds of the base method
    supports = defaultdict(set)
    for r in recs:
        supports[(r["category"], r["k"], r["run"])].add(tuple(r["support"]))
    assert all(len(s) == 1 for s in supports.values())
    assert {r["train_seed"] for r in by_method["powered-ind@power=2"]} == {0, 1}
    assert {r["train_seed"] for r in by_method["powered@power=2,shift=0.0"]} == {0}  # training-free: seed 0
    assert len(recs) == 2 * (1 + 6 + 2 * 2)
    # cell ids and file names stay valid: no '@', '=' or ',' in a file name
    assert all(
        set(p.name) <= set("abcdefghijklmnopqrstuvwxyz0123456789_.+-")
        for p in (tmp_path / "r" / "cells").glob("*.json")
    )

    # table: one row per value; plot: one PNG per sweep
    tables = write_tables(tmp_path / "r", metrics=["image_auroc"])
    t = tables["synthetic_image_auroc_sweep_powered"]
    assert list(t.index) == [f"power={p}, shift={s}" for p in (1, 2, 3) for s in (0.0, 0.5)]
    assert list(t.columns) == ["k=1", "adapt_s k=1", "train_s"] and "±" in t.iloc[0, 0]
    assert list(tables["synthetic_image_auroc_sweep_powered-ind"].index) == ["1", "2"]
    assert (tmp_path / "r" / "tables" / "synthetic_image_auroc_sweep_powered.md").is_file()
    paths = write_sweep_plots(tmp_path / "r", metrics=["image_auroc"])
    assert sorted(p.name for p in paths) == ["synthetic_sweep_powered-ind.png", "synthetic_sweep_powered.png"]
    img = mpimg.imread(paths[0])
    assert img.ndim == 3 and img.shape[1] > 300 and img.std() > 0


def test_sweep_table_orders_numbers_numerically(powered, make_suite, tmp_path):
    suite = make_suite(
        methods=["powered"], sweep={"powered": {"power": [4, 1, 2]}}, categories=["stripes"], k=[1], runs=1
    )
    run_suite(suite, tmp_path / "r")
    t = sweep_tables(ResultStore(tmp_path / "r").frame(), ["image_auroc"])["synthetic_image_auroc_sweep_powered"]
    assert list(t.index) == ["1", "2", "4"] and t.index.name == "power"


def test_a_sweep_over_several_categories_has_a_table_and_plot_per_category(powered, make_suite, tmp_path):
    suite = make_suite(methods=["powered"], sweep={"powered": {"power": [1, 2]}}, categories=["stripes", "grid"], k=[1])
    run_suite(suite, tmp_path / "r")
    df = ResultStore(tmp_path / "r").frame()
    tables = sweep_tables(df, ["image_auroc"])
    assert set(tables) == {f"synthetic{c}_image_auroc_sweep_powered" for c in ("", "_grid", "_stripes")}
    one = df[(df["category"] == "grid") & (df["method"] == "powered@power=2")]["image_auroc"].mean()
    assert tables["synthetic_grid_image_auroc_sweep_powered"].loc["2", "k=1"].startswith(f"{100 * one:.1f}")
    names = sorted(p.name for p in write_sweep_plots(tmp_path / "r", metrics=["image_auroc"]))
    assert names == sorted(f"synthetic{c}_sweep_powered.png" for c in ("", "_grid", "_stripes"))


# -- the CLI: validation before any work, table and plot ------------------------------------------------
def _write(tmp_path, body: str):
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "s"\ndataset = "synthetic"\nk = [1]\nruns = 1\nimage_size = 64\nweights = "none"\n'
        + ("" if body.startswith("methods") else 'methods = ["random", "tdg"]\n')
        + body
    )
    return path


@pytest.mark.parametrize(
    "body,message",
    [
        ("[sweep.tdg]\nnope = [1, 2]\n", "unknown option 'nope' for method 'tdg'"),
        ("[sweep.random]\nniter = [1]\n", "unknown option 'niter' for method 'random'"),
        ("[sweep.tdg]\nniter = []\n", "[sweep.tdg] niter must be a non-empty list"),
        ("[sweep.tdg]\nniter = 40\n", "[sweep.tdg] niter must be a non-empty list"),
        ("[sweep.tdg]\n", "[sweep.tdg] is empty"),
        ('[sweep.tdg]\nniter = [40, "many"]\n', "option 'niter' of method 'tdg' must be an integer >= 1, got 'many'"),
        ("[sweep.tdg]\nniter = [40, 0]\n", "option 'niter' of method 'tdg' must be an integer >= 1, got 0"),
        ("[sweep.gaussian]\neps = [0.1]\n", "[sweep.gaussian] names no method of this suite"),
        ("[options.tdg]\nniter = 40\n[sweep.tdg]\nniter = [40, 200]\n", "option 'niter' of 'tdg' is both swept"),
        ("sweep = 3\n", "key 'sweep' must be a table of per-method tables"),
        # options valid one by one, not together (Adapter.check_hparams), as fixed options or as a sweep value
        ('[options.tdg]\npyramid_sides = "exact"\n', "tdg: pyramid_resize = 'official' sizes the pyramid itself"),
        ('[sweep.tdg]\npyramid_sides = ["official", "exact"]\n', "tdg@pyramid_sides=exact: pyramid_resize"),
        ('methods = ["diffnet"]\n[options.diffnet]\narch = "alexnet"\nn_scales = 3\n', "smallest scale below AlexNet"),
        (
            'methods = ["diffnet"]\n[options.diffnet]\nbetas = [0.8, 0.8, 0.8]\n',
            "'betas' of method 'diffnet' must be a list of",
        ),
    ],
)
def test_bad_sweep_is_one_line_before_any_work(body, message, synth_root, tmp_path, capsys):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as exc:
        main(["run", "--suite", str(_write(tmp_path, body)), "--data-root", str(synth_root), "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err.replace("\n", " ") and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_cli_run_table_plot(synth_root, tmp_path, capsys):
    """The CLI end to end on a training-free sweep (gaussian's n_features, random-init weights)."""
    out = tmp_path / "r"
    (tmp_path / "g.toml").write_text(
        'name = "g"\ndataset = "synthetic"\nmethods = ["random", "gaussian"]\nk = [1]\nruns = 1\nimage_size = 64\n'
        'weights = "none"\ncategories = ["stripes"]\n[options.gaussian]\narch = "resnet18"\n'
        "[sweep.gaussian]\nn_features = [8, 32]\n"
    )
    main(["run", "--suite", str(tmp_path / "g.toml"), "--data-root", str(synth_root), "--out", str(out)])
    text = capsys.readouterr().out
    assert "synthetic_image_auroc_sweep_gaussian" in text and "n_features=32" in text
    saved = json.loads((out / "suite.json").read_text())
    assert saved["methods"] == ["random", "gaussian@n_features=8", "gaussian@n_features=32"]
    main(["table", str(out)])
    text = capsys.readouterr().out
    assert "synthetic_image_auroc_sweep_gaussian" in text
    t = write_tables(out)["synthetic_image_auroc_sweep_gaussian"]
    assert list(t.index) == ["8", "32"]
    main(["plot", str(out)])
    assert (out / "plots" / "synthetic_sweep_gaussian.png").stat().st_size > 2000
    # one variant of the sweep on its own (--methods takes the name with its commas)
    main(
        [
            "run",
            "--suite",
            str(tmp_path / "g.toml"),
            "--data-root",
            str(synth_root),
            "--out",
            str(tmp_path / "one"),
            "--methods",
            "gaussian@n_features=8",
        ]
    )
    capsys.readouterr()
    assert {r["method"] for r in ResultStore(tmp_path / "one").records()} == {"gaussian@n_features=8"}


# -- the shipped calibration suite -----------------------------------------------------------------------
def test_calibrate_cpu_suite_is_valid():
    suite = load_suite("calibrate_cpu")
    assert suite.k == [2, 8] and suite.runs == 5 and suite.train_seeds == 3 and suite.arch == "mobilenet_v2"
    assert suite.data_root is None and suite.dataset == "real_pair"
    expanded = expand_sweeps(suite)  # every value checked against its adapter's declared constraints
    per_base = defaultdict(list)
    for m in expanded.methods:
        per_base[registry.base_name(m)].append(m)
    assert {b: len(v) for b, v in per_base.items()} == {
        "regad": 12,
        "regad-l": 4,
        "diffnet": 4,
        "diffnet+": 12,
        "tdg": 3,
        "tdg+": 9,
    }
    for m in expanded.methods:
        cls = registry.get(m)
        hp = cls.resolve_hparams(suite.preset, expanded.options.get(m, {}))
        cls.check_options(hp)
        assert expanded.train_seeds_for(m) == 3
        if any("arch" in p for p in cls.presets.values()):
            assert hp["arch"] == "mobilenet_v2"
    # the sweeps reach the paper's values
    for m, key in (
        ("regad", "epochs"),
        ("regad-l", "epochs"),
        ("diffnet", "meta_epochs"),
        ("diffnet+", "finetune_epochs"),
        ("tdg", "niter"),
        ("tdg+", "pretrain_niter"),
        ("tdg+", "adapt_niter"),
    ):
        cls = registry.get(m)
        assert cls.presets["cpu"][key] in suite.sweep[m][key] and suite.sweep[m][key][-1] == cls.presets["paper"][key]


def test_the_calibration_as_run_is_shipped_and_valid():
    """protocols/calibrate_cpu_run.toml: the reduced calibration whose numbers docs/budgets.md reports."""
    suite = load_suite("calibrate_cpu_run")
    assert suite.k == [2, 8] and suite.runs == 5 and suite.test_subset == 120 and suite.dataset == "real_pair"
    expanded = expand_sweeps(suite)
    assert {registry.base_name(m) for m in expanded.methods} == {
        "regad",
        "regad-l",
        "diffnet",
        "diffnet+",
        "tdg",
        "tdg+",
    }
    for m in expanded.methods:
        registry.get(m).check_options(expanded.options.get(m, {}))


def test_a_variant_draws_its_base_methods_seeds(powered, make_suite, tmp_path):
    """Sweep values are paired: a variant at the preset's value gives the base method's numbers (the random
    draw of ``PoweredInd.fit`` is seeded from the base name, not the variant's)."""
    kw = dict(categories=["stripes"], k=[1], runs=2, train_seeds=2)
    run_suite(make_suite(methods=["powered-ind"], **kw), tmp_path / "base")
    run_suite(make_suite(methods=["powered-ind"], sweep={"powered-ind": {"power": [1, 2]}}, **kw), tmp_path / "swept")
    base = {(r["run"], r["train_seed"]): r["scores"] for r in ResultStore(tmp_path / "base").current_records()}
    swept = {
        (r["run"], r["train_seed"]): r["scores"]
        for r in ResultStore(tmp_path / "swept").current_records()
        if r["method"] == "powered-ind@power=1"
    }
    assert len(base) == 4 and swept == base


class PoweredAgg(Powered):
    """The same, aggregated: ``fit`` learns a mean from the other categories; ``shift`` is adapt-only."""

    name = "powered-agg"
    protocol = "aggregated"
    adapt_only_options = frozenset({"shift"})
    fits: ClassVar[list[dict]] = []

    def fit(self, train):
        PoweredAgg.fits.append(dict(self.hparams))
        self.prior = torch.stack([ds[i] for ds in train.values() for i in range(len(ds))]).mean(0)

    def adapt(self, support):
        self.mean = 0.5 * (support.mean(0) + self.prior)

    def state_dict(self):
        return {"prior": self.prior}

    def load_state_dict(self, state):
        self.prior = state["prior"]


def test_variants_differing_in_adapt_only_options_share_one_fit(make_suite, tmp_path):
    registry.register(PoweredAgg)
    try:
        PoweredAgg.fits.clear()
        kw = dict(methods=["powered-agg"], categories=["stripes"], k=[1], runs=2)
        suite = make_suite(sweep={"powered-agg": {"shift": [0.0, 0.5, 1.0]}}, **kw)
        planned = plan(suite)
        by_method = defaultdict(set)
        for c in planned.cells:
            by_method[c.method].add((c.config_hash, c.fit_hash))
        assert len(by_method) == 3 and all(len(v) == 1 for v in by_method.values())
        assert len({h for v in by_method.values() for h, _ in v}) == 3  # three configurations ...
        assert len({f for v in by_method.values() for _, f in v}) == 1  # ... one fit
        run_suite(suite, tmp_path / "r")
        assert len(PoweredAgg.fits) == 1  # the other two variants loaded it from the model cache
        recs = ResultStore(tmp_path / "r").current_records()
        assert len(recs) == 6 and len({tuple(r["scores"]) for r in recs if r["run"] == 0}) == 3
        # a fit option (power) is part of the fit key: one fit per value
        PoweredAgg.fits.clear()
        run_suite(make_suite(sweep={"powered-agg": {"power": [2, 3]}}, **kw), tmp_path / "p")
        assert [f["power"] for f in PoweredAgg.fits] == [2, 3]
    finally:
        registry.unregister(PoweredAgg.name)
