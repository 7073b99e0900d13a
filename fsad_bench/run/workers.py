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
    threading.Thread(target=_watch, args=(parent_pid, os.getppid()), name="fsad-parent-watchdog",
                     daemon=True).start()
