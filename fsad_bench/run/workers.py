"""Local worker processes (joblib/loky) that never outlive the run that started them.

loky keeps its workers alive between tasks and does not kill a busy one when the parent dies:
after a ``kill -9`` of ``fsad-bench run --jobs 2`` they would go on computing, holding memory and
writing cells while a rerun starts. :func:`guard_worker`, called at the start of every task in a
worker, starts (once per process) a daemon thread that checks every :data:`POLL_SECONDS` whether
the run's process is gone — the worker was re-parented (``getppid`` changed) or the run's pid no
longer exists — and then kills the worker with SIGKILL. A worker outlives its parent by at most
about ``POLL_SECONDS`` plus the time to notice (tested: under 5 s).

(``prctl(PR_SET_PDEATHSIG)`` is not used: Linux sends it when the *thread* that spawned the
worker ends, and loky may respawn workers from a helper thread that ends before the run does.)

The guard also makes workers ignore SIGINT: Ctrl-C in a terminal reaches the whole process group,
and the parent alone handles it (prints one line, stops the workers) — no worker traceback.
"""

from __future__ import annotations

import os
import signal
import threading

POLL_SECONDS = 0.5
_guarded_for: int | None = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(parent_pid: int, ppid0: int) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_SECONDS):
        if os.getppid() != ppid0 or not _alive(parent_pid):
            os.kill(os.getpid(), signal.SIGKILL)


def guard_worker(parent_pid: int) -> None:
    """Die with the process ``parent_pid`` (the run); ignore SIGINT. Idempotent; a no-op in the run's
    own process (``--jobs 1``, or joblib running a task in the parent)."""
    global _guarded_for
    if os.getpid() == parent_pid or _guarded_for == parent_pid:
        return
    _guarded_for = parent_pid
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != parent_pid and not _alive(parent_pid):
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch, args=(parent_pid, os.getppid()), name="fsad-parent-watchdog", daemon=True).start()


def guard_run(alive) -> None:
    """Kill this process (SIGKILL) once ``alive()`` is false; checked every :data:`POLL_SECONDS` by a
    daemon thread (a Dask task's process: the run that submitted it ended or was replaced)."""

    def watch() -> None:
        stop, misses = threading.Event(), 0
        while not stop.wait(POLL_SECONDS):
            try:
                misses = 0 if alive() else misses + 1
            except Exception:
                misses = 0
            if misses >= 2:  # twice in a row: a file being replaced is no reason to die
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="fsad-run-watchdog", daemon=True).start()


class WorkerLost(RuntimeError):
    """A worker process (loky) or Dask worker died mid-run (killed, out of memory, crashed). The run
    stops at once; the CLI prints one line and exits 1 (a failure of the machine, not of the
    suite: exit 2 stays for bad input). Finished cells are kept; a rerun resumes."""


#: the child's program: drop the working directory ("" first on ``sys.path`` under ``-c``), then run
CHILD_BOOT = (
    "import sys\n"
    "if sys.path and sys.path[0] == '': del sys.path[0]\n"
    "from fsad_bench.run.workers import _child_main\n"
    "_child_main(int(sys.argv[1]))\n"
)


def run_in_child(fn, args: tuple, threads: int | None = None):
    """``fn(*args)`` in a fresh Python process started here (``sys.executable``, :data:`CHILD_BOOT`);
    returns its result or raises its exception. The child imports the fsad_bench of this process's
    installation, never a checkout in the working directory (``python -m`` would put the working
    directory first on ``sys.path``: a regular install run from a clone imported the clone's
    ``fsad_bench/``, which has no ``methods`` / ``protocols`` subpackages).

    Why a process per task on a Dask worker: torch's random generator is process-wide (module
    initialisation draws from it), so two tasks running as threads of one multi-threaded Dask
    worker would interleave their draws and give numbers that depend on scheduling. A child
    process per task isolates every draw, and a worker with ``--nthreads T`` still drives T tasks
    at once. (A subprocess rather than ``multiprocessing``: Dask worker processes are daemonic and
    may not fork multiprocessing children.) The child dies with the process that started it
    (:func:`guard_worker`), ignores Ctrl-C, sets ``threads`` torch threads when given, and prints
    to this process's stderr; the result comes back pickled through a pipe. A child that dies
    without a result raises :class:`WorkerLost`."""
    import pickle
    import subprocess
    import sys

    payload = pickle.dumps((os.getpid(), threads, fn, args))
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_BOOT, str(write_fd)], stdin=subprocess.PIPE, pass_fds=(write_fd,)
    )
    os.close(write_fd)
    try:
        proc.stdin.write(payload)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    code = proc.wait()
    if not data:
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        raise WorkerLost(
            f"a group process (pid {proc.pid}) died with {how} before its result; finished cells "
            f"are kept (rerun to resume)"
        )
    ok, value = pickle.loads(data)
    if ok:
        return value
    raise value


def _child_main(fd: int) -> None:
    import pickle
    import sys

    parent_pid, threads, fn, args = pickle.loads(sys.stdin.buffer.read())
    guard_worker(parent_pid)
    if threads:
        import torch

        if threads != torch.get_num_threads():  # see schedule.torch_threads
            torch.set_num_threads(threads)
    try:
        result = (True, fn(*args))
    except BaseException as err:  # noqa: BLE001 - handed to the parent, which raises it
        try:
            pickle.dumps(err)
            result = (False, err)
        except Exception:
            result = (False, RuntimeError(f"{err.__class__.__name__}: {err}"))
    with os.fdopen(fd, "wb") as f:
        f.write(pickle.dumps(result))


if __name__ == "__main__":
    import sys

    _child_main(int(sys.argv[1]))
