"""Scheduling a suite: its unfinished (method, category) groups run one after another, in local
worker processes (joblib/loky; workers die with the run, :mod:`fsad_bench.run.workers`) or on a
Dask distributed cluster; the results folder locked for the whole run."""

from __future__ import annotations

import os
import uuid
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
from fsad_bench.run.progress import clear_status, forward_warnings, run_token, write_run_info
from fsad_bench.run.workers import WorkerLost

BACKENDS = ("loky", "dask")
POLL_SECONDS = 0.5  # how often a Dask run checks that its workers are alive
WORKER_WAIT_SECONDS = 10  # how long a Dask run waits for a first worker


def _run_group_in_worker(parent_pid: int, out: str | Path, token: str | None, *args: Any) -> int:
    """:func:`run_group` in a local worker that dies with the run (:func:`fsad_bench.run.workers.guard_worker`)
    or, given the run's ``token``, when the run's status file no longer carries it (the run ended:
    a Dask task's process on another host); its warnings go to the run's progress display
    (:func:`fsad_bench.run.progress.forward_warnings`)."""
    from fsad_bench.run.workers import guard_run, guard_worker

    guard_worker(parent_pid)
    if token:
        guard_run(lambda: run_token(out) == token)
    with forward_warnings(out):
        return run_group(*args)


