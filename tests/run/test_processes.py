"""Processes: workers die with their run (kill -9, SIGTERM, Ctrl-C), one run per results folder."""

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fsad_bench.cli import main
from fsad_bench.records.store import ResultStore


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as dead: it computes nothing and holds no memory)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _start(args, env, tmp_path, pids, n_workers, in_parent=False):
    # a library imported by an earlier test may leave SIGINT ignored in this process; an ignored signal
    # stays ignored across exec (and Python then installs no KeyboardInterrupt), so start the run as a
    # terminal would: with SIGINT at its default
    proc = subprocess.Popen(
        args,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(pids.iterdir())) < n_workers:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    workers = [int(p.name) for p in pids.iterdir()]
    assert len(workers) == n_workers and (proc.pid in workers) == in_parent
    return proc, workers


def _wait_dead(pids, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _cleanup(proc, workers):
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.slow  # end to end in subprocesses: ~10 s or more
def test_kill_9_of_the_run_kills_its_workers(slow_plugin, synth_root, tmp_path, demo_subprocess_args):
    env, pids = slow_plugin
    out = tmp_path / "r"
    proc, workers = _start(demo_subprocess_args(synth_root, out, "--jobs", "2", methods="slow"), env, tmp_path, pids, 2)
    try:
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, as an OOM killer or `kill -9 PID` would
        proc.wait()
        assert _wait_dead(workers, 5) == [], "workers outlived their run by more than 5 s"
        with ResultStore(out).lock():  # the kernel released the killed run's lock: a rerun may start
            pass
    finally:
        _cleanup(proc, workers)


@pytest.mark.slow  # end to end in subprocesses: ~10 s each
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_with_two_jobs(sig, code, slow_plugin, synth_root, tmp_path, demo_subprocess_args):
    env, pids = slow_plugin
    proc, workers = _start(
        demo_subprocess_args(synth_root, tmp_path / "r", "--jobs", "2", methods="slow"), env, tmp_path, pids, 2
    )
    try:
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C in a terminal reaches the whole process group
        else:
            os.kill(proc.pid, sig)  # `kill PID`, a batch scheduler's stop
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert "interrupted; finished cells are kept" in err
        assert "Traceback" not in err and "Error" not in err, err
        assert _wait_dead(workers, 5) == []
    finally:
        _cleanup(proc, workers)


def test_second_run_on_a_locked_folder_refuses(synth_root, tmp_path, capsys, demo_args):
    out = tmp_path / "r"
    out.mkdir()
    with open(out / ".lock", "w") as f:  # another live run holds the folder (its own open file)
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("4242\n")
        f.flush()
        with pytest.raises(SystemExit) as exc:
            main(demo_args(synth_root, out))
        err = capsys.readouterr().err
    assert exc.value.code == 2 and f"results folder {out} is in use by another fsad-bench run (pid 4242)" in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "cells").exists()
    main(demo_args(synth_root, out))  # lock released: runs
    assert len(list((out / "cells").glob("*.json"))) == 3
