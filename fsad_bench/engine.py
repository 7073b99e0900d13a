"""Protocol engine: expands a suite into cells and runs them.

A *cell* is (method, protocol, dataset, category, k, run). Cells are grouped by
(method, category): an ``aggregated`` method trains once per held-out category (or loads
that training from the model cache) and the fit is reused by every k and run; an
``individual`` method trains on each cell's support set; a ``training-free`` one never
trains. Every finished cell becomes one record in the :class:`~fsad_bench.store.ResultStore`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
import torchvision

from . import __version__, registry
from .adapter import AdapterConfig
from .data import FolderDataset, TestSet, load_images, load_test_set, open_folder_dataset
from .errors import FsadError
from .metrics import evaluate
from .sampler import SupportSampler, stable_seed
from .store import ResultStore, save_example_maps
from .tracking import after_record
from .protocols import Suite, training_data  # noqa: E402  (fsad_bench.protocols = top-level protocols/)

PREDICT_BATCH = 32  # test images per predict call (amortises per-call model traffic)


def cache_dir() -> Path:
    """Where synthetic data and trained models are cached (``$FSAD_BENCH_CACHE`` or ~/.cache/fsad_bench)."""
    return Path(os.environ.get("FSAD_BENCH_CACHE", Path.home() / ".cache" / "fsad_bench")).expanduser()


def pick_device(requested: str | None) -> str:
    """``cuda`` when present (or asked for), else ``cpu``; FsadError if cuda is asked for but absent."""
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise FsadError("--device cuda asked for, but torch sees no CUDA device")
    return requested


@dataclass(frozen=True)
class Cell:
    method: str
    protocol: str
    dataset: str
    category: str
    k: int
    run: int
    config_hash: str

    @property
    def cell_id(self) -> str:
        key = f"{self.method}|{self.protocol}|{self.dataset}|{self.category}|{self.k}|{self.run}|{self.config_hash}"
        return f"{self.method}-{self.category}-k{self.k}-r{self.run}-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def open_dataset(suite: Suite) -> FolderDataset:
    """The suite's dataset; the synthetic one is generated into the cache on first use."""
    return open_folder_dataset(suite.dataset, suite.data_root, suite.categories, suite.synthetic, cache_dir(),
                               f"suite {suite.name!r} needs --data-root DIR")


def open_train_dataset(suite: Suite) -> FolderDataset:
    """The training dataset of cross-dataset methods (``train_dataset`` & co. in the suite)."""
    if not suite.train_dataset:
        raise FsadError(f"suite {suite.name!r} has a cross-dataset method but no train_dataset "
                        f"(e.g. train_dataset = \"mvtec\" and train_data_root = \"/data/mvtec\")")
    return open_folder_dataset(suite.train_dataset, suite.train_data_root, suite.train_categories,
                               suite.train_synthetic, cache_dir(), f"suite {suite.name!r} needs train_data_root = DIR")


def _weights_fingerprint(weights: str) -> str:
    if weights == "auto":  # resolves to whatever checkpoints the cache holds
        ckpt = Path(torch.hub.get_dir()) / "checkpoints"
        return "auto:" + ",".join(sorted(p.name for p in ckpt.glob("*"))) if ckpt.is_dir() else "auto:"
    return weights


