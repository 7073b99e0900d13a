"""Running the cells of one (method, category) group and building each cell's record: the part of a
run that computes numbers (fits, adaptation, prediction through :mod:`fsad_bench.run.predict`,
metrics).

Cells are grouped by (method, category): an ``aggregated`` method trains once per (held-out
category, train seed) (or loads that training from the model cache, :mod:`fsad_bench.run.model_cache`)
and the fit is reused by every k and run (once per k too when the adapter's
:meth:`~fsad_bench.adapter.Adapter.per_shot_fit` says so); an ``individual`` method trains on each cell's support set,
with a seed that includes the train seed (:mod:`fsad_bench.run.seeds`); a ``training-free`` one never
trains and runs train seed 0 only. Every finished cell becomes one record in the
:class:`~fsad_bench.records.store.ResultStore`.

Timing fields of a record: ``adapt_seconds`` (support -> normal model; an individual method's
training included), ``train_seconds`` (the fit; an aggregated fit's seconds as first measured,
even when loaded from the model cache), ``infer_seconds_per_image`` (cold: the first test batch
with every feature cache bypassed — what a new image costs) and
``infer_warm_seconds_per_image`` (the whole test pass, reusing test features cached by earlier
cells); image decoding is never timed.
``torch_threads``: torch's intra-op threads the cell ran with (reduction order; not in the config
hash: numbers agree within error bars across thread counts, and the record says which).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
import torchvision

from fsad_bench import __version__, registry
from fsad_bench.adapter import AdapterConfig
from fsad_bench.data.dataset import Dataset
from fsad_bench.data.image_cache import ImageCache, load_cached_images
from fsad_bench.data.sampler import SupportSampler, subsample_test
from fsad_bench.metrics import evaluate, per_defect_auroc
from fsad_bench.protocols import Suite, training_data
from fsad_bench.records.store import ResultStore, save_example_maps
from fsad_bench.records.tracking import after_record
from fsad_bench.run import operating_point as op
from fsad_bench.run.devices import peak_memory_mb, reset_peak_memory, sync
from fsad_bench.run.flags import cell_flags
from fsad_bench.run.model_cache import fit_cached, per_shot_fit
from fsad_bench.run.paths import image_cache_dir
from fsad_bench.run.peak_memory import frozen_gc
from fsad_bench.run.plan import Cell, open_dataset, open_train_dataset
from fsad_bench.run.predict import input_size, load_masks, predict_stream, resize_filter
from fsad_bench.run.progress import writer as status_writer
from fsad_bench.run.seeds import adapter_seed, cell_seed


def versions() -> dict[str, str]:
    """Versions of the packages whose code computes a record's numbers (stored in every record)."""
    return {
        "fsad_bench": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
    }


def run_group(
    suite: Suite,
    method: str,
    category: str,
    cells: list[Cell],
    out: str | Path,
    device: str,
    threads: int | None = None,
    on_cell: Callable[[Cell], None] | None = None,
    feature_cache: str | None = None,
    dataset: Dataset | None = None,
    train_dataset: Dataset | None = None,
    image_check: str = "stat",
) -> int:
    """Run the unfinished ``cells`` of one (method, category); returns how many were run.
    (What was alive before stays out of the per-cell garbage collections: :func:`frozen_gc`.)
    ``dataset`` / ``train_dataset``: the :class:`~fsad_bench.run.plan.Plan`'s, else opened here;
    ``image_check``: how the decoded-image cache identifies files (:class:`~fsad_bench.data.image_cache.ImageCache`)."""
    with frozen_gc():
        try:
            return _run_group(
                suite,
                method,
                category,
                cells,
                out,
                device,
                threads,
                on_cell,
                feature_cache,
                dataset,
                train_dataset,
                image_check,
            )
        finally:
            status_writer(out).idle()  # the progress display's status file (fsad_bench.run.progress)


