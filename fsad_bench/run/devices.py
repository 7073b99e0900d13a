"""Devices: choosing one (``--device``), waiting for CUDA before a clock is read, and each cell's own
peak memory (CUDA allocations on cuda, else the RSS high-water mark of :mod:`fsad_bench.run.peak_memory`)."""

from __future__ import annotations

import torch

from fsad_bench.errors import FsadError
from fsad_bench.run.peak_memory import peak_rss_mb, reset_peak_rss


def pick_device(requested: str | None) -> str:
    """``cuda`` when present (or asked for), else ``cpu``; FsadError (one line) for an unknown device
    or a cuda device torch does not see."""
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(requested)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise FsadError(f"unknown --device {requested!r} (valid: auto, cpu, cuda, cuda:N, mps)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FsadError(f"--device {requested} asked for, but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FsadError(f"--device {requested}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise FsadError(f"--device {requested} asked for, but torch sees no MPS device")
    return requested


def reset_peak_memory(device: str) -> None:
    """Start a cell's memory measurement (definition: :mod:`fsad_bench.run.peak_memory`)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()


def peak_memory_mb(device: str) -> float:
    """The cell's own peak: CUDA allocations on cuda, else the RSS high-water mark since the reset."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read next measures it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
