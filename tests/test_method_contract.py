"""One contract for every registered method (like scikit-learn's ``check_estimator``).

Each method of :func:`fsad_bench.registry.available` runs the life of a benchmark cell at tiny
settings (:data:`TINY`), seeded the way the run layer seeds it (``fsad_bench.run.cell``):
``torch.manual_seed(seed)`` then ``AdapterConfig(seed=seed)``, ``fit`` on
:func:`~fsad_bench.protocols.training_data` of the synthetic dataset, ``torch.manual_seed(cell seed)``,
``adapt`` on support images, ``predict`` on test images at the adapter's input size. Checked:

* ``predict``: scores ``(N,)`` and maps ``(N, S, S)``, floating point, finite, ``S`` = input size;
* the same seed gives bit-identical scores and maps;
* methods with a shared fit (aggregated, cross-dataset): ``state_dict`` -> a fresh adapter's ``load_state_dict`` -> identical scores;
* ``label``: a non-empty string starting with the method's name;
* every preset passes ``check_options`` and the declared ``option_constraints``; an unknown
  option is an ``FsadError``.

Methods whose optional packages or required weights are missing are skipped with a reason naming them.
Adapters are reached through ``registry.get`` only (never by importing a method module).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fsad_bench import registry
from fsad_bench.adapter import AdapterConfig, accepts, describe
from fsad_bench.data.images import load_images
from fsad_bench.data.mvtec import MVTecDataset
from fsad_bench.errors import FsadError
from fsad_bench.protocols import training_data

SIZE = 64  # the suite's image size (synthetic images of conftest.synth_root are 64 px)
SEED = 3
CELL_SEED = 11
#: Protocols whose fitted state the run layer caches (``state_dict`` -> ``load_state_dict`` into a fresh
#: adapter); an ``individual`` fit is part of every cell and never cached.
CACHED = ("aggregated", "cross-dataset")

#: Option overrides per method that make one fit + adapt + predict take well under a second or two
#: on one core (1 epoch / a few iterations, small networks, 64 px input). Methods not listed
#: (third-party entry points) run their ``cpu`` preset unchanged.
REGAD = {"epochs": 1, "batch_size": 4, "max_queries_per_category": 4, "infer_batch": 8}
DIFFNET = {
    "img_size": 64,
    "n_scales": 1,
    "n_coupling_blocks": 2,
    "fc_internal": 32,
    "meta_epochs": 1,
    "sub_epochs": 1,
    "n_transforms": 2,
    "n_transforms_test": 2,
    "feature_pool": 4,
    "batch_size": 8,
}
TDG = {"niter": 2, "transforms_per_step": 2}
TINY: dict[str, dict] = {
    "random": {},
    "gaussian": {},
    "patchcore": {"arch": "resnet18"},
    "regad": REGAD,
    "regad-l": REGAD,
    "diffnet": DIFFNET,
    "diffnet+": {**DIFFNET, "finetune_epochs": 1},
    "tdg": TDG,
    "tdg+": {**TDG, "pretrain_niter": 2, "pretrain_batch": 2, "pretrain_images_per_category": 2, "adapt_niter": 2},
    "inctrl": {"clip_model": "tiny", "epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "train_shots": 2},
    "anomalib:Patchcore": {"arch": "resnet18"},
}

#: Optional packages a method needs (import names), by name or by "prefix:".
NEEDS: dict[str, tuple[str, ...]] = {
    "inctrl": ("open_clip",),
    "anomalib:": ("anomalib",),
    "anomalib:WinClip": ("anomalib", "open_clip"),
}
#: Shown (and skipped) when the anomalib extra is absent, so a run says what it did not check.
ANOMALIB_PLACEHOLDER = "anomalib:*"


def method_names() -> list[str]:
    names = registry.available()
    if not any(n.startswith("anomalib:") for n in names):
        names.append(ANOMALIB_PLACEHOLDER)
    return names


def missing_packages(name: str) -> list[str]:
    needed = NEEDS.get(name) or next((v for k, v in NEEDS.items() if k.endswith(":") and name.startswith(k)), ())
    return [m for m in needed if importlib.util.find_spec(m) is None]


#: methods whose tiny contract run still takes tens of seconds on 2 cores: checked in the slow tier
SLOW_METHODS = {"regad"}


@pytest.fixture(params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW_METHODS else n for n in method_names()])
def name(request) -> str:
    n = request.param
    missing = missing_packages(n)
    if n == ANOMALIB_PLACEHOLDER:
        pytest.skip("anomalib:* methods not listed: package anomalib missing (pip install 'fsad-bench[anomalib]')")
    if missing:
        pytest.skip(f"{n} needs package(s) {', '.join(missing)}, not installed")
    return n


@pytest.fixture(scope="module")
def dataset(synth_root) -> MVTecDataset:
    return MVTecDataset(synth_root)


def make(name: str, seed: int = SEED):
    """The adapter as the run layer builds it: torch seeded first, then the config with that seed."""
    torch.manual_seed(seed)
    config = AdapterConfig(weights="none", image_size=SIZE, seed=seed, options=TINY.get(name, {}))
    try:
        return registry.get(name)(config)
    except FsadError as err:  # weights that must exist even for weights = "none" (anomalib's WinClip)
        if "not cached" in str(err):
            pytest.skip(f"{name}: weights missing: {err}")
        raise


def cell_data(adapter, dataset: MVTecDataset) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Input size, support images ``(2, 3, s, s)`` and test images ``(3, 3, s, s)`` of the held-out category."""
    size = adapter.input_size or SIZE
    split = dataset.split(dataset.categories[0])
    return size, load_images(split.train[:2], size), load_images([s.path for s in split.test[-3:]], size)


