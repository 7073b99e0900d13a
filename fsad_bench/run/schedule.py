"""Scheduling a suite: its unfinished (method, category) groups run one after another, in local
worker processes (joblib/loky; workers die with the run, :mod:`fsad_bench.run.workers`) or on a
Dask distributed cluster; the results folder locked for the whole run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsad_bench.errors import FsadError
from fsad_bench.protocols import Suite
from fsad_bench.records.store import ResultStore
from fsad_bench.run.cell import run_group
from fsad_bench.run.model_cache import forget_models
from fsad_bench.run.paths import cache_dir
from fsad_bench.run.peak_memory import frozen_gc
from fsad_bench.run.plan import Plan, groups_of, plan

BACKENDS = ("loky", "dask")


def _run_group_in_worker(parent_pid: int, *args: Any, **kwargs: Any) -> int:
    """:func:`run_group` in a local worker that dies with the run (:func:`fsad_bench.run.workers.guard_worker`)."""
    from fsad_bench.run.workers import guard_worker

    guard_worker(parent_pid)
    return run_group(*args, **kwargs)


def run_suite(suite: Suite, out: str | Path, device: str = "cpu", jobs: int = 1,
              progress: Callable[[int], None] | None = None, backend: str = "loky",
              scheduler: str | None = None, cache_features: bool = False, force: bool = False,
              planned: Plan | None = None, verify_data: bool = False) -> ResultStore:
    """Run every unfinished cell of ``suite`` into the store at ``out``.

    ``progress(n)`` is called as cells finish. ``jobs > 1`` runs (method, category) groups in
    parallel with joblib: ``backend="loky"`` on this machine (``cores / jobs`` torch threads
    each, workers that die with this process), ``backend="dask"`` on the Dask distributed cluster
    at ``scheduler`` (``tcp://host:port``; ``out`` and the cache folder must be on storage every
    worker sees). Records are one file per cell, so workers finishing together neither lose nor
    duplicate one. ``out`` is locked for the whole run (a second run on it gets FsadError);
    ``force``: recompute every cell of the suite (their records and cached trained models are
    deleted first); ``planned``: the :func:`plan` of ``suite`` when the caller already has it (its
    dataset, adapter classes and training dataset are reused by every group). The decoded-image cache
    identifies an original by its metadata, with ``force`` also by its size and first and last 64 KiB,
    with ``verify_data`` by its whole content (:data:`fsad_bench.data.image_cache.CHECKS`).
    """
    if backend not in BACKENDS:
        raise FsadError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "dask" and not scheduler:
        raise FsadError("--backend dask needs --scheduler tcp://HOST:PORT (a running dask scheduler)")
    if planned is None:
        planned = plan(suite)
    suite = planned.suite  # sweeps expanded: the variants are the methods the groups run
    cells = planned.cells
    datasets = (planned.dataset, planned.train_dataset)
    store = ResultStore(out)
    with store.lock():
        store.clean_temporary()  # what a killed run left; nobody else writes here while we hold the lock
        if force:
            store.remove({c.cell_id for c in cells})
            forget_models(planned)
        store.save_suite(suite.to_dict(), [c.cell_id for c in cells])
        todo = groups_of([c for c in cells if not store.has(c.cell_id)])
        features = str(cache_dir() / "features") if cache_features else None
        check = {"image_check": "full" if verify_data else "sample" if force else "stat"}
        if backend == "loky" and jobs <= 1:
            with frozen_gc():  # one full collection per run, not one per group
                for (m, c), group in todo.items():
                    run_group(suite, m, c, group, out, device, feature_cache=features,
                              on_cell=(lambda _c: progress(1)) if progress else None, dataset=datasets[0],
                              train_dataset=datasets[1], **check)
            return store
        from joblib import Parallel, delayed, parallel_config

        if backend == "dask":
            try:
                from distributed import Client
            except ImportError:
                raise FsadError("--backend dask needs dask.distributed: pip install 'fsad-bench[dask]'") from None
            tasks = (delayed(run_group)(suite, m, c, g, out, device, None, None, features, *datasets, **check)
                     for (m, c), g in todo.items())
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
        tasks = (delayed(_run_group_in_worker)(os.getpid(), suite, m, c, g, out, device, threads, None, features,
                                               *datasets, **check) for (m, c), g in todo.items())
        for n in Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
            if progress:
                progress(n)
    return store