def _run_group_on_dask(out: str | Path, token: str, threads: int | None, *args: Any) -> int:
    """A Dask task: :func:`run_group` in its own child process on the worker
    (:func:`fsad_bench.run.workers.run_in_child`: no random draw is shared between the worker's threads).
    Torch threads: ``threads``, else the worker host's cores / the worker's threads."""
    from fsad_bench.run.workers import run_in_child

    if not threads:
        try:
            from distributed import get_worker

            nthreads = get_worker().state.nthreads
        except (ImportError, ValueError, AttributeError):
            nthreads = 1
        threads = max(1, (os.cpu_count() or 1) // max(1, nthreads))
    return run_in_child(_run_group_in_worker, (os.getpid(), out, token, *args), threads)


def run_suite(
    suite: Suite,
    out: str | Path,
    device: str = "cpu",
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
    backend: str = "loky",
    scheduler: str | None = None,
    cache_features: bool = False,
    force: bool = False,
    planned: Plan | None = None,
    threads: int | None = None,
    verify_data: bool = False,
) -> ResultStore:
    """Run every unfinished cell of ``suite`` into the store at ``out``.

    ``progress(n)`` is called as cells finish (the CLI reads the status files of
    :mod:`fsad_bench.run.progress` instead, the same for every backend). ``jobs > 1`` runs
    (method, category) groups in parallel local worker processes (joblib/loky; ``cores / jobs``
    torch threads each, workers that die with this process). ``backend="dask"``: the groups are
    tasks on the Dask distributed cluster at ``scheduler`` (``tcp://host:port``; ``out`` and the
    cache folder must be on storage every worker sees), using every worker thread (``jobs`` is
    ignored); each task runs its group in a child process of its worker (``run_in_child``), so
    the numbers are those of a serial run whatever the workers' thread count. ``threads``: torch
    threads of every group (default: serial runs keep torch's; loky ``cores / jobs``; Dask the
    worker host's ``cores / worker threads``); records say theirs (``torch_threads``).

    A worker that dies mid-run (loky process or Dask worker: killed, out of memory) stops the
    run within seconds with :class:`~fsad_bench.run.workers.WorkerLost`; records already written
    are kept. Records are one file per cell, so workers finishing together neither lose nor
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
    store = ResultStore(out)
    with store.lock():  # before planning: a second run on `out` is refused at once, not after the plan
        if planned is None:
            planned = plan(suite)
        suite = planned.suite  # sweeps expanded: the variants are the methods the groups run
        image_check = "full" if verify_data else "sample" if force else "stat"
        clear_status(out)
        try:
            _run_locked(
                suite,
                planned,
                store,
                out,
                device,
                jobs,
                progress,
                backend,
                scheduler,
                cache_features,
                force,
                threads,
                image_check,
            )
        finally:
            clear_status(out)
    return store


def _run_locked(
    suite: Suite,
    planned: Plan,
    store: ResultStore,
    out: str | Path,
    device: str,
    jobs: int,
    progress: Callable[[int], None] | None,
    backend: str,
    scheduler: str | None,
    cache_features: bool,
    force: bool,
    threads: int | None,
    image_check: str = "stat",
) -> None:
    cells = planned.cells
    group_tail = (planned.dataset, planned.train_dataset, image_check)  # run_group's last positional arguments
    store.clean_temporary()  # what a killed run left; nobody else writes here while we hold the lock
    if force:
        store.remove({c.cell_id for c in cells})
        forget_models(planned)
    store.save_suite(suite.to_dict(), [c.cell_id for c in cells])
    todo = groups_of([c for c in cells if not store.has(c.cell_id)])
    features = str(cache_dir() / "features") if cache_features else None
    if backend == "dask":
        _run_on_dask(todo, scheduler, progress, suite, out, device, features, group_tail, threads)
        return
    if jobs <= 1:
        write_run_info(out, 1)
        previous = torch_threads()
        try:
            with frozen_gc():  # one full collection per run, not one per group
                for (m, c), group in todo.items():
                    run_group(
                        suite,
                        m,
                        c,
                        group,
                        out,
                        device,
                        threads,
                        (lambda _c: progress(1)) if progress else None,
                        features,
                        *group_tail,
                    )
        finally:
            torch_threads(previous)
        return
    from joblib import Parallel, delayed
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    write_run_info(out, min(jobs, len(todo)))
    threads = threads or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    tasks = (
        delayed(_run_group_in_worker)(
            os.getpid(), out, None, suite, m, c, g, out, device, threads, None, features, *group_tail
        )
        for (m, c), g in todo.items()
    )
    try:
        for n in Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
            if progress:
                progress(n)
    except TerminatedWorkerError as err:
        how = str(err).split("following reason:")[-1].strip().split("\n")[0][:120] or "killed"
        raise WorkerLost(f"a worker process died mid-run ({how}); finished cells are kept (rerun to resume)") from None


def torch_threads(n: int | None = None) -> int:
    """Torch's intra-op threads now; sets them to ``n`` first when given and different. Only when different:
    a ``torch.set_num_threads`` call, even to the current count, leaves MKL's batched LU
    (``torch.linalg.inv``, used by anomalib's PaDiM) failing with "Pivots given to lu_solve must all be
    greater or equal to 1" in torch 2.14.1 on this CPU (AMD EPYC); a run that changes the count keeps it."""
    import torch

    if n and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _run_on_dask(
    todo: dict,
    scheduler: str,
    progress: Callable[[int], None] | None,
    suite: Suite,
    out: str | Path,
    device: str,
    features: str | None,
    group_tail: tuple,
    threads: int | None,
) -> None:
    """Every group a task of the cluster (``client.submit``: nothing runs in this process, every worker
    thread is used). Ends with :class:`WorkerLost` within about :data:`POLL_SECONDS` when a worker
    leaves the cluster or a task's process dies, after cancelling the other tasks."""
    try:
        from distributed import Client, wait
        from distributed import TimeoutError as DaskTimeout
        from distributed.client import FIRST_COMPLETED
    except ImportError:
        raise FsadError("--backend dask needs dask.distributed: pip install 'fsad-bench[dask]'") from None
    try:
        client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as err:
        raise FsadError(f"cannot reach the dask scheduler at {scheduler}: {err}") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
        except (TimeoutError, DaskTimeout):
            raise FsadError(
                f"the dask scheduler at {scheduler} has no worker (start one: dask worker {scheduler})"
            ) from None
        workers = _workers(client)
        token = uuid.uuid4().hex
        write_run_info(out, min(sum(workers.values()), len(todo)), token)
        pending = {
            client.submit(
                _run_group_on_dask,
                out,
                token,
                threads,
                suite,
                m,
                c,
                g,
                out,
                device,
                None,
                None,
                features,
                *group_tail,
                key=f"fsad-{m}-{c}-{token[:8]}",
                pure=False,
            )
            for (m, c), g in todo.items()
        }
        seen = set(workers)
        try:
            while pending:
                try:
                    done, pending = wait(list(pending), timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                    pending = set(pending)
                except (TimeoutError, DaskTimeout):
                    done = set()
                for f in done:
                    n = _dask_result(f)
                    if progress:
                        progress(n)
                now = _workers(client)
                if lost := seen - set(now):
                    raise WorkerLost(
                        f"dask worker {sorted(lost)[0]} left the cluster mid-run (killed or crashed); "
                        f"finished cells are kept (rerun to resume)"
                    )
                seen |= set(now)
        finally:
            if pending:
                client.cancel(list(pending), force=True)


def _workers(client: Any) -> dict[str, int]:
    """Worker address -> threads, as the scheduler sees them now."""
    return {a: int(w.get("nthreads", 1)) for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}


def _dask_result(future: Any) -> int:
    try:
        return future.result()
    except Exception as err:
        if err.__class__.__name__ == "KilledWorker":
            raise WorkerLost(
                f"the dask workers running {future.key} died ({err}); finished cells are kept (rerun to resume)"
            ) from None
        raise