def fit(adapter, dataset: MVTecDataset, support: torch.Tensor, size: int) -> None:
    if adapter.protocol == "training-free":
        return
    target = "" if adapter.protocol == "cross-dataset" else dataset.categories[0]
    torch.manual_seed(SEED + 1)
    adapter.fit(training_data(adapter.protocol, dataset, target, support, size))


def adapt_predict(adapter, dataset: MVTecDataset, support: torch.Tensor, images: torch.Tensor):
    torch.manual_seed(CELL_SEED)
    adapter.category = dataset.categories[0]
    adapter.adapt(support)
    return adapter.predict(images)


def run_cell(name: str, dataset: MVTecDataset):
    """(adapter, input size, support, test images, scores, maps) of one cell from scratch."""
    a = make(name)
    size, support, images = cell_data(a, dataset)
    fit(a, dataset, support, size)
    scores, maps = adapt_predict(a, dataset, support, images)
    return a, size, support, images, scores, maps


def test_predict_shapes_finite_and_deterministic(name, dataset):
    a, size, support, images, scores, maps = run_cell(name, dataset)
    n = len(images)
    assert isinstance(scores, torch.Tensor) and isinstance(maps, torch.Tensor)
    assert scores.shape == (n,) and maps.shape == (n, size, size), (tuple(scores.shape), tuple(maps.shape))
    assert scores.dtype.is_floating_point and maps.dtype.is_floating_point
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()
    # the same seed repeats the cell bit for bit
    _, _, _, _, scores2, maps2 = run_cell(name, dataset)
    assert torch.equal(scores, scores2) and torch.equal(maps, maps2)

    if a.protocol not in CACHED:
        return
    # the trained state round-trips into a fresh adapter (the run layer's model cache)
    b = make(name)
    b.load_state_dict(a.state_dict())
    s_loaded, m_loaded = adapt_predict(b, dataset, support, images)
    assert torch.equal(s_loaded, scores) and torch.equal(m_loaded, maps)
    # ... and the loaded state is what made them equal
    c = make(name)
    assert not torch.equal(adapt_predict(c, dataset, support, images)[0], scores)


def test_label_starts_with_the_name(name):
    a = make(name)
    assert isinstance(a.label, str) and a.label.startswith(name), a.label


def test_presets_satisfy_the_declared_options(name):
    cls = registry.get(name)
    assert "cpu" in cls.presets
    for preset, values in cls.presets.items():
        cls.check_options(values, f"preset {preset!r}")
        for key, constraints in cls.option_constraints.items():
            if key in values:
                assert any(accepts(c, values[key]) for c in constraints), (
                    f"preset {preset!r}: {key}={values[key]!r} is not {' or '.join(map(describe, constraints))}"
                )
        cls.check_hparams(cls.resolve_hparams(preset))  # its options work together too
    cls.check_options(TINY.get(name, {}), "tiny test settings")
    with pytest.raises(FsadError, match="unknown option 'no_such_option'"):
        cls.check_options({"no_such_option": 1})


def _changed(value):
    """Another value of an option, for the adapt-only check (ints and floats: one more)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AssertionError(f"no other value known for {value!r}: extend _changed")
    return value + 1


def test_adapt_only_options_do_not_change_the_fit(name, dataset):
    """Variants that differ only in ``adapt_only_options`` share one trained model (the run layer's fit
    key leaves them out): fitted with another value of each, the trained state is the same."""
    cls = registry.get(name)
    if not cls.adapt_only_options:
        pytest.skip(f"{name} declares no adapt-only options")
    assert cls.protocol in CACHED, "adapt-only options matter only to a shared (cached) fit"
    a = make(name)
    size, support, _ = cell_data(a, dataset)
    fit(a, dataset, support, size)
    hp = a.hparams
    torch.manual_seed(SEED)
    options = {**TINY.get(name, {}), **{o: _changed(hp[o]) for o in cls.adapt_only_options}}
    b = cls(AdapterConfig(weights="none", image_size=SIZE, seed=SEED, options=options))
    fit(b, dataset, support, size)
    sa, sb = a.state_dict(), b.state_dict()

    def flat(state, prefix=""):
        if isinstance(state, torch.Tensor):
            return {prefix: state}
        if isinstance(state, dict):
            return {k: v for key, val in state.items() for k, v in flat(val, f"{prefix}/{key}").items()}
        return {prefix: state}

    fa, fb = flat(sa), flat(sb)
    assert fa.keys() == fb.keys()
    for key in fa:
        va, vb = fa[key], fb[key]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, key
