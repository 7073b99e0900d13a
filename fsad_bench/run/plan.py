"""Planning a suite: validation against the adapters and the data, cells and their config hashes,
the datasets a run reads, and which cells are done. Nothing here computes a number.

A *cell* is (method, protocol, dataset, category, k, run, train seed); :func:`plan` returns a
:class:`Plan` (suite, dataset, cells, adapter classes, training dataset) that running reuses.
A suite's ``[sweep.<method>]`` tables are expanded first (:func:`expand_sweeps`): the method is
replaced by one variant per value, ``<method>@<option>=<value>``, a method of its own downstream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsad_bench import registry
from fsad_bench.components.backbone import check_weights_argument
from fsad_bench.data.dataset import Dataset
from fsad_bench.data.integrity import verify_readable
from fsad_bench.data.roots import open_data_root
from fsad_bench.data.sampler import SupportSampler
from fsad_bench.data.synthetic import generate
from fsad_bench.errors import FsadError
from fsad_bench.identity import code_fingerprint, tree_fingerprint, weights_fingerprint
from fsad_bench.protocols import Suite, check_sweep
from fsad_bench.run import operating_point as op
from fsad_bench.run.paths import cache_dir

if TYPE_CHECKING:
    from fsad_bench.records.store import ResultStore


@dataclass(frozen=True)
class Cell:
    """One benchmark cell. ``train_seed`` numbers the training repetition (0 .. train_seeds-1;
    always 0 for training-free methods): aggregated / cross-dataset methods fit once per
    (held-out category, train seed), individual methods fit per cell with a seed that
    includes it."""

    method: str
    protocol: str
    dataset: str
    category: str
    k: int
    run: int
    config_hash: str
    train_seed: int = 0
    #: key of the shared fit (aggregated / cross-dataset): the config hash without the adapter's
    #: ``adapt_only_options`` and with the base method of a variant; "" = ``config_hash``
    fit_hash: str = ""

    @property
    def fit_config_hash(self) -> str:
        """The hash a shared fit is cached and seeded under: :attr:`fit_hash`, else :attr:`config_hash`."""
        return self.fit_hash or self.config_hash

    @property
    def cell_id(self) -> str:
        key = (
            f"{self.method}|{self.protocol}|{self.dataset}|{self.category}|{self.k}|{self.run}|{self.config_hash}"
            f"|t{self.train_seed}"
        )
        name = re.sub(
            r"[^A-Za-z0-9_.+-]", "_", f"{self.method}-{self.category}"
        )  # `anomalib:Padim`: no ':' in file names
        return f"{name}-k{self.k}-r{self.run}-t{self.train_seed}-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def train_seeds_of(protocol: str, train_seeds: int) -> range:
    """Training seeds a method of ``protocol`` runs: ``range(train_seeds)``, or just 0 for a
    training-free method (nothing is trained, so another seed would only repeat the numbers)."""
    return range(1) if protocol == "training-free" else range(train_seeds)


def synthetic_root(name: str, root: str | list[str] | None, params: dict | None) -> str | Path | list[str] | None:
    """``root`` unchanged, except for the built-in ``synthetic`` dataset without a root: the folder
    ``<cache>/synthetic/<parameters>`` it is generated into (once) from the ``params``."""
    if name != "synthetic" or (any(root) if isinstance(root, (list, tuple)) else root):
        return root
    params = {"categories": 4, "seed": 0, **(params or {})}
    folder = cache_dir() / "synthetic" / "-".join(f"{k}{v}" for k, v in sorted(params.items()))
    generate(folder, **params)
    return folder


def open_dataset(suite: Suite) -> Dataset:
    """The suite's dataset with *every* category: ``suite.categories`` selects the evaluated ones
    (:func:`evaluated_categories`; each must exist), while the aggregated protocol trains on all
    the others. The synthetic dataset is generated into the cache on first use."""
    root = synthetic_root(suite.dataset, suite.data_root, suite.synthetic)

    def open_(categories: list[str]) -> Dataset:
        return open_data_root(
            suite.dataset,
            root,
            categories,
            f"suite {suite.name!r} needs --data-root DIR",
            layout=suite.layout,
            folder=suite.folder,
        )

    dataset = open_([])
    if any(c not in dataset.categories for c in suite.categories):
        open_(suite.categories)  # raises the one-line error naming the category and what was expected
    return dataset


def evaluated_categories(suite: Suite, dataset: Dataset) -> list[str]:
    """The categories whose test sets a suite scores: its ``categories``, or all of the dataset's."""
    return list(suite.categories) or list(dataset.categories)


