"""Progress of a run as it happens, the same for every backend (serial, loky workers, Dask workers on
other hosts): the process that runs a (method, category) group writes a small status file, the run's
process reads them.

Writer side (:class:`StatusWriter`, called from :mod:`fsad_bench.run.cell` at stage changes): each
process writes ``<out>/.status/<host>-<pid>.json`` (atomic replace) with the cell it is on (method,
category, k, run, train seed), its stage (``fit`` / ``load`` (a training-free model built) / ``adapt`` /
``predict``) and since when (Unix
seconds), its finished cells per method with their wall seconds (cumulative, so a reader that polls
seldom misses none) and the warnings it caught (:func:`forward_warnings`, in worker processes).
Writing is best effort: a status file that cannot be written never stops a run.

Reader side (:class:`RunWatcher`, polled by the CLI's progress bar): sums the files into a
:class:`Snapshot` (cells done, what runs now, an ETA, new warnings). :func:`eta_seconds` is the ETA:
each method's measured wall seconds per cell (so far in this run; before its first cell, the cost of
its records in the results folder, :func:`prior_costs`; else the mean of the methods known) times its
remaining cells, less what the running cells already spent, divided by the groups that can run at
once. It computes no number of a record (``fsad_bench.identity.NOT_NUMBERS``).
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUS_DIR = ".status"
RUN_FILE = "run.json"  # written by the scheduler: {"parallel": groups running at once}
MAX_WARNINGS = 50  # per status file; more are counted, not kept


def status_dir(out: str | Path) -> Path:
    return Path(out) / STATUS_DIR


def clear_status(out: str | Path) -> None:
    """Delete the status files (a run's start and end; only while holding the results folder's lock)."""
    folder = status_dir(out)
    _writers.pop((str(Path(out).resolve()), os.getpid()), None)
    for p in folder.glob("*") if folder.is_dir() else []:
        p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def _write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass  # progress is best effort


def write_run_info(out: str | Path, parallel: int, token: str | None = None) -> None:
    """Tell the reader how many groups run at once (``parallel``); ``token``: the run's id, which
    its remote task processes check (:func:`run_token`) to stop once the run ended."""
    _write_json(status_dir(out) / RUN_FILE, {"parallel": int(parallel), "token": token})


def run_token(out: str | Path) -> str | None:
    """The token of the run now writing ``out`` (None when none is: the status files are cleared at
    its end, and a later run writes another token)."""
    try:
        return json.loads((status_dir(out) / RUN_FILE).read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        return None


class StatusWriter:
    """The status file of this process for results folder ``out`` (one per process: :func:`writer`)."""

    def __init__(self, out: str | Path, clock: Callable[[], float] = time.time):
        self.path = status_dir(out) / f"{socket.gethostname()}-{os.getpid()}.json"
        self.clock = clock
        self.done: dict[str, list[float]] = {}  # "method<TAB>category" -> [cells, wall seconds]
        self.warnings: list[str] = []
        self.n_warnings = 0
        self.current: dict[str, Any] | None = None
        self._cell_id: str | None = None
        self._cell_start = 0.0

    def _flush(self) -> None:
        _write_json(
            self.path,
            {"current": self.current, "done": self.done, "warnings": self.warnings, "n_warnings": self.n_warnings},
        )

    def stage(self, method: str, category: str, cell: Any, stage: str) -> None:
        """``cell`` (a :class:`~fsad_bench.run.plan.Cell`) entered ``stage`` (fit / adapt / predict);
        its wall clock starts at its first stage."""
        now = self.clock()
        if cell.cell_id != self._cell_id:
            self._cell_id, self._cell_start = cell.cell_id, now
        self.current = {
            "method": method,
            "category": category,
            "k": cell.k,
            "run": cell.run,
            "train_seed": cell.train_seed,
            "stage": stage,
            "since": now,
            "cell_since": self._cell_start,
        }
        self._flush()

    def finished(self, method: str, category: str, cell: Any) -> None:
        """``cell`` has its record."""
        seconds = self.clock() - self._cell_start if cell.cell_id == self._cell_id else 0.0
        key = f"{method}\t{category}"
        n, s = self.done.get(key, [0, 0.0])
        self.done[key] = [n + 1, s + seconds]
        self.current, self._cell_id = None, None
        self._flush()

    def idle(self) -> None:
        """The group ended (or failed): nothing runs in this process."""
        self.current, self._cell_id = None, None
        self._flush()

    def warn(self, text: str) -> None:
        self.n_warnings += 1
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(text)
        self._flush()


_writers: dict[tuple[str, int], StatusWriter] = {}


def writer(out: str | Path) -> StatusWriter:
    """This process's :class:`StatusWriter` for ``out`` (a forked child gets its own)."""
    key = (str(Path(out).resolve()), os.getpid())
    if key not in _writers:
        _writers[key] = StatusWriter(out)
    return _writers[key]


@contextmanager
def forward_warnings(out: str | Path) -> Iterator[None]:
    """In a worker process: warnings go to the status file (the run's process prints them above its
    progress bar) instead of the terminal, where they would tear the bar."""
    w = writer(out)
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        w.warn(warnings.formatwarning(message, category, filename, lineno, line).strip())

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


# -- reader side ------------------------------------------------------------------------------


@dataclass
class Running:
    """What one process is doing now."""

    method: str
    category: str
    k: int
    run: int
    train_seed: int
    stage: str
    since: float  # Unix seconds the stage began
    cell_since: float  # Unix seconds the cell began

    def describe(self) -> str:
        seed = f" seed {self.train_seed}" if self.train_seed else ""
        return f"{self.method} {self.category} k={self.k} run {self.run}{seed}: {self.stage}"


