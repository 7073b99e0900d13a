"""Wall time of a suite with --jobs 1 vs --jobs 2 (fresh results folders, warm data cache).

Usage: python benchmarks/suite.py [--suite demo] [--methods random,gaussian] [--runs 2]
Prints a table; last line a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="demo")
    ap.add_argument("--methods", default=None, help="comma-separated (default: the suite's)")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--k", default=None)
    args = ap.parse_args()
    extra = []
    for flag, value in (("--methods", args.methods), ("--runs", args.runs), ("--k", args.k)):
        if value is not None:
            extra += [flag, str(value)]
    work = Path(tempfile.mkdtemp(prefix="fsad-suite-bench-"))
    env = {**os.environ, "FSAD_BENCH_CACHE": str(work / "cache")}
    base = [sys.executable, "-m", "fsad_bench.cli", "run", "--suite", args.suite, *extra]
    # warm-up: generate the synthetic data (not timed)
    subprocess.run(
        base + ["--out", str(work / "warm"), "--runs", "1", "--k", "1", "--methods", "random"],
        env=env,
        cwd=work,
        check=True,
        capture_output=True,
    )
    times = {}
    for jobs in (1, 2):
        shutil.rmtree(work / "cache" / "models", ignore_errors=True)  # both runs train from scratch
        t0 = time.perf_counter()
        subprocess.run(
            base + ["--out", str(work / f"jobs{jobs}"), "--jobs", str(jobs)],
            env=env,
            cwd=work,
            check=True,
            capture_output=True,
        )
        times[jobs] = time.perf_counter() - t0
    t = Table(title=f"suite {args.suite} wall time ({os.cpu_count()} cores)")
    t.add_column("jobs")
    t.add_column("seconds", justify="right")
    for jobs, sec in times.items():
        t.add_row(str(jobs), f"{sec:.1f}")
    Console(width=100).print(t)
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"summary: {args.suite} --jobs 1 {times[1]:.1f} s, --jobs 2 {times[2]:.1f} s, "
        f"speed-up {times[1] / times[2]:.2f}x"
    )


if __name__ == "__main__":
    main()