def open_train_dataset(suite: Suite) -> Dataset:
    """The training dataset of cross-dataset methods (``train_dataset`` & co. in the suite)."""
    if not suite.train_dataset:
        raise FsadError(
            f"suite {suite.name!r} has a cross-dataset method but no train_dataset "
            f'(e.g. train_dataset = "mvtec" and train_data_root = "/data/mvtec")'
        )
    root = synthetic_root(suite.train_dataset, suite.train_data_root, suite.train_synthetic)
    return open_data_root(
        suite.train_dataset, root, suite.train_categories, f"suite {suite.name!r} needs train_data_root = DIR"
    )


def sweep_variants(suite: Suite, method: str) -> list[str]:
    """Variant names of ``method`` swept by ``suite.sweep[method]``: one per combination of the listed
    values (the product over the options, in table order; repeated values once), each checked against
    the adapter (option name, type, declared constraints: FsadError naming the ``[sweep.<method>]``)."""
    table = suite.sweep[method]
    cls = registry.get(method)
    source = f"[sweep.{method}] of suite {suite.name!r}"
    for key, values in table.items():
        for value in values:
            cls.check_options({key: value}, source)
    names = [registry.variant_name(method, dict(zip(table, combo))) for combo in itertools.product(*table.values())]
    return list(dict.fromkeys(names))


def expand_sweeps(suite: Suite) -> Suite:
    """The suite with each swept method replaced (in place in ``methods``) by its variants
    (:func:`sweep_variants`), and every variant's ``options`` its base method's (the swept values
    travel in the variant's name); the suite itself is unchanged. A ``[sweep.X]`` whose method is not
    in ``methods`` (a ``--methods`` subset) is skipped; one that names no registered method, an empty
    list, an option also fixed in ``[options.X]``, an unknown option or a value of the wrong type is
    an FsadError (one line). Expanding an expanded suite changes nothing."""
    check_sweep(suite.sweep, suite.options, f"suite {suite.name!r}")
    for m in suite.sweep:
        if m not in suite.methods and m not in registry.available():
            raise FsadError(
                f"suite {suite.name!r}: [sweep.{m}] names no registered method "
                f"(suite methods: {', '.join(suite.methods)})"
            )
    methods = [v for m in suite.methods for v in (sweep_variants(suite, m) if m in suite.sweep else [m])]
    options = dict(suite.options)
    for m in methods:
        base = registry.base_name(m)
        if base != m and base in suite.options:
            options[m] = {**suite.options[base], **suite.options.get(m, {})}
    if methods == suite.methods and options == suite.options:
        return suite
    return dataclasses.replace(suite, methods=list(dict.fromkeys(methods)), options=options)


def validate_suite(suite: Suite) -> None:
    """Presets, option names, option value types and the resolved options together
    (``Adapter.check_hparams``) against the adapters (FsadError listing what is valid), before
    anything is computed. A preset must exist in at least one of the suite's methods;
    a method without it runs its ``cpu`` preset (single-configuration methods like ``gaussian``)."""
    classes = {m: registry.get(m) for m in suite.methods}
    check_weights_argument(str(suite.weights or "auto"), suite.arch)
    presets = sorted({p for cls in classes.values() for p in cls.presets})
    if suite.preset not in presets:
        raise FsadError(f"unknown preset {suite.preset!r} (valid for {', '.join(classes)}: {', '.join(presets)})")
    for m, opts in suite.options.items():
        if m not in classes and m not in registry.available():
            raise FsadError(
                f"suite {suite.name!r}: [options.{m}] names no registered method (suite methods: {', '.join(classes)})"
            )
        if not isinstance(opts, dict):
            raise FsadError(f"suite {suite.name!r}: [options.{m}] must be a table of option = value")
        (classes.get(m) or registry.get(m)).check_options(opts, f"[options.{m}] of suite {suite.name!r}")
    for m, cls in classes.items():  # the options together, as each method will run (variants: with their values)
        cls.check_hparams(cls.resolve_hparams(suite.preset, suite.options.get(m, {})))