@dataclass
class Snapshot:
    done: int
    total: int
    running: list[Running]
    eta: float | None  # seconds; None only before any cost is known
    warnings: list[str] = field(default_factory=list)  # new since the last poll


def eta_seconds(
    remaining: dict[str, int],
    measured: dict[str, tuple[int, float]],
    prior: dict[str, float],
    running: Iterable[tuple[str, float]],
    parallel: int,
    groups_left: int,
) -> float | None:
    """Seconds until the last cell: ``remaining`` cells per method (running ones included),
    ``measured`` (cells, wall seconds) per method in this run, ``prior`` seconds per cell of a
    method from an earlier run, ``running`` (method, seconds spent) of the cells running now,
    ``parallel`` groups at once, ``groups_left`` unfinished (method, category) groups.
    A method's cost: measured mean, else its prior, else the mean of the known costs; None when
    no cost at all is known."""
    cost = {m: s / n for m, (n, s) in measured.items() if n}
    for m, c in prior.items():
        cost.setdefault(m, c)
    if not any(remaining.values()):
        return 0.0
    if not cost:
        return None
    fallback = sum(cost.values()) / len(cost)
    work = sum(cost.get(m, fallback) * r for m, r in remaining.items())
    work -= sum(min(spent, cost.get(m, fallback)) for m, spent in running)
    return max(work, 0.0) / max(1, min(parallel, max(groups_left, 1)))


def prior_costs(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Seconds per cell of each method from records of an earlier run: adaptation + warm
    inference over the test set + its training (individual: in adaptation already; shared fits:
    divided among the cells of that fit)."""
    per_fit: dict[tuple, int] = {}
    rows = []
    for r in records:
        try:
            cell = float(r["adapt_seconds"]) + float(r["infer_warm_seconds_per_image"]) * int(r["n_test"])
            train = float(r.get("train_seconds") or 0.0) if r.get("protocol") != "individual" else 0.0
        except (KeyError, TypeError, ValueError):
            continue
        key = (r["method"], r.get("dataset"), r.get("category"), r.get("train_seed"), r.get("config_hash"))
        per_fit[key] = per_fit.get(key, 0) + 1
        rows.append((r["method"], key, cell, train))
    sums: dict[str, list[float]] = {}
    for m, key, cell, train in rows:
        s = sums.setdefault(m, [0, 0.0])
        s[0] += 1
        s[1] += cell + train / per_fit[key]
    return {m: s / n for m, (n, s) in sums.items() if n}


class RunWatcher:
    """Reads the status files of a run on ``cells`` (the cells to compute, :class:`~fsad_bench.run.plan.Cell`)
    into a :class:`Snapshot` (:meth:`poll`). Counts never go back: a status file that disappears
    (cleared at the run's end) keeps its last counts."""

    def __init__(
        self,
        out: str | Path,
        cells: list[Any],
        prior: dict[str, float] | None = None,
        parallel: int = 1,
        clock: Callable[[], float] = time.time,
    ):
        self.folder = status_dir(out)
        self.total = len(cells)
        self.per_method: dict[str, int] = {}
        self.per_group: dict[tuple[str, str], int] = {}
        for c in cells:
            self.per_method[c.method] = self.per_method.get(c.method, 0) + 1
            self.per_group[(c.method, c.category)] = self.per_group.get((c.method, c.category), 0) + 1
        self.prior = dict(prior or {})
        self.parallel = parallel
        self.clock = clock
        self._files: dict[str, dict[str, Any]] = {}
        self._warned: dict[str, int] = {}

    def _read(self) -> None:
        names = set()
        for p in self.folder.glob("*.json") if self.folder.is_dir() else []:
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue  # being replaced; next poll
            if p.name == RUN_FILE:
                self.parallel = int(data.get("parallel", self.parallel))
                continue
            names.add(p.name)
            self._files[p.name] = data
        for name, data in self._files.items():
            if name not in names:
                data["current"] = None  # its process ended

    def poll(self) -> Snapshot:
        self._read()
        measured: dict[str, list[float]] = {}
        per_group: dict[tuple[str, str], int] = {}
        running: list[Running] = []
        new_warnings: list[str] = []
        for name, data in sorted(self._files.items()):
            for key, (n, s) in (data.get("done") or {}).items():
                m, _, c = key.partition("\t")
                per_group[(m, c)] = per_group.get((m, c), 0) + int(n)
                acc = measured.setdefault(m, [0, 0.0])
                acc[0] += n
                acc[1] += s
            cur = data.get("current")
            if cur:
                running.append(
                    Running(
                        cur["method"],
                        cur["category"],
                        cur["k"],
                        cur["run"],
                        cur["train_seed"],
                        cur["stage"],
                        cur["since"],
                        cur.get("cell_since", cur["since"]),
                    )
                )
            seen = self._warned.get(name, 0)
            kept = data.get("warnings") or []
            new_warnings += kept[seen:]
            self._warned[name] = max(seen, len(kept))
        done_per_method = {m: int(n) for m, (n, _) in measured.items()}
        done = min(self.total, sum(done_per_method.values()))
        remaining = {m: max(0, t - done_per_method.get(m, 0)) for m, t in self.per_method.items()}
        groups_left = sum(1 for g, t in self.per_group.items() if per_group.get(g, 0) < t)
        now = self.clock()
        eta = eta_seconds(
            remaining,
            {m: (int(n), s) for m, (n, s) in measured.items()},
            self.prior,
            [(r.method, max(0.0, now - r.cell_since)) for r in running],
            self.parallel,
            groups_left,
        )
        return Snapshot(done, self.total, running, eta, new_warnings)


def format_eta(seconds: float | None) -> str:
    """``h:mm:ss``, or ``?`` when nothing is known yet."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