def _run_group(
    suite: Suite,
    method: str,
    category: str,
    cells: list[Cell],
    out: str | Path,
    device: str,
    threads: int | None = None,
    on_cell: Callable[[Cell], None] | None = None,
    feature_cache: str | None = None,
    dataset: Dataset | None = None,
    train_dataset: Dataset | None = None,
    image_check: str = "stat",
) -> int:
    """Run the unfinished ``cells`` of one (method, category); returns how many were run.

    Cells run grouped by train seed: a shared (aggregated / cross-dataset) adapter is fitted (or
    loaded from the model cache) once per train seed. Test images are streamed from disk in
    batches at the adapter's input size (:func:`predict_stream`); only scores, maps at the
    suite's ``image_size`` and uint8 masks stay in memory. ``feature_cache``: folder where
    frozen-backbone features may be cached on disk."""
    if threads and threads != torch.get_num_threads():  # see schedule.torch_threads
        torch.set_num_threads(threads)
    store = ResultStore(out)
    cls = registry.get(method)
    per_shot = cls.protocol != "individual" and per_shot_fit(
        cls, cls.resolve_hparams(suite.preset, suite.options.get(method, {}))
    )
    cells = sorted(
        (c for c in cells if not store.has(c.cell_id)), key=lambda c: (c.train_seed, c.k) if per_shot else c.train_seed
    )
    if not cells:
        return 0
    if dataset is None:
        dataset = open_dataset(suite)
    split = subsample_test(dataset.split(category), suite.test_subset, suite.seed)
    test_paths = [s.path for s in split.test]
    labels = np.array([s.label for s in split.test], dtype=np.int64)
    defects = [s.defect for s in split.test]
    masks = load_masks(split, suite.image_size)
    images_cache = ImageCache(image_cache_dir(), image_check)
    sampler = SupportSampler(suite.seed, suite.support_lists)
    status = status_writer(out)

    def make(seed: int):
        torch.manual_seed(seed)
        return cls(
            AdapterConfig(
                device=device,
                weights=suite.weights,
                preset=suite.preset,
                seed=seed,
                image_size=suite.image_size,
                options=suite.options.get(method, {}),
                feature_cache=feature_cache,
            )
        )

    shared, shared_key, train_seconds = None, None, 0.0
    for cell in cells:
        fit_key = (cell.train_seed, cell.k if per_shot else None)  # a per-shot fit: one per k as well
        if cls.protocol != "individual" and fit_key != shared_key:
            shared = None  # the previous train seed's model goes before the next one is built
            status.stage(method, category, cell, "load" if cls.protocol == "training-free" else "fit")
            shared, shared_key = make(adapter_seed(suite.seed, cell.train_seed)), fit_key
            if cls.protocol == "aggregated":
                train_seconds = fit_cached(
                    shared,
                    suite,
                    dataset,
                    category,
                    cell.fit_config_hash,
                    cell.train_seed,
                    images_cache,
                    shot=cell.k,
                )
            elif cls.protocol == "cross-dataset":
                if train_dataset is None:
                    train_dataset = open_train_dataset(suite)
                train_seconds = fit_cached(
                    shared,
                    suite,
                    train_dataset,
                    "",
                    cell.fit_config_hash,
                    cell.train_seed,
                    images_cache,
                    shot=cell.k,
                )
        support_paths = sampler.support(split, cell.k, cell.run)
        seed = cell_seed(suite.seed, method, category, cell.k, cell.run, cell.train_seed)
        reset_peak_memory(device)
        if shared is None:  # individual: the training on the support set is part of adaptation
            adapter = make(seed)
            size = input_size(adapter, suite)
            support = load_cached_images(support_paths, size, images_cache, resize_filter(adapter))
            train = training_data("individual", dataset, category, support, size)
            status.stage(method, category, cell, "fit")
            sync(device)
            t0 = time.perf_counter()
            adapter.fit(train)
            sync(device)
            train_seconds = time.perf_counter() - t0
        else:
            adapter = shared
            size = input_size(adapter, suite)
            support = load_cached_images(support_paths, size, images_cache, resize_filter(adapter))
            t0 = time.perf_counter()
        status.stage(method, category, cell, "adapt")
        torch.manual_seed(seed)
        adapter.category = category
        adapter.adapt(support.to(adapter.device))
        sync(device)
        adapt_seconds = time.perf_counter() - t0
        status.stage(method, category, cell, "predict")
        scores, maps, infer_cold, infer_warm = predict_stream(
            adapter, test_paths, size, suite.image_size, device, images_cache
        )
        record: dict[str, Any] = {
            "cell_id": cell.cell_id,
            "method": method,
            "label": adapter.label,
            "protocol": cls.protocol,
            "dataset": cell.dataset,
            "category": category,
            "k": cell.k,
            "run": cell.run,
            "train_seed": cell.train_seed,
            "train_dataset": suite.train_dataset if cls.protocol == "cross-dataset" else None,
            "preset": adapter.preset_name,
            "weights": adapter.weights_tag,
            "seed": suite.seed,
            "hparams": adapter.describe().get("hparams", {}),
            **evaluate(labels, scores, masks, maps),
            **cell_flags(labels, scores, maps, seed),
            "per_defect_auroc": per_defect_auroc(labels, scores, defects),
            "adapt_seconds": adapt_seconds,
            "train_seconds": train_seconds,
            "infer_seconds_per_image": infer_cold,
            "infer_warm_seconds_per_image": infer_warm,
            "peak_memory_mb": peak_memory_mb(device),
            "n_test": int(len(labels)),
            "test_subset": suite.test_subset,
            "n_support": len(support_paths),
            "support": [p.name for p in support_paths],
            "image_size": suite.image_size,
            "input_size": size,
            "config_hash": cell.config_hash,
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "versions": versions(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "scores": scores.astype(np.float32).tolist(),  # per-image anomaly scores, float32 exactly (ROC curves)
            "labels": labels.astype(int).tolist(),  # per-image ground truth, 1 = anomalous
        }
        if cell.run == 0 and cell.k == max(suite.k) and cell.train_seed == 0:  # a few maps for the overlays
            save_example_maps(
                Path(out) / "maps" / f"{cell.cell_id}.npz",
                maps,
                lambda idx: load_cached_images([test_paths[i] for i in idx], suite.image_size, images_cache),
                masks,
                test_paths,
                labels=labels,
            )
        del maps
        if op.wanted(cls, suite.operating_point):  # after the timings above, never inside them
            fresh = (
                None
                if shared is not None
                else lambda images, seed=seed, size=size: (  # individual: a model
                    m := make(seed),
                    m.fit(training_data("individual", dataset, category, images, size)),
                )[0]
            )  # on k - 1
            record.update(op.measure(adapter, support, seed, fresh, labels, scores, record["image_f1max"], device))
        del support
        store.put(record)
        after_record(record, out)  # optional MLflow tracking (fsad_bench.records.tracking; no-op unless --mlflow)
        status.finished(method, category, cell)
        if on_cell:
            on_cell(cell)
    return len(cells)