def _dataset_identity(ds: Dataset, categories: list[str], memo: dict[str, str]) -> dict[str, str]:
    """Per category: the tree fingerprint (file list, sizes, mtimes) of ``root/category``."""
    out = {}
    for c in categories:
        folder = ds.root / c
        key = str(folder.resolve())
        if key not in memo:
            memo[key] = tree_fingerprint(folder)
        out[c] = memo[key]
    return out


def config_hash(
    suite: Suite,
    method: str,
    category: str | None = None,
    dataset: Dataset | None = None,
    train_dataset: Dataset | None = None,
    memo: dict[str, str] | None = None,
    fit_only: bool = False,
) -> str:
    """Hash of everything that changes a method's numbers on ``category`` besides (k, run):

    the resolved hyper-parameters (preset values + options, and the preset that supplied them), the
    code (:func:`~fsad_bench.identity.code_fingerprint`: the adapter's module, the run modules that
    compute numbers and the fsad_bench modules they import), the weights' content, image size, seed,
    the support lists' content, and the data's identity (folder, file list, sizes, mtimes; no image is read): the
    category's own folder, every category's for ``aggregated`` methods, the training dataset's for
    ``cross-dataset`` ones, and the test subset. Part of every cell id. ``fit_only``: the hash of what
    changes a shared fit (the trained-model cache key): the base method of a variant, hyper-parameters
    without the adapter's ``adapt_only_options``, no test subset or operating point."""
    cls = registry.get(method)
    memo = {} if memo is None else memo
    options = suite.options.get(method, {})
    wkey = f"weights|{suite.weights}"
    if wkey not in memo:  # one hash of the weights per plan
        memo[wkey] = weights_fingerprint(suite.weights, cache_dir())
    hparams = cls.resolve_hparams(suite.preset, options)
    if fit_only:
        hparams = {k: v for k, v in hparams.items() if k not in cls.adapt_only_options}
    payload: dict[str, Any] = {
        # the resolved values, not the preset's name: presets with equal values give equal numbers
        "method": registry.base_name(method) if fit_only else method,
        "hparams": hparams,
        "code": code_fingerprint(cls),
        "weights": memo[wkey],
        "image_size": suite.image_size,
        "seed": suite.seed,
        "synthetic": suite.synthetic if suite.dataset == "synthetic" else None,
        "support_lists": Path(suite.support_lists).read_text() if suite.support_lists else None,
    }
    if suite.operating_point and not op.by_default(cls) and not fit_only:  # records then hold the operating point
        payload["operating_point"] = True
    if suite.test_subset is not None and not fit_only:
        payload["test_subset"] = suite.test_subset
    if dataset is not None:
        cats = dataset.categories if cls.protocol == "aggregated" or category is None else [category]
        payload["data"] = {
            "name": dataset.name,
            "root": str(dataset.root.resolve()),
            "files": _dataset_identity(dataset, cats, memo),
        }
    if cls.protocol == "cross-dataset":
        payload["train"] = {
            "dataset": suite.train_dataset,
            "root": suite.train_data_root,
            "categories": suite.train_categories,
            "synthetic": suite.train_synthetic if suite.train_dataset == "synthetic" else None,
        }
        if train_dataset is not None:
            payload["train"]["files"] = _dataset_identity(train_dataset, train_dataset.categories, memo)
    text = json.dumps(payload, sort_keys=True, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Plan:
    """What :func:`plan` found, reused by the run (nothing re-opened or re-resolved per group):
    the suite, its dataset (every category), its cells (each once), the adapter class of each
    method, and the training dataset of cross-dataset methods (None without one)."""

    suite: Suite
    dataset: Dataset
    cells: list[Cell]
    classes: dict[str, type] = field(default_factory=dict)
    train_dataset: Dataset | None = None


def plan(suite: Suite) -> Plan:
    """Validate the suite against the adapters and the data (every header opened) and expand it into
    cells (nothing is computed); each cell once, whatever the duplicates in the suite. ``Plan.suite``
    is the suite with its sweeps expanded (:func:`expand_sweeps`): what the run and the records use."""
    suite = expand_sweeps(suite)
    validate_suite(suite)
    dataset = open_dataset(suite)
    evaluated = evaluated_categories(suite, dataset)
    adapters = {m: registry.get(m) for m in suite.methods}
    sampler = SupportSampler(suite.seed, suite.support_lists)
    for c in evaluated:  # fail now, not after hours: every split readable, every k possible
        split = dataset.split(c)
        for k in suite.k:  # a fixed list: every run's entry and file hashes too
            for run in range(suite.runs if sampler.lists is not None else 1):
                sampler.support(split, k, run)
    aggregated = any(cls.protocol == "aggregated" for cls in adapters.values())
    verify_readable(dataset, None if aggregated else evaluated)  # aggregated fits read every category
    train_ds = None
    if any(cls.protocol == "cross-dataset" for cls in adapters.values()):
        train_ds = open_train_dataset(suite)
        if train_ds.root.resolve() == dataset.root.resolve():
            raise FsadError(
                f"train_dataset of suite {suite.name!r} is the evaluated dataset ({dataset.root}); "
                f"cross-dataset methods must train on another one"
            )
        for c in train_ds.categories:
            if not any(s.label for s in train_ds.split(c).test):
                raise FsadError(f"training dataset {train_ds.root}: category {c!r} has no anomalous test images")
        verify_readable(train_ds)
    cells: dict[str, Cell] = {}
    memo: dict[str, str] = {}
    for m, cls in adapters.items():
        for c in evaluated:
            h = config_hash(suite, m, c, dataset, train_ds, memo)
            shared = cls.protocol in ("aggregated", "cross-dataset")
            fh = config_hash(suite, m, c, dataset, train_ds, memo, fit_only=True) if shared else ""
            for t in train_seeds_of(cls.protocol, suite.train_seeds_for(m)):
                for k in suite.k:
                    for r in range(suite.runs):
                        cell = Cell(m, cls.protocol, dataset.name, c, k, r, h, t, fh)
                        cells.setdefault(cell.cell_id, cell)
    return Plan(suite, dataset, list(cells.values()), adapters, train_ds)


def groups_of(cells: list[Cell]) -> dict[tuple[str, str], list[Cell]]:
    """Cells by (method, category), in their order: the unit a worker runs."""
    out: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        out.setdefault((c.method, c.category), []).append(c)
    return out


def cell_status(suite: Suite, cells: list[Cell], store: ResultStore) -> dict[str, list]:
    """Cells of the suite by state: ``done`` (record present), ``todo`` (none), ``stale`` (a todo cell
    whose (method, category, k, run, train seed) has a record of another configuration: code, data, options,
    weights, ... changed since); ``foreign``: records of no current cell."""
    ids = {c.cell_id for c in cells}
    done = store.done_ids()
    old = {}
    for p in store.cells.glob("*.json") if store.cells.is_dir() else []:
        if p.stem not in ids:
            try:
                r = json.loads(p.read_text())
                old[(r.get("method"), r.get("category"), r.get("k"), r.get("run"), r.get("train_seed", 0))] = p.stem
            except (OSError, json.JSONDecodeError):
                pass
    todo = [c for c in cells if c.cell_id not in done]
    return {
        "done": [c for c in cells if c.cell_id in done],
        "todo": todo,
        "stale": [c for c in todo if (c.method, c.category, c.k, c.run, c.train_seed) in old],
        "foreign": sorted(set(done) - ids),
    }