def config_hash(suite: Suite, method: str) -> str:
    """Hash of everything that changes a method's numbers besides (category, k, run)."""
    payload = {
        "method": method, "preset": suite.preset, "options": suite.options.get(method, {}),
        "weights": _weights_fingerprint(suite.weights), "image_size": suite.image_size, "seed": suite.seed,
        "synthetic": suite.synthetic if suite.dataset == "synthetic" else None,
        "support_lists": Path(suite.support_lists).read_text() if suite.support_lists else None,
    }
    if registry.get(method).protocol == "cross-dataset":
        payload["train"] = {"dataset": suite.train_dataset, "root": suite.train_data_root,
                            "categories": suite.train_categories,
                            "synthetic": suite.train_synthetic if suite.train_dataset == "synthetic" else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def plan(suite: Suite) -> tuple[FolderDataset, list[Cell]]:
    """Validate the suite against the data and expand it into cells (nothing is computed)."""
    dataset = open_dataset(suite)
    adapters = {m: registry.get(m) for m in suite.methods}
    sampler = SupportSampler(suite.seed, suite.support_lists)
    for c in dataset.categories:  # fail now, not after hours: every split readable, every k possible
        split = dataset.split(c)
        for k in suite.k:
            sampler.support(split, k, 0)
    if any(cls.protocol == "cross-dataset" for cls in adapters.values()):
        train_ds = open_train_dataset(suite)
        if train_ds.root.resolve() == dataset.root.resolve():
            raise FsadError(f"train_dataset of suite {suite.name!r} is the evaluated dataset ({dataset.root}); "
                            f"cross-dataset methods must train on another one")
        for c in train_ds.categories:
            if not any(s.label for s in train_ds.split(c).test):
                raise FsadError(f"training dataset {train_ds.root}: category {c!r} has no anomalous test images")
    cells = []
    for m, cls in adapters.items():
        h = config_hash(suite, m)
        for c in dataset.categories:
            for k in suite.k:
                for r in range(suite.runs):
                    cells.append(Cell(m, cls.protocol, dataset.name, c, k, r, h))
    return dataset, cells


def _reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def versions() -> dict[str, str]:
    return {"fsad_bench": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "sklearn": sklearn.__version__, "python": platform.python_version()}


def predict_all(adapter, images: torch.Tensor, device: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores ``(N,)``, maps ``(N, S, S)`` and seconds per image, predicting in batches."""
    scores, maps = [], []
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(images), PREDICT_BATCH):
        s, m = adapter.predict(images[i : i + PREDICT_BATCH])
        scores.append(torch.as_tensor(s).detach().float().cpu().reshape(-1))
        maps.append(torch.as_tensor(m).detach().float().cpu())
    _sync(device)
    seconds = (time.perf_counter() - t0) / len(images)
    scores_np, maps_np = torch.cat(scores).numpy(), torch.cat(maps).numpy()
    if scores_np.shape != (len(images),) or maps_np.shape != (len(images), *images.shape[-2:]):
        raise FsadError(f"{adapter.name}.predict returned scores {scores_np.shape} and maps {maps_np.shape}; "
                        f"expected ({len(images)},) and ({len(images)}, {images.shape[-2]}, {images.shape[-1]})")
    if not (np.isfinite(scores_np).all() and np.isfinite(maps_np).all()):
        raise FsadError(f"{adapter.name}.predict returned non-finite scores")
    return scores_np, maps_np, seconds


def _fit_cached(adapter, suite: Suite, train_ds: FolderDataset, held_out: str, chash: str) -> float:
    """Fit ``adapter`` (or load the fit from the model cache); returns training seconds.

    ``aggregated``: trains on every category of ``train_ds`` but ``held_out``;
    ``cross-dataset``: on all of ``train_ds`` (another dataset), ``held_out`` is "".
    The cache key is (method, dataset, held-out category, preset, seed, config hash, data)."""
    key = hashlib.sha256(f"{chash}|{train_ds.root.resolve()}|{','.join(train_ds.categories)}".encode()).hexdigest()[:16]
    folder = train_ds.name if adapter.protocol == "aggregated" else f"cross-{train_ds.name}"
    path = (cache_dir() / "models" / adapter.name / folder
            / f"{held_out or 'all'}-{adapter.preset_name}-s{suite.seed}-{key}.pt")
    if path.is_file():
        blob = torch.load(path, map_location=adapter.device, weights_only=False)
        adapter.load_state_dict(blob["state"])
        return float(blob["train_seconds"])
    torch.manual_seed(stable_seed("fit", suite.seed, adapter.name, train_ds.name, held_out) % 2**63)
    train = training_data(adapter.protocol, train_ds, held_out, torch.empty(0), suite.image_size)
    t0 = time.perf_counter()
    adapter.fit(train)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # parallel workers may fit the same model
    torch.save({"state": adapter.state_dict(), "train_seconds": seconds}, tmp)
    os.replace(tmp, path)
    return seconds


def run_group(suite: Suite, method: str, category: str, cells: list[Cell], out: str | Path,
              device: str, threads: int | None = None, on_cell: Callable[[Cell], None] | None = None,
              feature_cache: str | None = None) -> int:
    """Run the unfinished ``cells`` of one (method, category); returns how many were run.

    ``feature_cache``: folder where frozen-backbone features may be cached on disk."""
    if threads:
        torch.set_num_threads(threads)
    store = ResultStore(out)
    cells = [c for c in cells if not store.has(c.cell_id)]
    if not cells:
        return 0
    cls = registry.get(method)
    dataset = open_dataset(suite)
    split = dataset.split(category)
    test: TestSet = load_test_set(split, suite.image_size)
    sampler = SupportSampler(suite.seed, suite.support_lists)

    def make(seed: int):
        torch.manual_seed(seed)
        return cls(AdapterConfig(device=device, weights=suite.weights, preset=suite.preset, seed=seed,
                                 image_size=suite.image_size, options=suite.options.get(method, {}),
                                 feature_cache=feature_cache))

    shared, train_seconds = None, 0.0
    if cls.protocol != "individual":
        shared = make(suite.seed)
        if cls.protocol == "aggregated":
            train_seconds = _fit_cached(shared, suite, dataset, category, cells[0].config_hash)
        elif cls.protocol == "cross-dataset":
            train_seconds = _fit_cached(shared, suite, open_train_dataset(suite), "", cells[0].config_hash)
    for cell in cells:
        support_paths = sampler.support(split, cell.k, cell.run)
        support = load_images(support_paths, suite.image_size)
        cell_seed = stable_seed("cell", suite.seed, method, category, cell.k, cell.run) % 2**31
        _reset_peak_memory(device)
        if shared is None:  # individual: the training on the support set is part of adaptation
            adapter = make(cell_seed)
            train = training_data("individual", dataset, category, support, suite.image_size)
            _sync(device)
            t0 = time.perf_counter()
            adapter.fit(train)
            _sync(device)
            train_seconds = time.perf_counter() - t0
        else:
            adapter = shared
            t0 = time.perf_counter()
        torch.manual_seed(cell_seed)
        adapter.category = category
        adapter.adapt(support.to(adapter.device))
        _sync(device)
        adapt_seconds = time.perf_counter() - t0
        scores, maps, infer_seconds = predict_all(adapter, test.images, device)
        masks = test.masks.numpy()
        record: dict[str, Any] = {
            "cell_id": cell.cell_id, "method": method, "label": adapter.label, "protocol": cls.protocol,
            "dataset": cell.dataset, "category": category, "k": cell.k, "run": cell.run,
            "train_dataset": suite.train_dataset if cls.protocol == "cross-dataset" else None,
            "preset": adapter.preset_name, "weights": adapter.weights_tag, "seed": suite.seed,
            "hparams": adapter.describe().get("hparams", {}),
            **evaluate(test.labels, scores, masks, maps),
            "adapt_seconds": adapt_seconds, "train_seconds": train_seconds,
            "infer_seconds_per_image": infer_seconds, "peak_memory_mb": _peak_memory_mb(device),
            "n_test": int(len(test.labels)), "n_support": len(support_paths),
            "support": [p.name for p in support_paths], "image_size": suite.image_size,
            "config_hash": cell.config_hash, "device": device, "versions": versions(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "scores": [float(f"{s:.7g}") for s in scores],   # per-image anomaly scores (ROC curves)
            "labels": test.labels.astype(int).tolist(),       # per-image ground truth, 1 = anomalous
        }
        if cell.run == 0 and cell.k == max(suite.k):  # a few maps per category for the overlay plots
            save_example_maps(Path(out) / "maps" / f"{cell.cell_id}.npz", maps, test.images, masks,
                              test.paths, labels=test.labels)
        store.put(record)
        after_record(record, out)  # optional MLflow tracking (fsad_bench.tracking; no-op unless --mlflow)
        if on_cell:
            on_cell(cell)
    return len(cells)


def groups_of(cells: list[Cell]) -> dict[tuple[str, str], list[Cell]]:
    out: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        out.setdefault((c.method, c.category), []).append(c)
    return out


BACKENDS = ("loky", "dask")


def run_suite(suite: Suite, out: str | Path, device: str = "cpu", jobs: int = 1,
              progress: Callable[[int], None] | None = None, backend: str = "loky",
              scheduler: str | None = None, cache_features: bool = False) -> ResultStore:
    """Run every unfinished cell of ``suite`` into the store at ``out``.

    ``progress(n)`` is called as cells finish. ``jobs > 1`` runs (method, category) groups in
    parallel with joblib: ``backend="loky"`` on this machine (``cores / jobs`` torch threads
    each), ``backend="dask"`` on the Dask distributed cluster at ``scheduler``
    (``tcp://host:port``; ``out`` and the cache folder must be on storage every worker sees).
    Records are one file per cell, so workers finishing together neither lose nor duplicate one.
    """
    if backend not in BACKENDS:
        raise FsadError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "dask" and not scheduler:
        raise FsadError("--backend dask needs --scheduler tcp://HOST:PORT (a running dask scheduler)")
    _, cells = plan(suite)
    store = ResultStore(out)
    store.save_suite(suite.to_dict())
    todo = groups_of([c for c in cells if not store.has(c.cell_id)])
    features = str(cache_dir() / "features") if cache_features else None
    if backend == "loky" and jobs <= 1:
        for (m, c), group in todo.items():
            run_group(suite, m, c, group, out, device, feature_cache=features,
                      on_cell=(lambda _c: progress(1)) if progress else None)
        return store
    from joblib import Parallel, delayed, parallel_config

    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1)) if backend == "loky" else None
    tasks = (delayed(run_group)(suite, m, c, g, out, device, threads, None, features) for (m, c), g in todo.items())
    if backend == "dask":
        try:
            from distributed import Client
        except ImportError:
            raise FsadError("--backend dask needs dask.distributed: pip install 'fsad-bench[dask]'") from None
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as err:
            raise FsadError(f"cannot reach the dask scheduler at {scheduler}: {err}") from None
        with client, parallel_config(backend="dask"):
            for n in Parallel(n_jobs=-1, return_as="generator_unordered")(tasks):
                if progress:
                    progress(n)
        return store
    for n in Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
        if progress:
            progress(n)
    return store


__all__ = ["Cell", "plan", "run_suite", "run_group", "open_dataset", "open_train_dataset", "cache_dir",
           "pick_device"]
