"""Start-up time of the ``fsad-bench`` commands that must answer at once (target: < 1 s on an idle core).

Each command runs ``--repeat`` times (default 5) in a fresh ``python -m fsad_bench.cli`` subprocess; the
table gives the median and the range of the wall time, the exit status, and whether torch was imported
(``-X importtime`` of one extra run). The CPU is named on the first line. Usage::

    python benchmarks/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MISSING = str(Path(tempfile.gettempdir()) / "fsad-bench-no-such-folder")
COMMANDS: dict[str, list[str]] = {
    "--version": ["--version"],
    "--help": ["--help"],
    "run --help": ["run", "--help"],
    "methods": ["methods"],
    "bad argument (--k two)": ["run", "--suite", "quick", "--k", "two"],
    "unknown option": ["run", "--no-such-option"],
    "wrong --data-root": ["run", "--suite", "quick", "--data-root", MISSING],
    "table on a missing folder": ["table", MISSING],
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def one(args: list[str], importtime: bool = False) -> tuple[float, int, str]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "fsad_bench.cli", *args]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return time.perf_counter() - t0, res.returncode, res.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    print(f"CPU: {cpu_name()}; python {platform.python_version()}; {a.repeat} fresh subprocesses per command")
    bare = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - t0)
    print(f"bare interpreter start (median): {statistics.median(bare):.2f} s")
    print("| command | median s | min–max s | exit | torch imported |\n|---|---|---|---|---|")
    worst = 0.0
    for name, args in COMMANDS.items():
        runs = [one(args) for _ in range(a.repeat)]
        times = [t for t, _, _ in runs]
        torch = re.search(r"^import time:.*\|\s+torch$", one(args, importtime=True)[2], re.MULTILINE) is not None
        med = statistics.median(times)
        worst = max(worst, med)
        print(
            f"| `fsad-bench {' '.join(args)}` ({name}) | {med:.2f} | {min(times):.2f}–{max(times):.2f} | "
            f"{runs[0][1]} | {'yes' if torch else 'no'} |"
        )
    print(f"slowest median: {worst:.2f} s (target < 1 s on an idle core)")


if __name__ == "__main__":
    main()
