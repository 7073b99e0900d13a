"""Protocol engine: expands a suite into cells and runs them.

A *cell* is (method, protocol, dataset, category, k, run, train seed). Cells are grouped by
(method, category): an ``aggregated`` method trains once per (held-out category, train seed)
(or loads that training from the model cache) and the fit is reused by every k and run; an
``individual`` method trains on each cell's support set, with a seed that includes the train
seed; a ``training-free`` one never trains and runs train seed 0 only. Every finished cell
becomes one record in the :class:`~fsad_bench.records.store.ResultStore`.

Images: each adapter gets its support, test and training images at its own
:attr:`~fsad_bench.adapter.Adapter.input_size` (default: the suite's ``image_size``), decoded
from the original files through a per-resolution disk cache (:mod:`fsad_bench.data.image_cache`);
its maps are resized to the suite's ``image_size``, where the masks are, before pixel metrics.
Test images are streamed in batches, so memory does not grow with the test set beyond its
scores, maps and masks at the suite's size.

Timing fields of a record: ``adapt_seconds`` (support -> normal model; an individual method's
training included), ``train_seconds`` (the fit; an aggregated fit's seconds as first measured,
even when loaded from the model cache), ``infer_seconds_per_image`` (cold: the first test batch
with every feature cache bypassed — what a new image costs) and
``infer_warm_seconds_per_image`` (the whole test pass, reusing test features cached by earlier
cells); image decoding is never timed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import resource
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
import torch.nn.functional as F
import torchvision

from fsad_bench import __version__, registry
from fsad_bench.adapter import AdapterConfig
from fsad_bench.data.dataset import Dataset
from fsad_bench.data.images import load_mask
from fsad_bench.data.integrity import verify_readable
from fsad_bench.data.roots import open_data_root
from fsad_bench.data.synthetic import generate
from fsad_bench.components.feature_cache import CachedBackbone
from fsad_bench.data.image_cache import load_cached_images
from fsad_bench.errors import FsadError
from fsad_bench.components.backbone import check_weights_argument
from fsad_bench.identity import code_fingerprint, tree_fingerprint, weights_fingerprint
from fsad_bench.run.peak_memory import frozen_gc, peak_rss_mb, reset_peak_rss
from fsad_bench.metrics import evaluate
from fsad_bench.data.sampler import SupportSampler
from fsad_bench.seeding import stable_seed
from fsad_bench.records.store import ResultStore, save_example_maps
from fsad_bench.records.tracking import after_record
from fsad_bench.protocols import Suite, training_data  # noqa: E402  (fsad_bench.protocols = top-level protocols/)

PREDICT_BATCH = 32  # test images per predict call (amortises per-call model traffic)


def cache_dir() -> Path:
    """Where synthetic data and trained models are cached (``$FSAD_BENCH_CACHE`` or ~/.cache/fsad_bench;
    an empty ``$FSAD_BENCH_CACHE`` counts as unset, not as the current folder)."""
    return Path(os.environ.get("FSAD_BENCH_CACHE") or Path.home() / ".cache" / "fsad_bench").expanduser()


def pick_device(requested: str | None) -> str:
    """``cuda`` when present (or asked for), else ``cpu``; FsadError (one line) for an unknown device
    or a cuda device torch does not see."""
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(requested)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise FsadError(f"unknown --device {requested!r} (valid: auto, cpu, cuda, cuda:N, mps)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FsadError(f"--device {requested} asked for, but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FsadError(f"--device {requested}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise FsadError(f"--device {requested} asked for, but torch sees no MPS device")
    return requested


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

    @property
    def cell_id(self) -> str:
        key = (f"{self.method}|{self.protocol}|{self.dataset}|{self.category}|{self.k}|{self.run}|{self.config_hash}"
               f"|t{self.train_seed}")
        name = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{self.method}-{self.category}")  # `anomalib:Padim`: no ':' in file names
        return f"{name}-k{self.k}-r{self.run}-t{self.train_seed}-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def train_seeds_of(protocol: str, train_seeds: int) -> range:
    """Training seeds a method of ``protocol`` runs: ``range(train_seeds)``, or just 0 for a
    training-free method (nothing is trained, so another seed would only repeat the numbers)."""
    return range(1) if protocol == "training-free" else range(train_seeds)


def adapter_seed(suite_seed: int, train_seed: int) -> int:
    """``config.seed`` of a shared (aggregated / cross-dataset / training-free) adapter: the
    suite seed for train seed 0 (the numbers of a single-seed suite stay as they were), a
    derived one for every other train seed."""
    return suite_seed if train_seed == 0 else stable_seed("train", suite_seed, train_seed) % 2**31


def _with_train_seed(parts: tuple, train_seed: int) -> tuple:
    return (*parts, f"t{train_seed}") if train_seed else parts


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
        return open_data_root(suite.dataset, root, categories, f"suite {suite.name!r} needs --data-root DIR",
                              layout=suite.layout, folder=suite.folder)

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
        raise FsadError(f"suite {suite.name!r} has a cross-dataset method but no train_dataset "
                        f"(e.g. train_dataset = \"mvtec\" and train_data_root = \"/data/mvtec\")")
    root = synthetic_root(suite.train_dataset, suite.train_data_root, suite.train_synthetic)
    return open_data_root(suite.train_dataset, root, suite.train_categories,
                          f"suite {suite.name!r} needs train_data_root = DIR")


def validate_suite(suite: Suite) -> None:
    """Presets, option names and option value types against the adapters (FsadError listing what is
    valid), before anything is computed. A preset must exist in at least one of the suite's methods;
    a method without it runs its ``cpu`` preset (single-configuration methods like ``gaussian``)."""
    classes = {m: registry.get(m) for m in suite.methods}
    check_weights_argument(str(suite.weights or "auto"), suite.arch)
    presets = sorted({p for cls in classes.values() for p in cls.presets})
    if suite.preset not in presets:
        raise FsadError(f"unknown preset {suite.preset!r} (valid for {', '.join(classes)}: {', '.join(presets)})")
    for m, opts in suite.options.items():
        if m not in classes and m not in registry.available():
            raise FsadError(f"suite {suite.name!r}: [options.{m}] names no registered method "
                            f"(suite methods: {', '.join(classes)})")
        if not isinstance(opts, dict):
            raise FsadError(f"suite {suite.name!r}: [options.{m}] must be a table of option = value")
        (classes.get(m) or registry.get(m)).check_options(opts, f"[options.{m}] of suite {suite.name!r}")


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


def config_hash(suite: Suite, method: str, category: str | None = None, dataset: Dataset | None = None,
                train_dataset: Dataset | None = None, memo: dict[str, str] | None = None) -> str:
    """Hash of everything that changes a method's numbers on ``category`` besides (k, run):

    the resolved hyper-parameters (preset values + options, and the preset that supplied them), the
    code (:func:`~fsad_bench.identity.code_fingerprint`: the adapter's module and the fsad_bench
    modules it and the engine import), the weights' content, image size, seed, the support lists'
    content, and the data's identity (folder, file list, sizes, mtimes; no image is read): the
    category's own folder, every category's for ``aggregated`` methods, the training dataset's for
    ``cross-dataset`` ones. Part of every cell id and of the trained-model cache key."""
    cls = registry.get(method)
    memo = {} if memo is None else memo
    options = suite.options.get(method, {})
    wkey = f"weights|{suite.weights}"
    if wkey not in memo:  # one hash of the weights per plan
        memo[wkey] = weights_fingerprint(suite.weights, cache_dir())
    payload: dict[str, Any] = {
        # the resolved values, not the preset's name: presets with equal values give equal numbers
        "method": method, "hparams": cls.resolve_hparams(suite.preset, options), "code": code_fingerprint(cls),
        "weights": memo[wkey], "image_size": suite.image_size,
        "seed": suite.seed,
        "synthetic": suite.synthetic if suite.dataset == "synthetic" else None,
        "support_lists": Path(suite.support_lists).read_text() if suite.support_lists else None,
    }
    if dataset is not None:
        cats = dataset.categories if cls.protocol == "aggregated" or category is None else [category]
        payload["data"] = {"name": dataset.name, "root": str(dataset.root.resolve()),
                           "files": _dataset_identity(dataset, cats, memo)}
    if cls.protocol == "cross-dataset":
        payload["train"] = {"dataset": suite.train_dataset, "root": suite.train_data_root,
                            "categories": suite.train_categories,
                            "synthetic": suite.train_synthetic if suite.train_dataset == "synthetic" else None}
        if train_dataset is not None:
            payload["train"]["files"] = _dataset_identity(train_dataset, train_dataset.categories, memo)
    text = json.dumps(payload, sort_keys=True, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan(suite: Suite) -> tuple[Dataset, list[Cell]]:
    """Validate the suite against the adapters and the data (every header opened) and expand it into
    cells (nothing is computed); each cell once, whatever the duplicates in the suite."""
    validate_suite(suite)
    dataset = open_dataset(suite)
    evaluated = evaluated_categories(suite, dataset)
    adapters = {m: registry.get(m) for m in suite.methods}
    sampler = SupportSampler(suite.seed, suite.support_lists)
    for c in evaluated:  # fail now, not after hours: every split readable, every k possible
        split = dataset.split(c)
        for k in suite.k:
            sampler.support(split, k, 0)
    aggregated = any(cls.protocol == "aggregated" for cls in adapters.values())
    verify_readable(dataset, None if aggregated else evaluated)  # aggregated fits read every category
    train_ds = None
    if any(cls.protocol == "cross-dataset" for cls in adapters.values()):
        train_ds = open_train_dataset(suite)
        if train_ds.root.resolve() == dataset.root.resolve():
            raise FsadError(f"train_dataset of suite {suite.name!r} is the evaluated dataset ({dataset.root}); "
                            f"cross-dataset methods must train on another one")
        for c in train_ds.categories:
            if not any(s.label for s in train_ds.split(c).test):
                raise FsadError(f"training dataset {train_ds.root}: category {c!r} has no anomalous test images")
        verify_readable(train_ds)
    cells: dict[str, Cell] = {}
    memo: dict[str, str] = {}
    for m, cls in adapters.items():
        for c in evaluated:
            h = config_hash(suite, m, c, dataset, train_ds, memo)
            for t in train_seeds_of(cls.protocol, suite.train_seeds_for(m)):
                for k in suite.k:
                    for r in range(suite.runs):
                        cell = Cell(m, cls.protocol, dataset.name, c, k, r, h, t)
                        cells.setdefault(cell.cell_id, cell)
    return dataset, list(cells.values())


def _reset_peak_memory(device: str) -> None:
    """Start a cell's memory measurement (definition: :mod:`fsad_bench.run.peak_memory`)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()


