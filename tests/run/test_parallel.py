"""Parallel and distributed suites: same records as a serial run, none lost or duplicated."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from fsad_bench.records.store import ResultStore
from fsad_bench.report.tables import paper_table
from fsad_bench.run.plan import plan
from fsad_bench.run.schedule import run_suite


def _same_numbers(a, b):
    """Same cells, supports and labels; scores equal up to float round-off (a worker may use
    another torch thread count than the serial run, which changes reduction order)."""
    ra = {r["cell_id"]: r for r in a.records()}
    rb = {r["cell_id"]: r for r in b.records()}
    assert ra.keys() == rb.keys()
    for cid, x in ra.items():
        y = rb[cid]
        assert (x["support"], x["labels"], x["label"]) == (y["support"], y["labels"], y["label"])
        assert np.allclose(x["scores"], y["scores"], rtol=1e-4, atol=1e-6), cid
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            assert abs(x[metric] - y[metric]) < 1e-3, (cid, metric)


@pytest.mark.slow  # end to end in subprocesses: ~10 s or more
def test_two_workers_equal_serial_run(make_suite, tmp_path):
    suite = make_suite(methods=["random", "gaussian"], k=[1, 2], runs=2)
    serial = run_suite(suite, tmp_path / "serial")
    parallel = run_suite(suite, tmp_path / "parallel", jobs=2)
    cells = plan(suite).cells
    assert parallel.done_ids() == {c.cell_id for c in cells}  # every cell once: no loss, no duplicate
    assert len(list((tmp_path / "parallel" / "cells").iterdir())) == len(cells)
    _same_numbers(parallel, serial)


@pytest.mark.slow  # end to end in subprocesses: ~10 s or more
def test_dask_backend_on_a_local_cluster(make_suite, tmp_path):
    distributed = pytest.importorskip("distributed")
    suite = make_suite(methods=["random"], k=[1, 2], runs=2)
    serial = run_suite(suite, tmp_path / "serial")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        store = run_suite(suite, tmp_path / "dask", backend="dask", scheduler=cluster.scheduler_address)
    _same_numbers(store, serial)


@pytest.mark.slow  # end to end in subprocesses: ~10 s or more
def test_killed_parallel_run_resumes_missing_cells_only(synth_root, tmp_path, demo_subprocess_args):
    out = tmp_path / "r"

    def run_args(folder):
        return demo_subprocess_args(synth_root, folder, "--jobs", "2", methods="random,gaussian", k="1,2", runs="3")

    args = run_args(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # cwd outside the checkout: `python -m` must import the installed package
    proc = subprocess.Popen(
        args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    cells = out / "cells"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cells.glob("*.json")) if cells.is_dir() else []) < 4:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run, workers included, dies at once
    proc.wait()
    before = {p.stem for p in cells.glob("*.json")}
    assert 4 <= len(before) < 36, "the run must be killed midway"
    for p in cells.glob("*.json"):
        json.loads(p.read_text())  # every record on disk is whole

    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"36 cells ({len(before)} done)" in done.stdout  # the rerun starts from what was finished
    store = ResultStore(out)
    finished = {r["cell_id"]: r["finished_at"] for r in store.records()}
    assert len(finished) == 36
    untouched = json.loads((cells / f"{sorted(before)[0]}.json").read_text())["finished_at"]
    assert finished[sorted(before)[0]] == untouched  # finished cells were not recomputed

    full = tmp_path / "full"
    subprocess.run(run_args(full), env=env, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    a, b = store.frame(), ResultStore(full).frame()
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert paper_table(a, metric).equals(paper_table(b, metric))
