"""Where things are cached: the cache folder (synthetic data, trained models, features, file hashes)
and the decoded-image cache inside it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where synthetic data and trained models are cached (``$FSAD_BENCH_CACHE`` or ~/.cache/fsad_bench;
    an empty ``$FSAD_BENCH_CACHE`` counts as unset, not as the current folder)."""
    return Path(os.environ.get("FSAD_BENCH_CACHE") or Path.home() / ".cache" / "fsad_bench").expanduser()


def image_cache_dir() -> Path:
    """Folder of the decoded-image cache (:mod:`fsad_bench.data.image_cache`)."""
    return cache_dir() / "images"
