"""Per-cell peak memory (CPU): the process's resident-set high-water mark during one cell.

Definition of ``peak_memory_mb`` (CPU runs): the largest resident set size (RSS, MiB) of the
worker process between :func:`reset_peak_rss` (called before the cell's fit/adaptation) and
:func:`peak_rss_mb` (after its predictions). At the reset, garbage is collected and freed heap
memory is handed back to the OS (``malloc_trim``), so memory an earlier cell or group freed but
the allocator kept does not count; what is still alive (the Python interpreter, torch, the test
set in memory, a shared trained model) does. Two sources, the larger wins:

* the kernel's ``VmHWM`` when ``/proc/self/clear_refs`` can reset it (checked at every reset:
  after a working reset, VmHWM equals the current RSS); exact;
* a daemon thread sampling ``/proc/self/statm`` every :data:`SAMPLE_SECONDS` (works where the reset
  is refused, e.g. in some containers; misses spikes shorter than the interval).

Without ``/proc`` (macOS), ``ru_maxrss`` is the last resort (the process-wide peak).
CUDA runs report ``torch.cuda.max_memory_allocated`` instead (reset per cell:
:func:`fsad_bench.run.devices.reset_peak_memory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import threading
from pathlib import Path

SAMPLE_SECONDS = 0.005
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 4096 / 2**20


def current_rss_mb() -> float | None:
    """Resident set size of this process in MiB (None without /proc)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE_MB
    except (OSError, ValueError, IndexError):
        return None


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


class _Sampler:
    """Keeps the largest RSS seen since the last :meth:`reset` (one daemon thread per process)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.hwm_reset_works = False
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pid = -1

    def _loop(self) -> None:
        wake = threading.Event()
        while True:
            rss = current_rss_mb()
            if rss is None:
                return
            with self.lock:
                self.peak = max(self.peak, rss)
            wake.wait(SAMPLE_SECONDS)

    def reset(self) -> None:
        gc.collect()
        try:
            ctypes.CDLL(None).malloc_trim(0)  # glibc: give freed heap pages back to the OS
        except (OSError, AttributeError):
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux, when permitted)
        except OSError:
            pass
        rss, hwm = current_rss_mb(), _vm_hwm_mb()
        self.hwm_reset_works = rss is not None and hwm is not None and hwm <= rss + 1.0
        with self.lock:
            self.peak = rss or 0.0
        if rss is not None and (self.thread is None or self.pid != os.getpid() or not self.thread.is_alive()):
            self.pid = os.getpid()
            self.thread = threading.Thread(target=self._loop, name="fsad-rss-sampler", daemon=True)
            self.thread.start()

    def peak_mb(self) -> float:
        rss = current_rss_mb()
        if rss is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with self.lock:
            peak = max(self.peak, rss)
        if self.hwm_reset_works:
            peak = max(peak, _vm_hwm_mb() or 0.0)
        return peak


_SAMPLER = _Sampler()


@contextlib.contextmanager
def frozen_gc():
    """Collect once, then keep what is alive out of the collector (``gc.freeze``) until the block
    ends: each :func:`reset_peak_rss` inside then collects only what the cells allocated. A full
    collection walks every live object of the process (0.6 s per cell in a test process).
    Nested blocks (a suite's groups inside the suite) reuse the outer freeze."""
    global _FROZEN
    if _FROZEN:
        yield
        return
    gc.collect()
    gc.freeze()
    _FROZEN = True
    try:
        yield
    finally:
        _FROZEN = False
        gc.unfreeze()


_FROZEN = False


def reset_peak_rss() -> None:
    """Start measuring a new cell (see the module docstring for what counts)."""
    _SAMPLER.reset()


def peak_rss_mb() -> float:
    """Peak RSS in MiB since the last :func:`reset_peak_rss`."""
    return _SAMPLER.peak_mb()
