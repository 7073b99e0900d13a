"""Protocols (which images reach ``fit``) and benchmark suites (the ``*.toml`` files here).

Protocols:

* ``aggregated`` — leave-one-category-out: train on the train/good images of every other
  category of the dataset, adapt on the target's k shots, no fine-tuning;
* ``individual`` — train on the target category's k support images only;
* ``training-free`` — no training at all (``gaussian``, ``random``);
* ``cross-dataset`` — train once on another dataset (InCTRL's generalist setting).

A suite is dataset × categories × methods × k values × runs × training seeds (each method
runs under its own protocol); see ``demo.toml`` for every key. ``train_seeds`` repeats every
training (an aggregated / cross-dataset fit, an individual method's fit on the support set)
with that many seeds, so the tables' error bars cover training noise as well as the
support-set draw; training-free methods (nothing trained) run training seed 0 only.

A ``[sweep.<method>]`` table (option -> list of values; several options: every combination)
runs the method once per value as a method *variant* of its own, ``<method>@<option>=<value>``
(:func:`fsad_bench.registry.variant_name`; expanded by :func:`fsad_bench.run.plan.expand_sweeps`),
on the same support sets and with the method's training seeds; see ``calibrate_cpu.toml``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from fsad_bench.errors import FsadError

if TYPE_CHECKING:  # loading a suite imports no torch (the CLI reports a bad suite within its start-up time)
    import torch

    from fsad_bench.adapter import TrainSet
    from fsad_bench.data.dataset import Dataset


def training_data(
    protocol: str,
    dataset: Dataset,
    target: str,
    support: torch.Tensor,
    image_size: int,
    image_cache: str | Path | None = None,
    resize: str = "bilinear",
) -> TrainSet | None:
    """The images a method of ``protocol`` may train on when ``target`` is evaluated.

    The held-out ``target``'s test images never appear; under ``aggregated`` none of its
    images do, under ``individual`` only its support images (``(K, 3, S, S)``); under
    ``cross-dataset`` ``dataset`` is the suite's training dataset (all of it, with labels).
    ``image_size`` is the adapter's input size; ``image_cache``: folder of the decoded-image
    cache (:mod:`fsad_bench.data.image_cache`), None = decode the originals on every access;
    ``resize``: the adapter's resize filter (:attr:`~fsad_bench.adapter.Adapter.resize_filter`).
    """
    from fsad_bench.adapter import PROTOCOLS
    from fsad_bench.data.image_cache import CachedImageFiles
    from fsad_bench.data.torch_datasets import ImageFiles, LabelledImages, TensorImages

    files = (
        partial(ImageFiles, resize=resize)
        if image_cache is None
        else partial(CachedImageFiles, cache=image_cache, resize=resize)
    )
    if protocol == "aggregated":
        others = [c for c in dataset.categories if c != target]
        if not others:
            raise FsadError(f"the aggregated protocol needs at least 2 categories in {dataset.root}")
        return {c: files(dataset.split(c).train, image_size) for c in others}
    if protocol == "individual":
        return {target: TensorImages(support)}
    if protocol == "training-free":
        return None
    if protocol == "cross-dataset":  # ``dataset`` is the suite's training dataset, never the target one
        out = {}
        for c in dataset.categories:
            split = dataset.split(c)
            out[c] = LabelledImages(
                list(split.train) + [s.path for s in split.test],
                [0] * len(split.train) + [s.label for s in split.test],
                image_size,
                resize,
            )
            if image_cache is not None:
                out[c].images = files(out[c].images.paths, image_size)
        return out
    raise FsadError(f"protocol {protocol!r} is not run by the run layer (known: {', '.join(PROTOCOLS)})")


SUITE_KEYS = {
    "name",
    "description",
    "dataset",
    "data_root",
    "categories",
    "methods",
    "k",
    "runs",
    "seed",
    "image_size",
    "weights",
    "preset",
    "train_seeds",
    "options",
    "synthetic",
    "support_lists",
    "train_dataset",
    "train_data_root",
    "train_categories",
    "train_synthetic",
    "arch",
    "layout",
    "folder",
    "operating_point",
    "sweep",
    "test_subset",
}


@dataclass
class Suite:
    """A benchmark suite: what to run. Every field has a TOML key of the same name."""

    name: str
    dataset: str
    methods: list[str]
    k: list[int]
    runs: int = 10
    seed: int = 0
    #: training seeds per trained method (aggregated / cross-dataset fits, individual fits): one
    #: number, or a table ``{ default = 3, "tdg+" = 5 }`` giving chaotic trainings more seeds;
    #: training-free methods run training seed 0 only.
    train_seeds: int | dict[str, int] = 1
    image_size: int = 224
    weights: str = "auto"
    preset: str = "cpu"
    #: one folder, or several whose categories are pooled into one dataset
    data_root: str | list[str] | None = None
    categories: list[str] = field(default_factory=list)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    synthetic: dict[str, int] = field(default_factory=dict)
    support_lists: str | None = None
    description: str = ""
    #: cross-dataset methods train on this dataset (name, folder, categories, synthetic parameters).
    train_dataset: str | None = None
    train_data_root: str | None = None
    train_categories: list[str] = field(default_factory=list)
    train_synthetic: dict[str, int] = field(default_factory=dict)
    #: backbone architecture of every method with an ``arch`` option (None: each method's default)
    arch: str | None = None
    #: data layout: auto (VisA when split_csv/1cls.csv exists, else MVTec) | mvtec | visa | folder
    layout: str = "auto"
    #: sub-folders of the ``folder`` layout (normal_dir, abnormal_dir, mask_dir, normal_test_dir, ...)
    folder: dict[str, Any] = field(default_factory=dict)
    #: the label-free operating point (leave-one-out support scores, fsad_bench.run.operating_point):
    #: None = every method but the individual ones (whose k extra adaptations are k extra trainings)
    operating_point: bool | None = None
    #: method -> option -> values: the method runs once per value (several options: per combination),
    #: each a variant ``method@option=value`` of its own (:func:`check_sweep`)
    sweep: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    #: score each category on at most this many test images, a seeded stratified subset identical for
    #: every method (:func:`fsad_bench.data.sampler.subsample_test`); None = every test image
    test_subset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def train_seeds_for(self, method: str) -> int:
        """Training seeds of ``method``: its entry of a ``train_seeds`` table (a variant
        ``base@option=value``: its own entry, else its base method's), else ``default`` (1 when the
        table has none), or the single number."""
        if isinstance(self.train_seeds, dict):
            base = method.partition("@")[0]
            return self.train_seeds.get(method, self.train_seeds.get(base, self.train_seeds.get("default", 1)))
        return self.train_seeds


def builtin_suites() -> list[str]:
    """Names of the suites shipped in this package."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))