def _peak_memory_mb(device: str) -> float:
    """The cell's own peak: CUDA allocations on cuda, else the RSS high-water mark since the reset."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def versions() -> dict[str, str]:
    return {"fsad_bench": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "sklearn": sklearn.__version__, "python": platform.python_version()}


def input_size(adapter, suite: Suite) -> int:
    """Side of the square images ``adapter`` is given: its :attr:`~fsad_bench.adapter.Adapter.input_size`,
    else the suite's ``image_size``. Maps are resized back to the suite's size for the metrics."""
    return int(getattr(adapter, "input_size", None) or suite.image_size)


def image_cache_dir() -> Path:
    """Folder of the decoded-image cache (:mod:`fsad_bench.data.image_cache`)."""
    return cache_dir() / "images"


def _feature_caches(adapter) -> list[CachedBackbone]:
    """The adapter's frozen-backbone feature caches (attributes that are :class:`CachedBackbone`)."""
    return [v for v in vars(adapter).values() if isinstance(v, CachedBackbone)]


@contextmanager
def _cold_caches(adapter):
    """Within: the adapter's feature caches read nothing (features computed afresh, as for a new image)."""
    caches = _feature_caches(adapter)
    for c in caches:
        c.read_enabled = False
    try:
        yield
    finally:
        for c in caches:
            c.read_enabled = True


