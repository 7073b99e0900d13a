"""The run at runtime: numbers independent of the backend (Dask worker threads), worker loss ends the
run, progress from status files (counts, stages, per-method ETA, warnings), torch threads recorded,
the results folder locked before planning."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import pytest

from fsad_bench.cli import main
from fsad_bench.records.store import ResultStore
from fsad_bench.run import progress as prog
from fsad_bench.run.plan import plan
from fsad_bench.run.schedule import run_suite


def _cell(i, k=1, run=0):
    return SimpleNamespace(cell_id=f"c{i}", k=k, run=run, train_seed=0, method="m", category="a")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


# -- ETA and status files, no terminal ----------------------------------------------------------


def test_eta_is_per_method_and_never_blank_after_a_first_cell():
    # nothing known yet: no ETA; a prior (earlier run's records) gives one
    assert prog.eta_seconds({"a": 4}, {}, {}, [], 1, 1) is None
    assert prog.eta_seconds({"a": 4}, {}, {"a": 2.0}, [], 1, 1) == 8.0
    # measured cost beats the prior; each method its own cost; a method not seen yet: mean of known costs
    assert prog.eta_seconds({"a": 2, "b": 3}, {"a": (1, 10.0), "b": (2, 2.0)}, {"a": 99.0}, [], 1, 2) == 23.0
    assert prog.eta_seconds({"a": 2, "b": 2}, {"a": (1, 10.0)}, {}, [], 1, 2) == 40.0
    # time already spent on running cells counts down; parallel groups divide, but never more than groups left
    assert prog.eta_seconds({"a": 2}, {"a": (1, 10.0)}, {}, [("a", 4.0)], 1, 1) == 16.0
    assert prog.eta_seconds({"a": 4}, {"a": (1, 10.0)}, {}, [], 4, 2) == 20.0
    assert prog.eta_seconds({"a": 0}, {}, {}, [], 1, 0) == 0.0
    assert prog.format_eta(None) == "?" and prog.format_eta(3725.4) == "1:02:05"


def test_watcher_counts_cells_names_the_stage_and_forwards_warnings(tmp_path):
    clock = Clock()
    cells = [_cell(i, k=1 + i % 2, run=i // 2) for i in range(4)]
    watcher = prog.RunWatcher(tmp_path, cells, parallel=1, clock=clock)
    snap = watcher.poll()
    assert (snap.done, snap.total, snap.running, snap.eta) == (0, 4, [], None)

    w = prog.StatusWriter(tmp_path, clock=clock)
    w.stage("m", "a", cells[0], "fit")
    clock.t += 3
    w.stage("m", "a", cells[0], "predict")
    snap = watcher.poll()
    assert [r.describe() for r in snap.running] == ["m a k=1 run 0: predict"] and snap.done == 0
    clock.t += 2
    w.finished("m", "a", cells[0])  # 5 s of wall clock for the first cell
    w.stage("m", "a", cells[1], "adapt")
    clock.t += 1
    w.warn("x.py:1: UserWarning: careful")
    snap = watcher.poll()
    assert snap.done == 1 and snap.eta == 3 * 5.0 - 1.0  # 3 cells left at 5 s, 1 s spent on the running one
    assert snap.warnings == ["x.py:1: UserWarning: careful"]
    assert watcher.poll().warnings == []  # printed once
    prog.clear_status(tmp_path)  # the run's end: counts stay, nothing runs
    snap = watcher.poll()
    assert snap.done == 1 and snap.running == []


def test_prior_costs_from_earlier_records():
    recs = [
        {
            "method": "agg",
            "protocol": "aggregated",
            "category": "a",
            "train_seed": 0,
            "config_hash": "h",
            "adapt_seconds": 1.0,
            "infer_warm_seconds_per_image": 0.5,
            "n_test": 4,
            "train_seconds": 30.0,
        }
    ] * 3
    recs += [
        {
            "method": "ind",
            "protocol": "individual",
            "adapt_seconds": 7.0,
            "infer_warm_seconds_per_image": 0.0,
            "n_test": 4,
            "train_seconds": 6.0,
        },
        {"method": "bad"},
    ]
    assert prog.prior_costs(recs) == {"agg": 1.0 + 2.0 + 10.0, "ind": 7.0}


def test_a_serial_run_reports_every_cell_as_it_finishes(make_suite, tmp_path):
    suite = make_suite(methods=["random"], k=[1, 2], runs=2, categories=["grid"])
    cells = plan(suite).cells
    watcher = prog.RunWatcher(tmp_path / "out", cells)
    seen = []
    store = run_suite(suite, tmp_path / "out", progress=lambda n: seen.append(watcher.poll().done))
    assert seen == [1, 2, 3, 4]  # one count per cell, at once
    assert not (tmp_path / "out" / prog.STATUS_DIR).exists()  # cleared at the end
    assert {r["torch_threads"] for r in store.records()} == {__import__("torch").get_num_threads()}


def test_worker_warnings_go_to_the_status_file(tmp_path):
    with prog.forward_warnings(tmp_path):
        warnings.warn("from a worker", UserWarning, stacklevel=1)
    data = json.loads(prog.writer(tmp_path).path.read_text())
    assert data["n_warnings"] == 1 and "UserWarning: from a worker" in data["warnings"][0]
    prog.clear_status(tmp_path)


# -- torch threads recorded and exported --------------------------------------------------------


def test_torch_threads_in_records_and_export(synth_root, tmp_path, demo_args):
    out = tmp_path / "r"
    main(demo_args(synth_root, out))
    recs = ResultStore(out).records()
    assert recs and all(isinstance(r["torch_threads"], int) and r["torch_threads"] >= 1 for r in recs)
    main(["export", str(out), str(tmp_path / "x.csv")])
    header = (tmp_path / "x.csv").read_text().splitlines()[0].split(",")
    assert "torch_threads" in header


# -- the lock comes before planning -------------------------------------------------------------


def test_a_locked_folder_is_refused_before_planning(synth_root, tmp_path, capsys, monkeypatch, demo_args):
    import fsad_bench.run.plan as plan_module

    planned = []
    real_plan = plan_module.plan
    monkeypatch.setattr(plan_module, "plan", lambda *a, **kw: planned.append(1) or real_plan(*a, **kw))
    out = tmp_path / "r"
    out.mkdir()
    args = demo_args(synth_root, out)
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("4242\n")
        f.flush()
        t0 = time.perf_counter()
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert time.perf_counter() - t0 < 1.0
        assert exc.value.code == 2 and planned == []  # refused before the plan
        assert "in use by another fsad-bench run (pid 4242)" in capsys.readouterr().err
        main(args + ["--dry-run"])  # the dry run takes no lock
        assert planned == [1]


# -- Dask worker threads: the numbers of a serial run ------------------------------------------


def _stable(untimed, store):
    return {r["cell_id"]: untimed(r) for r in store.records()}


@pytest.mark.slow  # local Dask clusters and loky workers: ~30 s or more
def test_dask_threads_loky_and_serial_give_identical_records(make_suite, tmp_path, untimed):
    distributed = pytest.importorskip("distributed")
    suite = make_suite(methods=["random", "gaussian"], k=[1, 2], runs=2, categories=["grid", "washer"])
    serial = _stable(untimed, run_suite(suite, tmp_path / "serial", threads=1))
    assert len(serial) == 16 and {r["torch_threads"] for r in serial.values()} == {1}
    assert _stable(untimed, run_suite(suite, tmp_path / "loky", jobs=2, threads=1)) == serial
    for tpw in (2, 1):
        with distributed.LocalCluster(
            n_workers=1, threads_per_worker=tpw, processes=True, host="127.0.0.1", dashboard_address=":0"
        ) as cluster:
            store = run_suite(
                suite, tmp_path / f"dask{tpw}", backend="dask", scheduler=cluster.scheduler_address, threads=1
            )
        assert _stable(untimed, store) == serial, f"threads_per_worker={tpw}"


# -- worker loss ends the run -------------------------------------------------------------------


def _wait_for(pids, n, procs, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline and len(list(pids.iterdir())) < n:
        for p in procs:
            assert p.poll() is None, p.stderr.read() if p.stderr else p.returncode
        time.sleep(0.05)
    return [int(p.name) for p in pids.iterdir()]


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_run(args, env, cwd) -> subprocess.Popen:
    """The run in a session of its own (a process group to kill), its stderr (text) piped."""
    return subprocess.Popen(
        args, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


@pytest.mark.slow  # end to end in subprocesses: ~10 s
def test_a_killed_loky_worker_ends_the_run_with_one_line(slow_plugin, synth_root, tmp_path, demo_subprocess_args):
    env, pids = slow_plugin
    proc = _start_run(demo_subprocess_args(synth_root, tmp_path / "r", "--jobs", "2", methods="slow"), env, tmp_path)
    workers = []
    try:
        workers = _wait_for(pids, 2, [proc])
        os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would
        t0 = time.time()
        _, err = proc.communicate(timeout=30)
        assert time.time() - t0 < 10, "the run must end within seconds"
        assert proc.returncode == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: a worker process died mid-run"), err
    finally:
        _kill(workers)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.slow  # a Dask scheduler, a worker and a run in subprocesses: ~20 s
def test_a_killed_dask_worker_ends_the_run_with_one_line(slow_plugin, synth_root, tmp_path, demo_subprocess_args):
    pytest.importorskip("distributed")
    dask = shutil.which("dask", path=os.path.dirname(sys.executable))
    if dask is None:
        pytest.skip("no dask command")
    env, pids = slow_plugin
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        worker = subprocess.Popen(
            [
                dask,
                "worker",
                address,
                "--no-nanny",
                "--nthreads",
                "2",
                "--host",
                "127.0.0.1",
                "--dashboard-address",
                ":0",
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(worker)
        run = _start_run(
            demo_subprocess_args(
                synth_root, tmp_path / "r", "--backend", "dask", "--scheduler", address, methods="slow"
            ),
            env,
            tmp_path,
        )
        procs.append(run)
        children = _wait_for(pids, 2, [run])  # both worker threads busy, each driving its own process
        assert worker.pid not in children and len(set(children)) == 2
        worker.kill()
        t0 = time.time()
        _, err = run.communicate(timeout=60)
        assert time.time() - t0 < 15, "the run must end within seconds"
        assert run.returncode == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "left the cluster mid-run" in lines[0], err
        deadline = time.time() + 10
        while time.time() < deadline and any(_running(p) for p in children):
            time.sleep(0.1)
        assert not any(_running(p) for p in children), "task processes outlived their worker"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        _kill([int(p.name) for p in pids.iterdir()])


def _running(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