def load_suite(name_or_path: str) -> Suite:
    """Load a shipped suite by name (``demo``) or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FsadError(f"suite file {path} does not exist")
        text, source = path.read_text(), str(path)
    else:
        res = resources.files(__name__) / f"{name_or_path}.toml"
        if not res.is_file():
            raise FsadError(
                f"unknown suite {name_or_path!r} (built-in: {', '.join(builtin_suites())}; or a .toml path)"
            )
        text, source = res.read_text(), f"{name_or_path}.toml"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise FsadError(f"cannot parse suite {source}: {err}") from None
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise FsadError(f"suite {source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(SUITE_KEYS))})")
    for key in ("name", "dataset", "methods", "k"):
        if key not in raw:
            raise FsadError(f"suite {source}: missing key {key!r}")
    raw = check_types(raw, f"suite {source}")
    bad = sorted(set(raw.get("options", {})) - set(raw["methods"]))
    if bad:
        raise FsadError(
            f"suite {source}: [options.{bad[0]}] names no method of this suite (methods: {', '.join(raw['methods'])})"
        )
    seeds = raw.get("train_seeds")
    bad = sorted(set(seeds) - set(raw["methods"]) - {"default"}) if isinstance(seeds, dict) else []
    if bad:
        raise FsadError(
            f"suite {source}: train_seeds names {bad[0]!r}, which is not a method of this suite "
            f"(methods: {', '.join(raw['methods'])}; or 'default')"
        )
    check_sweep(raw.get("sweep", {}), raw.get("options", {}), f"suite {source}", raw["methods"])
    suite = Suite(**raw)
    validate_numbers(suite, f"suite {source}")
    apply_arch(suite)
    return suite


def apply_arch(suite: Suite, override: bool = False) -> None:
    """Copy ``suite.arch`` into ``suite.options[m]["arch"]`` of every method ``m`` whose presets
    have an ``arch`` (methods with a torchvision backbone); an explicit per-method option wins
    unless ``override`` (the CLI's ``--arch``)."""
    if not suite.arch:
        return
    from fsad_bench import registry

    for m in suite.methods:
        if "arch" in suite.sweep.get(m, {}):  # a sweep over the architecture: its values, not the suite's
            continue
        if any("arch" in p for p in registry.get(m).presets.values()):
            opts = suite.options.setdefault(m, {})
            if override or "arch" not in opts:
                opts["arch"] = suite.arch


#: TOML type of every suite key: "str", "int", "bool", "str-list", "int-list", "str-or-str-list" (one string or a
#: list of them, kept as given), "int-table" (name -> int), "int-or-int-table", "table" (any table),
#: "options" (method -> table of option values), "sweep" (method -> table of option -> list of values). A list key also takes a single value (``k = 2``
#: is ``k = [2]``, ``categories = "washer"`` is ``["washer"]``); repeated list entries are dropped.
SUITE_TYPES = {
    "name": "str",
    "description": "str",
    "dataset": "str",
    "data_root": "str-or-str-list",
    "categories": "str-list",
    "methods": "str-list",
    "k": "int-list",
    "runs": "int",
    "seed": "int",
    "image_size": "int",
    "weights": "str",
    "preset": "str",
    "options": "options",
    "synthetic": "int-table",
    "support_lists": "str",
    "train_dataset": "str",
    "train_data_root": "str",
    "train_categories": "str-list",
    "train_synthetic": "int-table",
    "train_seeds": "int-or-int-table",
    "arch": "str",
    "layout": "str",
    "folder": "table",
    "operating_point": "bool",
    "sweep": "sweep",
    "test_subset": "int",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_types(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Check every key's TOML type (see :data:`SUITE_TYPES`); FsadError naming the key and ``source``.
    Returns the values normalised (single values of list keys wrapped, duplicates dropped)."""
    out = dict(raw)
    for key, value in raw.items():
        kind = SUITE_TYPES.get(key)

        def fail(expected: str, key: str = key, value: Any = value) -> None:
            raise FsadError(f"{source}: key {key!r} must be {expected}, got {value!r} ({type(value).__name__})")

        if kind == "str" and not isinstance(value, str):
            fail("a string")
        elif kind == "bool" and not isinstance(value, bool):
            fail("true or false")
        elif kind == "int" and not _is_int(value):
            fail("an integer")
        elif kind in ("str-list", "int-list"):
            one = (lambda v: isinstance(v, str)) if kind == "str-list" else _is_int
            items = [value] if one(value) else value
            if not isinstance(items, list) or not all(one(v) for v in items):
                fail("a list of strings" if kind == "str-list" else "a list of integers")
            out[key] = list(dict.fromkeys(items))
        elif kind == "str-or-str-list":
            if not (
                isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
            ):
                fail("a string or a non-empty list of strings")
        elif kind == "table" and not isinstance(value, dict):
            fail("a table")
        elif kind == "int-table":
            if not isinstance(value, dict) or not all(_is_int(v) for v in value.values()):
                fail("a table of integers")
        elif kind == "int-or-int-table":
            if not (_is_int(value) or (isinstance(value, dict) and all(_is_int(v) for v in value.values()))):
                fail('an integer or a table of integers ({ default = 3, "tdg+" = 5 })')
        elif kind == "options":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                fail("a table of per-method tables ([options.<method>] name = value)")
        elif kind == "sweep":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                fail("a table of per-method tables ([sweep.<method>] option = [value, ...])")
    return out


def check_sweep(sweep: dict[str, Any], options: dict[str, Any], source: str, methods: list[str] | None = None) -> None:
    """FsadError (one line) unless ``sweep`` is ``{method: {option: [value, ...]}}`` with every list
    non-empty, no option also fixed in ``[options.<method>]`` (which value would run?), and, with
    ``methods``, every swept method one of them. Option names and value types are checked against
    the adapter when the suite is planned (:func:`fsad_bench.run.plan.expand_sweeps`)."""
    if not isinstance(sweep, dict) or not all(isinstance(t, dict) for t in sweep.values()):
        raise FsadError(
            f"{source}: sweep must be a table of per-method tables ([sweep.<method>] option = [value, ...])"
        )
    for m, table in sweep.items():
        if methods is not None and m not in methods:
            raise FsadError(f"{source}: [sweep.{m}] names no method of this suite (methods: {', '.join(methods)})")
        if not table:
            raise FsadError(f"{source}: [sweep.{m}] is empty (give option = [value, ...])")
        for key, values in table.items():
            if not isinstance(values, list) or not values:
                raise FsadError(f"{source}: [sweep.{m}] {key} must be a non-empty list of values, got {values!r}")
            if key in (options.get(m) or {}):
                raise FsadError(
                    f"{source}: option {key!r} of {m!r} is both swept ([sweep.{m}]) and fixed ([options.{m}]); keep one"
                )


def validate_numbers(suite: Suite, source: str = "suite") -> None:
    """Check the suite's numeric fields (after CLI overrides too)."""
    if not suite.methods:
        raise FsadError(f"{source}: no methods given")
    suite.methods = list(dict.fromkeys(suite.methods))  # --methods a,a / --k 2,2 run once
    suite.k = list(dict.fromkeys(suite.k))
    suite.categories = list(dict.fromkeys(suite.categories))
    if not suite.k or any((not isinstance(k, int)) or k < 1 for k in suite.k):
        raise FsadError(f"{source}: k must be a list of positive integers, got {suite.k}")
    if suite.runs < 1:
        raise FsadError(f"{source}: runs must be >= 1, got {suite.runs}")
    if suite.test_subset is not None and suite.test_subset < 2:
        raise FsadError(f"{source}: test_subset must be >= 2 test images per category, got {suite.test_subset}")
    seeds = suite.train_seeds if isinstance(suite.train_seeds, dict) else {"default": suite.train_seeds}
    for name, n in seeds.items():
        if not _is_int(n) or n < 1:
            raise FsadError(
                f"{source}: train_seeds must be an integer >= 1, got {n!r}"
                + (f" for {name!r}" if isinstance(suite.train_seeds, dict) else "")
            )
    if suite.image_size < 32:
        raise FsadError(f"{source}: image_size must be >= 32, got {suite.image_size}")