def _check_batch(adapter, s: torch.Tensor, m: torch.Tensor, n: int, side: int) -> None:
    if s.shape != (n,) or m.shape != (n, side, side):
        raise FsadError(f"{adapter.name}.predict returned scores {tuple(s.shape)} and maps {tuple(m.shape)} "
                        f"for {n} images of {side} px; expected ({n},) and ({n}, {side}, {side})")
    if not (torch.isfinite(s).all() and torch.isfinite(m).all()):
        raise FsadError(f"{adapter.name}.predict returned non-finite scores")


def _predict_batch(adapter, images: torch.Tensor, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    s, m = adapter.predict(images)
    s = torch.as_tensor(s).detach().float().cpu().reshape(-1)
    m = torch.as_tensor(m).detach().float().cpu()
    _check_batch(adapter, s, m, len(images), images.shape[-1])
    return s, m


def _to_size(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Maps ``(B, s, s)`` -> ``(B, size, size)`` (bilinear; unchanged when already that size)."""
    if maps.shape[-1] == size:
        return maps
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def predict_stream(adapter, paths: list[Path], size: int, out_size: int, device: str,
                   image_cache: str | Path | None = None, batch: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Predict the test images at ``paths``, loaded from disk ``batch`` at a time at ``size`` px.

    Memory holds one batch (``batch``, default :data:`PREDICT_BATCH`) of images and the outputs the metrics need: scores ``(N,)`` and
    maps ``(N, out_size, out_size)`` float32 (maps of another size are resized bilinearly).
    Returns (scores, maps, cold, warm) with two inference costs in seconds per image, image
    loading excluded:

    * ``cold`` — what a user pays for new images: the first batch predicted with every feature
      cache of the adapter bypassed (nothing read from it; methods without one: the first batch
      of the pass below);
    * ``warm`` — the whole test pass as the benchmark runs it, reusing test features that earlier
      cells of the same (method, category) cached (equal to cold up to noise without a cache).
    """
    n, batch = len(paths), batch or PREDICT_BATCH
    scores = np.empty(n, dtype=np.float32)
    maps = np.empty((n, out_size, out_size), dtype=np.float32)
    cold = None
    if _feature_caches(adapter) and n:  # an extra cold pass over the first batch (outputs discarded)
        first = load_cached_images(paths[:batch], size, image_cache)
        rng = torch.get_rng_state()
        with _cold_caches(adapter):
            _sync(device)
            t0 = time.perf_counter()
            _predict_batch(adapter, first, out_size)
            _sync(device)
            cold = (time.perf_counter() - t0) / len(first)
        torch.set_rng_state(rng)
        del first
    seconds = 0.0
    for i in range(0, n, batch):
        images = load_cached_images(paths[i : i + batch], size, image_cache)
        _sync(device)
        t0 = time.perf_counter()
        s, m = _predict_batch(adapter, images, out_size)
        _sync(device)
        dt = time.perf_counter() - t0
        seconds += dt
        if cold is None:
            cold = dt / len(images)
        scores[i : i + len(images)] = s.numpy()
        maps[i : i + len(images)] = _to_size(m, out_size).numpy()
    return scores, maps, float(cold or 0.0), seconds / max(n, 1)


def predict_all(adapter, images: torch.Tensor, device: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores ``(N,)``, maps ``(N, S, S)`` and seconds per image of images already in memory
    (kept for callers outside the engine; the engine streams with :func:`predict_stream`)."""
    scores, maps = [], []
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(images), PREDICT_BATCH):
        s, m = _predict_batch(adapter, images[i : i + PREDICT_BATCH], images.shape[-1])
        scores.append(s)
        maps.append(m)
    _sync(device)
    seconds = (time.perf_counter() - t0) / max(len(images), 1)
    return torch.cat(scores).numpy(), torch.cat(maps).numpy(), seconds


def load_masks(split, size: int) -> np.ndarray:
    """Ground-truth masks of a category's test images, ``(N, size, size)`` uint8 0/1 (1 byte a pixel),
    each checked against its image's size."""
    out = np.zeros((len(split.test), size, size), dtype=np.uint8)
    for i, s in enumerate(split.test):
        if s.mask_path is not None:
            out[i] = load_mask(s.mask_path, size, s.path).numpy() > 0.5
    return out


def fit_seed(suite: Suite, method: str, train_ds: Dataset, held_out: str, train_seed: int) -> int:
    """Seed of one aggregated / cross-dataset fit: (suite seed, train seed, method, dataset, held-out)."""
    return stable_seed("fit", *_with_train_seed((suite.seed, method, train_ds.name, held_out), train_seed))


def model_cache_path(method: str, protocol: str, preset: str, suite: Suite, train_ds: Dataset,
                     held_out: str, chash: str, train_seed: int = 0) -> Path:
    """Where the fit of ``method`` for ``held_out`` and ``train_seed`` is cached. ``chash`` (the
    cell's config hash) covers hyper-parameters, code, weights, data identity, image size and seed,
    and the fit seed enters the key, so a cached model is reused only for the configuration and
    training seed that trained it."""
    seed = fit_seed(suite, method, train_ds, held_out, train_seed)
    key = hashlib.sha256(f"{chash}|{train_ds.root.resolve()}|{','.join(train_ds.categories)}|fit{seed}"
                         .encode()).hexdigest()[:16]
    folder = train_ds.name if protocol == "aggregated" else f"cross-{train_ds.name}"
    return (cache_dir() / "models" / method / folder
            / f"{held_out or 'all'}-{preset}-s{suite.seed}-t{train_seed}-{key}.pt")


def _fit_cached(adapter, suite: Suite, train_ds: Dataset, held_out: str, chash: str,
                train_seed: int = 0) -> float:
    """Fit ``adapter`` (or load the fit from the model cache); returns training seconds.

    ``aggregated``: trains on every category of ``train_ds`` but ``held_out``;
    ``cross-dataset``: on all of ``train_ds`` (another dataset), ``held_out`` is "".
    Torch is seeded with :func:`fit_seed`; the cache key is :func:`model_cache_path`.
    Training images are loaded at the adapter's :func:`input_size`."""
    path = model_cache_path(adapter.name, adapter.protocol, adapter.preset_name, suite, train_ds, held_out, chash,
                            train_seed)
    if path.is_file():
        blob = torch.load(path, map_location=adapter.device, weights_only=False)
        adapter.load_state_dict(blob["state"])
        return float(blob["train_seconds"])
    torch.manual_seed(fit_seed(suite, adapter.name, train_ds, held_out, train_seed) % 2**63)
    train = training_data(adapter.protocol, train_ds, held_out, torch.empty(0), input_size(adapter, suite),
                          image_cache_dir())
    t0 = time.perf_counter()
    adapter.fit(train)
    seconds = time.perf_counter() - t0
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # parallel workers may fit the same model
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": adapter.state_dict(), "train_seconds": seconds}, tmp)
        os.replace(tmp, path)
    except OSError as err:  # a full or read-only cache costs a refit next time, not the run
        tmp.unlink(missing_ok=True)
        warnings.warn(f"cannot cache the trained model at {path}: {err.strerror or err}", stacklevel=1)
    return seconds


def run_group(suite: Suite, method: str, category: str, cells: list[Cell], out: str | Path,
              device: str, threads: int | None = None, on_cell: Callable[[Cell], None] | None = None,
              feature_cache: str | None = None) -> int:
    """Run the unfinished ``cells`` of one (method, category); returns how many were run.
    (What was alive before stays out of the per-cell garbage collections: :func:`frozen_gc`.)"""
    with frozen_gc():
        return _run_group(suite, method, category, cells, out, device, threads, on_cell, feature_cache)


def _run_group(suite: Suite, method: str, category: str, cells: list[Cell], out: str | Path,
               device: str, threads: int | None = None, on_cell: Callable[[Cell], None] | None = None,
               feature_cache: str | None = None) -> int:
    """Run the unfinished ``cells`` of one (method, category); returns how many were run.

    Cells run grouped by train seed: a shared (aggregated / cross-dataset) adapter is fitted (or
    loaded from the model cache) once per train seed. Test images are streamed from disk in
    batches at the adapter's input size (:func:`predict_stream`); only scores, maps at the
    suite's ``image_size`` and uint8 masks stay in memory. ``feature_cache``: folder where
    frozen-backbone features may be cached on disk."""
    if threads:
        torch.set_num_threads(threads)
    store = ResultStore(out)
    cells = sorted((c for c in cells if not store.has(c.cell_id)), key=lambda c: c.train_seed)
    if not cells:
        return 0
    cls = registry.get(method)
    dataset = open_dataset(suite)
    split = dataset.split(category)
    test_paths = [s.path for s in split.test]
    labels = np.array([s.label for s in split.test], dtype=np.int64)
    masks = load_masks(split, suite.image_size)
    images_cache = image_cache_dir()
    sampler = SupportSampler(suite.seed, suite.support_lists)

    def make(seed: int):
        torch.manual_seed(seed)
        return cls(AdapterConfig(device=device, weights=suite.weights, preset=suite.preset, seed=seed,
                                 image_size=suite.image_size, options=suite.options.get(method, {}),
                                 feature_cache=feature_cache))

    shared, shared_seed, train_seconds = None, None, 0.0
    for cell in cells:
        if cls.protocol != "individual" and cell.train_seed != shared_seed:
            shared = None  # the previous train seed's model goes before the next one is built
            shared, shared_seed = make(adapter_seed(suite.seed, cell.train_seed)), cell.train_seed
            if cls.protocol == "aggregated":
                train_seconds = _fit_cached(shared, suite, dataset, category, cell.config_hash, cell.train_seed)
            elif cls.protocol == "cross-dataset":
                train_seconds = _fit_cached(shared, suite, open_train_dataset(suite), "", cell.config_hash,
                                            cell.train_seed)
        support_paths = sampler.support(split, cell.k, cell.run)
        cell_seed = stable_seed("cell", *_with_train_seed((suite.seed, method, category, cell.k, cell.run),
                                                          cell.train_seed)) % 2**31
        _reset_peak_memory(device)
        if shared is None:  # individual: the training on the support set is part of adaptation
            adapter = make(cell_seed)
            size = input_size(adapter, suite)
            support = load_cached_images(support_paths, size, images_cache)
            train = training_data("individual", dataset, category, support, size)
            _sync(device)
            t0 = time.perf_counter()
            adapter.fit(train)
            _sync(device)
            train_seconds = time.perf_counter() - t0
        else:
            adapter = shared
            size = input_size(adapter, suite)
            support = load_cached_images(support_paths, size, images_cache)
            t0 = time.perf_counter()
        torch.manual_seed(cell_seed)
        adapter.category = category
        adapter.adapt(support.to(adapter.device))
        _sync(device)
        adapt_seconds = time.perf_counter() - t0
        del support
        scores, maps, infer_cold, infer_warm = predict_stream(adapter, test_paths, size, suite.image_size, device,
                                                              images_cache)
        record: dict[str, Any] = {
            "cell_id": cell.cell_id, "method": method, "label": adapter.label, "protocol": cls.protocol,
            "dataset": cell.dataset, "category": category, "k": cell.k, "run": cell.run,
            "train_seed": cell.train_seed,
            "train_dataset": suite.train_dataset if cls.protocol == "cross-dataset" else None,
            "preset": adapter.preset_name, "weights": adapter.weights_tag, "seed": suite.seed,
            "hparams": adapter.describe().get("hparams", {}),
            **evaluate(labels, scores, masks, maps),
            "adapt_seconds": adapt_seconds, "train_seconds": train_seconds,
            "infer_seconds_per_image": infer_cold, "infer_warm_seconds_per_image": infer_warm,
            "peak_memory_mb": _peak_memory_mb(device),
            "n_test": int(len(labels)), "n_support": len(support_paths),
            "support": [p.name for p in support_paths], "image_size": suite.image_size, "input_size": size,
            "config_hash": cell.config_hash, "device": device, "versions": versions(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "scores": scores.astype(np.float32).tolist(),  # per-image anomaly scores, float32 exactly (ROC curves)
            "labels": labels.astype(int).tolist(),          # per-image ground truth, 1 = anomalous
        }
        if cell.run == 0 and cell.k == max(suite.k) and cell.train_seed == 0:  # a few maps for the overlays
            save_example_maps(Path(out) / "maps" / f"{cell.cell_id}.npz", maps,
                              lambda idx: load_cached_images([test_paths[i] for i in idx], suite.image_size,
                                                             images_cache),
                              masks, test_paths, labels=labels)
        del maps
        store.put(record)
        after_record(record, out)  # optional MLflow tracking (fsad_bench.records.tracking; no-op unless --mlflow)
        if on_cell:
            on_cell(cell)
    return len(cells)


def groups_of(cells: list[Cell]) -> dict[tuple[str, str], list[Cell]]:
    out: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        out.setdefault((c.method, c.category), []).append(c)
    return out


BACKENDS = ("loky", "dask")


def _run_group_in_worker(parent_pid: int, *args: Any) -> int:
    """:func:`run_group` in a local worker that dies with the run (:func:`fsad_bench.run.workers.guard_worker`)."""
    from fsad_bench.run.workers import guard_worker

    guard_worker(parent_pid)
    return run_group(*args)


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
    return {"done": [c for c in cells if c.cell_id in done], "todo": todo,
            "stale": [c for c in todo if (c.method, c.category, c.k, c.run, c.train_seed) in old],
            "foreign": sorted(set(done) - ids)}


def run_suite(suite: Suite, out: str | Path, device: str = "cpu", jobs: int = 1,
              progress: Callable[[int], None] | None = None, backend: str = "loky",
              scheduler: str | None = None, cache_features: bool = False, force: bool = False,
              cells: list[Cell] | None = None) -> ResultStore:
    """Run every unfinished cell of ``suite`` into the store at ``out``.

    ``progress(n)`` is called as cells finish. ``jobs > 1`` runs (method, category) groups in
    parallel with joblib: ``backend="loky"`` on this machine (``cores / jobs`` torch threads
    each, workers that die with this process), ``backend="dask"`` on the Dask distributed cluster
    at ``scheduler`` (``tcp://host:port``; ``out`` and the cache folder must be on storage every
    worker sees). Records are one file per cell, so workers finishing together neither lose nor
    duplicate one. ``out`` is locked for the whole run (a second run on it gets FsadError);
    ``force``: recompute every cell of the suite (their records and cached trained models are
    deleted first); ``cells``: the output of :func:`plan` when the caller already has it.
    """
    if backend not in BACKENDS:
        raise FsadError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "dask" and not scheduler:
        raise FsadError("--backend dask needs --scheduler tcp://HOST:PORT (a running dask scheduler)")
    if cells is None:
        _, cells = plan(suite)
    store = ResultStore(out)
    with store.lock():
        store.clean_temporary()  # what a killed run left; nobody else writes here while we hold the lock
        if force:
            store.remove({c.cell_id for c in cells})
            _forget_models(suite, cells)
        store.save_suite(suite.to_dict(), [c.cell_id for c in cells])
        todo = groups_of([c for c in cells if not store.has(c.cell_id)])
        features = str(cache_dir() / "features") if cache_features else None
        if backend == "loky" and jobs <= 1:
            with frozen_gc():  # one full collection per run, not one per group
                for (m, c), group in todo.items():
                    run_group(suite, m, c, group, out, device, feature_cache=features,
                              on_cell=(lambda _c: progress(1)) if progress else None)
            return store
        from joblib import Parallel, delayed, parallel_config

        if backend == "dask":
            try:
                from distributed import Client
            except ImportError:
                raise FsadError("--backend dask needs dask.distributed: pip install 'fsad-bench[dask]'") from None
            tasks = (delayed(run_group)(suite, m, c, g, out, device, None, None, features) for (m, c), g in todo.items())
            try:
                client = Client(scheduler, timeout="10s")
            except (OSError, TimeoutError) as err:
                raise FsadError(f"cannot reach the dask scheduler at {scheduler}: {err}") from None
            with client, parallel_config(backend="dask"):
                for n in Parallel(n_jobs=-1, return_as="generator_unordered")(tasks):
                    if progress:
                        progress(n)
            return store
        threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
        tasks = (delayed(_run_group_in_worker)(os.getpid(), suite, m, c, g, out, device, threads, None, features)
                 for (m, c), g in todo.items())
        for n in Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
            if progress:
                progress(n)
    return store


def _forget_models(suite: Suite, cells: list[Cell]) -> None:
    """Delete the cached trained models of ``cells`` (``--force``: recompute means retrain too)."""
    for (m, c), group in groups_of(cells).items():
        cls = registry.get(m)
        if cls.protocol not in ("aggregated", "cross-dataset"):
            continue
        train_ds = open_dataset(suite) if cls.protocol == "aggregated" else open_train_dataset(suite)
        held_out = c if cls.protocol == "aggregated" else ""
        for t in sorted({cell.train_seed for cell in group}):
            model_cache_path(m, cls.protocol, cls.resolve_preset(suite.preset), suite, train_ds, held_out,
                             group[0].config_hash, t).unlink(missing_ok=True)


__all__ = ["Cell", "plan", "run_suite", "run_group", "predict_stream", "input_size", "train_seeds_of", "open_dataset",
           "evaluated_categories", "open_train_dataset", "cache_dir", "pick_device", "config_hash", "validate_suite", "cell_status"]
