"""Shared helpers of the benchmark scripts: device choice, timing, peak memory."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def pick_device(name: str | None) -> torch.device:
    """``--device`` or cuda when present, else cpu."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 1):
    """Best of ``repeat`` runs of ``fn()``: (wall seconds, process CPU seconds, last output).

    CPU seconds (all threads of this process) are reported beside wall seconds because the
    CPU machines these run on are shared: wall time then depends on the other jobs."""
    best_wall, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        out = None
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        best_wall, best_cpu = min(best_wall, time.perf_counter() - w0), min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu, out


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Peak memory of a block above what was in use when it started, in MiB.

    CPU: the RSS high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``);
    CUDA: ``torch.cuda.max_memory_allocated``."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.start = rss_mb()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.start
        else:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.mb = int(line.split()[1]) / 1024 - self.start
        return False


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "cpu",
    )
    return f"{model}, {torch.get_num_threads()} torch threads"
