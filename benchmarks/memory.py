"""Peak memory of the ``gaussian`` adapter's scoring vs the number of test images, and the feature cache's bound.

The engine predicts in batches of 32 (``fsad_bench.run.predict.PREDICT_BATCH``); inside the adapter, what
grows with the test set is only the frozen-backbone feature cache (``fsad_bench.components.feature_cache``),
bounded by ``max_memory_mb``. For each test-set size (``--tests``) a fresh adapter is
adapted (k shots) and scores the test images batch by batch, as the engine does; printed:
peak memory of the scoring above its start, the cache's bytes against its bound, and the
cache's hit / miss counts. A flat peak column = independent of the test-set size.

Usage: python benchmarks/memory.py [--size 224] [--k 2] [--tests 32,128,256] [--cache-mb 128] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, describe_device, pick_device  # noqa: E402

from fsad_bench.adapter import AdapterConfig  # noqa: E402

BATCH = 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tests", default="32,128,256")
    ap.add_argument("--cache-mb", type=float, default=128, help="bound of the in-memory feature cache")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    from fsad_bench.methods.gaussian import GaussianAdapter

    dev = pick_device(args.device)
    support = torch.rand(args.k, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    t = Table(
        title=f"gaussian adapter memory (k={args.k}, {args.size}px, {describe_device(dev)}, "
        f"feature cache bound {args.cache_mb:.0f} MiB)"
    )
    for col in ("test images", "adapt peak", "scoring peak", "cache MiB / bound", "cache hits / misses"):
        t.add_column(col, justify="right")
    peaks = []
    for n in (int(v) for v in args.tests.split(",")):
        adapter = GaussianAdapter(AdapterConfig(weights="none", image_size=args.size, device=str(dev)))
        adapter.cached.max_bytes = args.cache_mb * 2**20
        with PeakMemory(dev) as mem_adapt:
            adapter.adapt(support.to(dev))
        g = torch.Generator().manual_seed(n)
        with PeakMemory(dev) as mem_score:
            for i in range(0, n, BATCH):  # images made batch by batch: only the adapter's memory is measured
                adapter.predict(torch.rand(min(BATCH, n - i), 3, args.size, args.size, generator=g).to(dev))
        c = adapter.cached
        assert c.bytes <= c.max_bytes
        t.add_row(
            str(n),
            f"{mem_adapt.mb:.0f} MiB",
            f"{mem_score.mb:.0f} MiB",
            f"{c.bytes / 2**20:.0f} / {c.max_bytes / 2**20:.0f}",
            f"{c.hits} / {c.misses}",
        )
        peaks.append((n, mem_score.mb, c.bytes / 2**20))
        del adapter
    Console(width=120).print(t)
    print(
        f"summary [{dev.type}]: scoring peak above start "
        + ", ".join(f"{p:.0f} MiB at {n} test images (cache {b:.0f} MiB)" for n, p, b in peaks)
        + f"; cache bound {args.cache_mb:.0f} MiB respected"
    )


if __name__ == "__main__":
    main()
