"""Command line: ``fsad-bench run | table | compare | export | plot | report | prune | methods | datasets | synth |
supports import / export``.

Exit codes: 0 done; 2 bad input or an unusable results folder (one line on stderr, nothing
computed lost); 130 interrupted by Ctrl-C (SIGINT), 143 stopped by SIGTERM — both print the same
line, keep every finished cell and stop the worker processes; 1 a bug (one line, the traceback
with ``FSAD_BENCH_DEBUG=1``) or a worker lost mid-run (a loky worker process or a Dask worker killed or
crashed: one line, within seconds; finished cells are kept).

Start-up: this module imports click and rich only; torch, pandas, sklearn and the methods are imported
inside the commands that need them, so ``--help``, ``--version``, ``methods`` and argument errors
(a missing ``--data-root`` too) answer without loading them (``benchmarks/startup.py``).
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import click
from rich.console import Console

from fsad_bench import registry
from fsad_bench.errors import FsadError
from fsad_bench.run.workers import WorkerLost

#: ``--metric`` of compare / rerun: the record metrics (report.METRICS' keys, kept here so that the
#: CLI starts without importing pandas; a test keeps the two equal)
METRIC_CHOICE = click.Choice(
    ["image_auroc", "pixel_auroc", "aupro", "image_aupr", "image_f1max", "pixel_aupr", "pixel_f1max"]
)

# Wide tables stay readable when the output is a file or a CI log (rich defaults to 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise FsadError(f"{what} must be comma-separated integers, got {text!r}") from None


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _metric_names(text: str | None) -> list[str] | None:
    """``--metrics a,b`` -> validated metric names (None: the default tables)."""
    known = METRIC_CHOICE.choices
    names = _names(text)
    if names is None:
        return None
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise FsadError(f"--metrics: unknown {', '.join(unknown) or '(empty)'} (known: {', '.join(known)})")
    return names


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fsad-bench")
def cli() -> None:
    """Benchmark harness for few-shot anomaly detection."""


@cli.command()
@click.option(
    "--suite", "suite_name", required=True, help="Built-in suite name (demo, paper_mvtec, ...) or a .toml file."
)
@click.option("--methods", help="Comma-separated methods (overrides the suite).")
@click.option("--k", "ks", help="Comma-separated shot counts, e.g. 2,4,8.")
@click.option("--runs", type=int, help="Runs (support-set draws) per k.")
@click.option(
    "--test-subset",
    type=int,
    help="Score each category on a seeded, stratified subset of N test images, the same for every method "
    "(the suite key test_subset; for budget sweeps; records say n_test).",
)
@click.option(
    "--train-seeds",
    type=int,
    help="Training seeds of every trained method (replaces the suite key train_seeds, a per-method table too; "
    "training-free methods run seed 0 only).",
)
@click.option("--categories", help="Comma-separated categories (default: the suite's, else all).")
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Dataset folder (MVTec AD layout, or VisA with split_csv/1cls.csv); repeat to pool several.",
)
@click.option(
    "--train-data-root",
    type=click.Path(path_type=Path),
    help="Training dataset folder of cross-dataset methods (InCTRL).",
)
@click.option("--out", type=click.Path(path_type=Path), help="Results folder (default results/<suite>).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto (cuda when present).")
@click.option("--jobs", type=int, default=1, show_default=True, help="Parallel worker processes (loky backend).")
@click.option(
    "--backend",
    type=click.Choice(["loky", "dask"]),
    default="loky",
    show_default=True,
    help="joblib backend: local processes, or a Dask distributed cluster.",
)
@click.option("--scheduler", help="Dask scheduler address (tcp://HOST:PORT) for --backend dask.")
@click.option("--cache-features", is_flag=True, help="Also cache frozen-backbone features on disk.")
@click.option("--weights", help="imagenet | auto | none | PATH to a backbone state dict.")
@click.option("--arch", help="torchvision backbone of every method that has one (resnet18, mobilenet_v2, ...).")
@click.option("--preset", help="Method preset: cpu or paper.")
@click.option("--image-size", type=int, help="Input size in pixels.")
@click.option("--seed", type=int, help="The one seed deciding supports, augmentations and inits.")
@click.option("--support-lists", type=click.Path(path_type=Path), help="JSON of fixed support sets.")
@click.option(
    "--std-components/--no-std-components",
    default=None,
    help="Also print the std split into support-draw and training-seed parts (default: with several train seeds).",
)
@click.option("--force", is_flag=True, help="Recompute every cell of the suite (and retrain cached models).")
@click.option("--dry-run", is_flag=True, help="List the cells (done / to do / stale) and stop; writes nothing.")
@click.option(
    "--verify-data",
    is_flag=True,
    help="Key the decoded-image cache by every image file's whole content too (sha256: one read per "
    "image and access, ~1-3 ms per MB): exact, slower. See docs/caches.md.",
)
@click.option(
    "--metrics",
    "metric_list",
    help="Tables to print, e.g. image_auroc,image_f1max,pixel_aupr "
    "(default image_auroc,pixel_auroc,aupro; records hold every metric).",
)
@click.option(
    "--mlflow",
    "mlflow_uri",
    is_flag=False,
    flag_value="default",
    help="Log one MLflow run per cell to URI (alone: a file store OUT/mlruns); needs fsad-bench[mlflow].",
)
@click.option("--complete-only", is_flag=True, help="Tables leave out every (method, k) missing a planned cell.")
@click.option(
    "--operating-point/--no-operating-point",
    default=None,
    help="Label-free threshold from leave-one-out support scores for every method (the suite key "
    "operating_point; default: all but the methods whose adaptation trains — individual ones, diffnet+, tdg+ — "
    "for which it costs k extra trainings a cell).",
)
def run(
    suite_name,
    methods,
    ks,
    runs,
    test_subset,
    train_seeds,
    std_components,
    categories,
    data_root,
    train_data_root,
    out,
    device,
    jobs,
    backend,
    scheduler,
    cache_features,
    weights,
    arch,
    preset,
    image_size,
    seed,
    support_lists,
    force,
    dry_run,
    verify_data,
    metric_list,
    mlflow_uri,
    complete_only,
    operating_point,
) -> None:
    """Run a benchmark suite (resumable: finished cells are skipped) and print its tables.

    A finished cell is reused only when nothing that changes its numbers changed (options,
    method code, weights, data files, image size, seeds, support lists); otherwise it is recomputed
    and the old record is no longer shown (``fsad-bench prune OUT`` deletes it)."""
    _check_arguments(ks, data_root, train_data_root, jobs, metric_list)  # before torch is imported
    from fsad_bench.protocols import apply_arch, load_suite, validate_numbers

    suite = load_suite(suite_name)  # a bad suite is reported before torch is imported
    from fsad_bench.run.devices import pick_device
    from fsad_bench.run.plan import cell_status, plan

    overrides = {
        "methods": None if methods is None else registry.method_names(methods),
        "k": _ints(ks, "--k"),
        "runs": runs,
        "test_subset": test_subset,
        "train_seeds": train_seeds,
        "categories": _names(categories),
        "data_root": ([str(r) for r in data_root] if len(data_root) > 1 else str(data_root[0])) if data_root else None,
        "arch": arch,
        "train_data_root": str(train_data_root) if train_data_root else None,
        "weights": weights,
        "preset": preset,
        "image_size": image_size,
        "seed": seed,
        "support_lists": str(support_lists) if support_lists else None,
        "operating_point": operating_point,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(suite, key, value)
    validate_numbers(suite, f"suite {suite.name}")
    apply_arch(suite, override=arch is not None)
    device = pick_device(device)
    out = out or Path("results") / suite.name
    if out.exists() and not out.is_dir():
        raise FsadError(f"--out {out} is a file, not a results folder")
    metric_names = _metric_names(metric_list)
    if mlflow_uri:
        from fsad_bench.records.tracking import default_uri, enable

        enable(default_uri(out) if mlflow_uri == "default" else mlflow_uri)
    from fsad_bench.records.store import ResultStore

    store = ResultStore(out)
    if dry_run:  # writes nothing, takes no lock
        planned = plan(suite)
        suite = planned.suite  # sweeps expanded into method variants
        _print_dry_run(suite.name, out, cell_status(suite, planned.cells, store))
        return
    with store.lock():  # before planning: an unusable or busy --out is one error within a second, nothing started
        planned = plan(suite)
        suite = planned.suite  # sweeps expanded into method variants
        status = cell_status(suite, planned.cells, store)
        _run_locked(
            suite,
            planned,
            status,
            store,
            out,
            device,
            jobs,
            backend,
            scheduler,
            cache_features,
            force,
            std_components,
            metric_names,
            complete_only,
            verify_data,
        )


def _check_arguments(ks, data_root, train_data_root, jobs, metric_list) -> None:
    """The checks of ``run``'s arguments that need no suite: one line (FsadError) within the start-up time."""
    _ints(ks, "--k")
    _metric_names(metric_list)
    for root in (*data_root, *([train_data_root] if train_data_root else [])):
        if not root.exists():
            raise FsadError(f"data root {root} does not exist (--data-root: a dataset folder)")
    if jobs < 1:
        raise FsadError(f"--jobs must be >= 1, got {jobs}")


def _run_locked(
    suite,
    planned,
    status,
    store,
    out,
    device,
    jobs,
    backend,
    scheduler,
    cache_features,
    force,
    std_components,
    metric_names,
    complete_only=False,
    verify_data=False,
) -> None:

    from fsad_bench.report.tables import print_table, write_tables
    from fsad_bench.run.schedule import run_suite

    cells = planned.cells
    todo = len(cells) if force else len(status["todo"])
    console.print(
        f"[bold]{suite.name}[/]: {len(cells)} cells ({len(cells) - todo} done), "
        f"{len(suite.methods)} methods, device {device}, results in {out}"
    )
    if status["stale"] and not force:
        console.print(
            f"{len(status['stale'])} of them were computed before with another configuration "
            f"(options, code, weights or data changed): recomputed"
        )
    t0 = time.perf_counter()
    from fsad_bench.run.progress import prior_costs

    cells = planned.cells
    todo_cells = list(cells) if force else status["todo"]
    prior = prior_costs(r for r in store.records() if r.get("method") in suite.methods)
    _with_progress(
        lambda: run_suite(
            suite,
            out,
            device=device,
            jobs=jobs,
            backend=backend,
            scheduler=scheduler,
            cache_features=cache_features,
            force=force,
            planned=planned,
            verify_data=verify_data,
        ),
        out,
        todo_cells,
        prior,
        jobs if backend == "loky" else 1,
    )
    tables = write_tables(
        out, suite.methods, std_components=std_components, metrics=metric_names, complete_only=complete_only
    )
    for name, table in tables.items():
        print_table(table, name, console)
    if note := store.foreign_note():
        console.print(note, markup=False, highlight=False)
    console.print(f"done in {time.perf_counter() - t0:.1f} s; tables in {out / 'tables'}")


def _running_text(running, done: int, most: int = 2) -> str:
    """What runs now, e.g. ``gaussian washer k=2 run 1: predict``; ``+N`` more beyond ``most``."""
    if not running:
        return "between cells" if done else "starting"
    text = " | ".join(r.describe() for r in running[:most])
    return text + (f" | +{len(running) - most}" if len(running) > most else "")


def _with_progress(work, out: Path, cells, prior: dict[str, float], parallel: int) -> None:
    """Run ``work()`` under a progress bar fed by the run's status files (:mod:`fsad_bench.run.progress`,
    polled twice a second in a thread: cells done, what runs now, a per-method ETA); warnings, of this
    process and forwarded from workers, print above the bar."""
    import warnings

    from fsad_bench.run.progress import RunWatcher, clear_status, format_eta

    clear_status(out)  # a killed run's files must not count (we hold the lock)
    watcher = RunWatcher(out, cells, prior, parallel=parallel)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("starting", total=len(cells), eta="?")

        def say(text: str) -> None:
            bar.console.print(text, markup=False, highlight=False, soft_wrap=True)

        def update(final: bool = False) -> None:
            snap = watcher.poll()
            for w in snap.warnings:
                say(w)
            bar.update(
                task,
                completed=len(cells) if final else snap.done,  # run_suite returned: all done
                eta="0:00:00" if final else format_eta(snap.eta),
                description="done" if final else _running_text(snap.running, snap.done),
            )

        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(0.5):
                update()

        previous = warnings.showwarning
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: say(
            warnings.formatwarning(m, c, f, n, line).rstrip()
        )
        thread = threading.Thread(target=loop, name="fsad-progress", daemon=True)
        thread.start()
        try:
            work()
        finally:
            stop.set()
            thread.join()
            warnings.showwarning = previous
        update(final=True)


def _print_dry_run(name: str, out: Path, status: dict[str, list]) -> None:
    from rich.table import Table

    t = Table(title=f"{name}: cells in {out} (dry run, nothing computed)")
    for col in ("method", "category", "done", "to do", "stale"):
        t.add_column(col, justify="left" if col in ("method", "category") else "right")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, state in enumerate(("done", "todo", "stale")):
        for c in status[state]:
            groups.setdefault((c.method, c.category), [0, 0, 0])[i] += 1
    for (m, c), (d, todo, stale) in groups.items():
        t.add_row(m, c, str(d), str(todo), str(stale))
    console.print(t)
    console.print(
        f"{len(status['done'])} done, {len(status['todo'])} to do ({len(status['stale'])} of them stale: "
        f"a record of another configuration exists), {len(status['foreign'])} records of no current cell",
        markup=False,
        highlight=False,
    )


@cli.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--reference-method", help="Mark Mean rows significantly different from this method (Wilcoxon).")
@click.option(
    "--std-components/--no-std-components",
    default=None,
    help="Also show the std (over train seed x run pairs) split into its support-draw and "
    "training-seed components (default: when the results have several train seeds).",
)
@click.option(
    "--metrics",
    "metric_list",
    help="Tables to build, e.g. image_auroc,image_f1max,pixel_aupr (default image_auroc,pixel_auroc,aupro).",
)
@click.option(
    "--complete-only",
    is_flag=True,
    help="Leave out every (method, k) missing a planned cell (an interrupted run); otherwise such cells are marked *.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Exit 3 when any record is flagged (constant scores, identical maps, "
    "chance-level AUROC, ...; docs/flags-and-operating-point.md).",
)
def table(
    results_dir: Path,
    reference_method: str | None,
    std_components: bool | None,
    metric_list: str | None,
    complete_only: bool,
    strict: bool,
) -> None:
    """Rebuild and print the tables of RESULTS_DIR without rerunning anything. An aggregate missing
    some cell the suite planned (categories, runs, training seeds) is marked * with a note."""
    if not results_dir.is_dir():
        raise FsadError(f"results folder {results_dir} does not exist")
    metric_names = _metric_names(metric_list)
    from fsad_bench.records.store import ResultStore
    from fsad_bench.report.tables import print_table, write_tables

    for name, t in write_tables(
        results_dir,
        reference_method=reference_method,
        std_components=std_components,
        metrics=metric_names,
        complete_only=complete_only,
    ).items():
        print_table(t, name, console)
    if note := ResultStore(results_dir).foreign_note():
        console.print(note, markup=False, highlight=False)
    console.print(f"tables in {results_dir / 'tables'}")
    if strict:
        from fsad_bench.report.flags_table import strict_failure

        if why := strict_failure(ResultStore(results_dir).frame()):
            err_console.print(f"--strict: {why}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(3)


@cli.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--yes", is_flag=True, help="Delete without asking (needed without a terminal).")
def prune(results_dir: Path, yes: bool) -> None:
    """Delete the records of RESULTS_DIR that no configuration run into it claims (cells recomputed since
    under another configuration: code, data, options) and invalid cell files, with their example maps and
    the temporary files a killed run left. Records of earlier runs that no later run replaced (e.g. the
    other methods after `run --methods X`) are kept. Shows what goes and asks first."""
    from collections import Counter

    from fsad_bench.records.store import ResultStore

    if not results_dir.is_dir():
        raise FsadError(f"results folder {results_dir} does not exist")
    store = ResultStore(results_dir)
    doomed = store.prunable()
    if doomed:
        per = Counter(what.split(":")[0] for what in doomed.values())
        names = ", ".join(p.name for p in list(doomed)[:5]) + (
            f", ... ({len(doomed) - 5} more)" if len(doomed) > 5 else ""
        )
        console.print(
            f"{len(doomed)} record{'s' if len(doomed) > 1 else ''} to delete from {results_dir} "
            f"({', '.join(f'{m}: {c}' for m, c in sorted(per.items()))}): {names}",
            markup=False,
            highlight=False,
        )
        if not yes:
            if not (sys.stdin is not None and sys.stdin.isatty()):
                raise FsadError(
                    f"prune would delete {len(doomed)} records from {results_dir} and no terminal is "
                    f"there to confirm; rerun with --yes"
                )
            if not click.confirm("delete them?", default=False):
                console.print("nothing deleted")
                return
    with store.lock():
        records, others = store.prune(only=set(doomed))
    console.print(f"removed {records} records and {others} other files from {results_dir}")


@cli.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--a", "method_a", required=True, help="Method (name or table label) A.")
@click.option("--b", "method_b", required=True, help="Method (name or table label) B.")
@click.option("--metric", default="image_auroc", show_default=True, type=METRIC_CHOICE)
@click.option("--resamples", type=int, default=10_000, show_default=True, help="Bootstrap resamples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option(
    "--allow-unpaired",
    is_flag=True,
    help="Test on the cells A and B share even when one has cells the other lacks (refused otherwise).",
)
def compare(
    results_dir: Path, method_a: str, method_b: str, metric: str, resamples: int, seed: int, allow_unpaired: bool
) -> None:
    """Paired comparison of A against B on the same cells of RESULTS_DIR: mean difference,
    bootstrap 95% CI, wins/ties/losses and Wilcoxon signed-rank p, per k and overall; how stable that is
    (p_a_ahead, and per category: P(A beats B) on a new support draw and training seed, the min–max of
    each over the draws), all from seeded bootstrap resamples of the (run, train seed) draws. Refused (exit 2)
    when A and B do not have the same (category, k, run, train seed) cells, unless --allow-unpaired."""
    if not results_dir.is_dir():
        raise FsadError(f"results folder {results_dir} does not exist")
    if resamples < 100:
        raise FsadError(f"--resamples must be >= 100, got {resamples}")
    from rich.markup import escape

    from fsad_bench.records.store import ResultStore, atomic_write_text
    from fsad_bench.report.significance import compare_methods, lottery_table, win_probability, with_ahead_column
    from fsad_bench.report.tables import print_table

    frame = ResultStore(results_dir).frame()
    t = compare_methods(frame, method_a, method_b, metric, resamples, seed=seed, allow_unpaired=allow_unpaired)
    wins = win_probability(frame, method_a, method_b, metric, resamples, seed=seed, allow_unpaired=allow_unpaired)
    t = with_ahead_column(t, wins)  # rank stability: P(A stays ahead when the draws are redrawn)
    shown = t.drop(columns=["a", "b", "metric"]).set_index(["dataset", "k"])
    shown.index = [f"{d} k={k}" for d, k in shown.index]
    a, b = escape(t["a"].iloc[0]), escape(t["b"].iloc[0])  # labels hold [options]: not rich markup
    print_table(shown, f"{a} − {b} ({metric}, percentage points)", console)
    print_table(
        lottery_table(wins), f"A = {a} vs B = {b} on a new support draw and training seed ({metric}, %)", console
    )
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{method_a}_vs_{method_b}")
    path = results_dir / "tables" / f"compare_{safe}_{metric}.csv"
    atomic_write_text(path, t.to_csv(index=False))
    atomic_write_text(draws := path.with_name(f"{path.stem}_draws.csv"), wins.to_csv(index=False))
    console.print(f"written {path}, {draws.name}")


@cli.command()
@click.argument("reference_dir", type=click.Path(path_type=Path))
@click.argument("rerun_dir", type=click.Path(path_type=Path))
@click.option("--metric", default="image_auroc", show_default=True, type=METRIC_CHOICE)
def rerun(reference_dir: Path, rerun_dir: Path, metric: str) -> None:
    """Check a rerun of a suite (another machine, thread count, library build) against the
    reference's printed error bars: per (k, method) Mean row the reference's mean ± std, the
    rerun's mean and the difference; exit status 1 when a Mean row lies outside the ± (as diff).
    Refused (exit 2) unless both folders ran the same suite (suite.json equal but for data paths)."""
    import pandas as pd

    from fsad_bench.records.store import ResultStore, atomic_write_text
    from fsad_bench.report.published import MEAN_ROW
    from fsad_bench.report.tables import check_rerun, print_table, rerun_agreement

    for d in (reference_dir, rerun_dir):
        if not d.is_dir():
            raise FsadError(f"results folder {d} does not exist")
    ref_store, rerun_store = ResultStore(reference_dir), ResultStore(rerun_dir)
    check_rerun(ref_store, rerun_store)
    t = rerun_agreement(ref_store.frame(), rerun_store.frame(), metric)
    if t.empty:
        raise FsadError(f"{reference_dir} and {rerun_dir} share no (dataset, category, k, method label) cell")
    mean = t[t["category"] == MEAN_ROW]
    several = t["dataset"].nunique() > 1
    shown = pd.DataFrame(
        [
            {
                "row": f"{r.label} k={r.k}" + (f" ({r.dataset})" if several else ""),
                "reference": f"{r.mean_ref:.1f} ± {r.std_ref:.1f}",
                "rerun": f"{r.mean_rerun:.1f} ± {r.std_rerun:.1f}",
                "Δ": f"{r.delta:+.1f}",
                "inside ±": "yes" if r.inside else "NO",
            }
            for r in mean.itertuples()
        ]
    ).set_index("row")
    shown.index.name = None
    print_table(shown, f"{metric}: rerun vs reference (Mean over categories, %)", console)
    cats = t[t["category"] != MEAN_ROW]
    console.print(
        f"Mean rows inside the reference's ±: {int(mean['inside'].sum())} of {len(mean)}; "
        f"per category: {int(cats['inside'].sum())} of {len(cats)}"
    )
    for store in (ref_store, rerun_store):
        if note := store.invalid_note():
            console.print(note, markup=False, highlight=False)
    path = rerun_dir / "tables" / f"rerun_vs_{reference_dir.name}_{metric}.csv"
    atomic_write_text(path, t.to_csv(index=False))
    console.print(f"written {path}")
    if not mean["inside"].all():
        sys.exit(1)


@cli.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "anomalib"]),
    default="csv",
    show_default=True,
    help="csv: every record field; anomalib: anomalib benchmark column names.",
)
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Every valid record, also of earlier runs and other configurations, with a `current` column.",
)
def export(results_dir: Path, out: Path, fmt: str, everything: bool) -> None:
    """Write the cells of the suite as last run in RESULTS_DIR to the CSV file OUT, one row per cell;
    the `complete` column says whether the row's (method, k) has every cell the suite planned."""
    if not (results_dir / "cells").is_dir():
        raise FsadError(f"{results_dir} is not a results folder (no cells/ inside)")
    from fsad_bench.records.store import ResultStore
    from fsad_bench.report.export import export as export_cells

    df = export_cells(results_dir, out, fmt, everything=everything)
    console.print(f"{len(df)} cells, {len(df.columns)} columns ({fmt}) written to {out}")
    if note := ResultStore(results_dir).invalid_note():
        console.print(note, markup=False, highlight=False)


@cli.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
def plot(results_dir: Path) -> None:
    """Write the figures of RESULTS_DIR to RESULTS_DIR/plots: AUROC vs k, per-category bars,
    ROC curves, anomaly-map overlays, and each sweep's metrics and seconds against the swept value."""
    from fsad_bench.report.plots import write_plots
    from fsad_bench.report.sweep_plots import write_sweep_plots

    if not results_dir.is_dir():
        raise FsadError(f"results folder {results_dir} does not exist")
    paths = write_plots(results_dir) + write_sweep_plots(results_dir)
    for p in paths:
        console.print(str(p))
    console.print(f"{len(paths)} figures in {results_dir / 'plots'}")


@cli.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--reference-method", help="Test every method against this one (default: gaussian when present).")
def report(results_dir: Path, reference_method: str | None) -> None:
    """Write RESULTS_DIR/report.html: one self-contained page (tables with published numbers and Δ,
    figures, anomaly maps, significance, provenance) that opens offline; also rewrites tables/ and plots/."""
    from fsad_bench.report.html import build_report

    path = build_report(
        results_dir,
        reference_method=reference_method,
        command=shlex.join(["fsad-bench", *sys.argv[1:]]) if sys.argv[1:2] == ["report"] else None,
    )
    console.print(f"written {path}")


@cli.command()
def methods() -> None:
    """List registered method adapters."""
    from rich.table import Table

    t = Table(title="methods")
    for col in ("name", "protocol", "presets", "reference"):
        t.add_column(col)
    for name in registry.available():
        info = registry.info(name)  # built-ins without importing torch
        t.add_row(name, info.protocol, ", ".join(info.presets), info.paper)
    console.print(t)


@cli.command()
def datasets() -> None:
    """List known datasets, their categories, and the built-in suites."""
    from rich.table import Table

    from fsad_bench.data.roots import KNOWN_DATASETS
    from fsad_bench.protocols import builtin_suites

    t = Table(title="datasets (MVTec AD or VisA split-CSV layout, or --data-root repeated to pool roots)")
    t.add_column("name")
    t.add_column("categories")
    for name, cats in KNOWN_DATASETS.items():
        t.add_row(name, ", ".join(cats) if cats else "generated by `fsad-bench synth` (built-in)")
    console.print(t)
    console.print("suites: " + ", ".join(builtin_suites()))


@cli.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write.")
@click.option("--categories", type=int, default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--train", "n_train", type=int, default=40, show_default=True, help="Normal training images per category."
)
@click.option("--size", type=int, default=256, show_default=True)
def synth(out: Path, categories: int, seed: int, n_train: int, size: int) -> None:
    """Write the synthetic dataset (MVTec AD layout) to OUT."""
    from fsad_bench.data.synthetic import category_names, generate

    generate(out, categories=categories, seed=seed, n_train=n_train, size=size)
    console.print(f"wrote {', '.join(category_names(categories))} to {out}")


@cli.group()
def supports() -> None:
    """Support-set lists (--support-lists): import the papers' own .pt files, export the sets a run used."""


@supports.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    required=True,
    help="Dataset folder holding the images the tensors were made from (MVTec AD or VisA layout).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["regad", "inctrl"]),
    required=True,
    help="regad: support_set/<category>/<k>_<n>.pt; inctrl: [<k>/]<category>.pt.",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("supports.json"), show_default=True)
@click.option("--size", type=int, help="Image side of the tensors (default: the format's, 224 / 240).")
@click.option(
    "--max-distance",
    type=float,
    default=1.0,
    show_default=True,
    help="Largest accepted mean absolute difference, in 8-bit grey levels.",
)
def supports_import(source: Path, data_root: Path, fmt: str, out: Path, size: int | None, max_distance: float) -> None:
    """Match every tensor of the .pt file(s) SOURCE to the normal training image it was made from and write
    the --support-lists JSON (with each file's SHA-256). Exit 2, naming the tensor, on a failed or ambiguous match."""
    from fsad_bench.data.official_supports import FORMATS, match_sets, matched_lists, read_stored
    from fsad_bench.data.roots import open_data_root
    from fsad_bench.data.support_lists import lists_json
    from fsad_bench.records.store import atomic_write_text

    if not data_root.is_dir():
        raise FsadError(f"data root {data_root} does not exist (--data-root: a dataset folder)")
    sets = read_stored(source, fmt, size)
    dataset = open_data_root(data_root.name, data_root)
    matches = match_sets(sets, dataset, fmt, size, max_distance)
    files = {c: {p.name: p for p in dataset.split(c).train} for c in {m.stored.category for m in matches}}
    size = size or FORMATS[fmt].size
    source_info = {
        "command": "supports import",
        "format": fmt,
        "from": str(source),
        "data_root": str(data_root),
        "preprocessing": FORMATS[fmt].describe.format(size=size),
        "max_distance": max_distance,
        "distances": {
            f"{m.stored.category}/k={m.stored.k}/run={m.stored.run}": [round(d, 4) for d in m.distances]
            for m in matches
        },
    }
    atomic_write_text(out, lists_json(matched_lists(matches), files, source_info))
    from rich.table import Table

    t = Table(title=f"{len(matches)} support sets matched ({fmt}); distance: mean |difference|, grey levels")
    for col in ("category", "k", "run", "files", "distance (max)", "next file (min)"):
        t.add_column(col)
    for m in matches:
        t.add_row(
            m.stored.category,
            str(m.stored.k),
            str(m.stored.run),
            ", ".join(m.names),
            f"{max(m.distances):.2f}",
            f"{min(m.runner_up):.2f}",
        )
    console.print(t)
    console.print(f"written {out}")


@supports.command("export")
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="JSON to write (default RESULTS_DIR/supports.json).")
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    help="Dataset folder to hash the files in (default: the data_root of RESULTS_DIR/suite.json).",
)
def supports_export(results_dir: Path, out: Path | None, data_root: Path | None) -> None:
    """Write the support sets the current records of RESULTS_DIR used (per category, k, run) as a
    --support-lists JSON with each file's SHA-256: `run --support-lists` on it draws the same images."""
    from fsad_bench.data.roots import open_data_root
    from fsad_bench.data.support_lists import lists_from_records, lists_json
    from fsad_bench.records.store import ResultStore, atomic_write_text

    if not (results_dir / "cells").is_dir():
        raise FsadError(f"{results_dir} is not a results folder (no cells/ inside)")
    store = ResultStore(results_dir)
    records = store.current_records()
    if not records:
        raise FsadError(f"{results_dir} holds no current record")
    names = sorted({str(r["dataset"]) for r in records})
    if len(names) > 1:
        raise FsadError(
            f"{results_dir} holds records of several datasets ({', '.join(names)}); a support list is per dataset"
        )
    suite = store.load_suite() or {}
    root = data_root or suite.get("data_root")
    if not root:
        raise FsadError(f"{results_dir}/suite.json names no data_root; pass --data-root")
    lists = lists_from_records(records)
    dataset = open_data_root(
        names[0],
        str(root) if isinstance(root, Path) else root,
        list(lists),
        layout=suite.get("layout", "auto"),
        folder=suite.get("folder") or None,
    )
    files = {c: {p.name: p for p in dataset.split(c).train} for c in lists}
    out = out or results_dir / "supports.json"
    atomic_write_text(
        out,
        lists_json(
            lists,
            files,
            {
                "command": "supports export",
                "from": str(results_dir),
                "dataset": names[0],
                "data_root": str(root),
                "seed": suite.get("seed"),
                "support_lists": suite.get("support_lists"),
            },
        ),
    )
    n = sum(len(runs) for ks in lists.values() for runs in ks.values())
    console.print(f"{n} support sets of {len(lists)} categor{'y' if len(lists) == 1 else 'ies'} written to {out}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (same message, exit 143 instead of 130)."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one message, however many signals follow
    raise Terminated()


STOPPED = "interrupted; finished cells are kept (rerun to resume)"


def main(argv: list[str] | None = None) -> None:
    """Entry point: FsadError -> one line on stderr, exit 2; a crash -> one line, exit 1;
    Ctrl-C -> one line, exit 130; SIGTERM -> the same line, exit 143."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _main(argv)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort as err:
        if isinstance(err.__cause__, EOFError):  # click turns EOFError into Abort: a bug or bad file, not Ctrl-C
            _crash(err.__cause__)
        err_console.print(STOPPED)
        sys.exit(143 if isinstance(err.__cause__, Terminated) else 130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except FsadError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except WorkerLost as err:  # a worker process or Dask worker died: exit 1, one line, finished cells kept
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt as err:
        err_console.print(STOPPED)
        sys.exit(143 if isinstance(err, Terminated) else 130)
    except Exception as err:  # a bug in a method: one line, the trace only on request
        _crash(err)


def _crash(err: BaseException) -> None:
    """A bug: one line (the traceback with ``FSAD_BENCH_DEBUG``), exit 1."""
    if "FSAD_BENCH_DEBUG" in __import__("os").environ:
        traceback.print_exception(err)
    err_console.print(
        f"error: {err.__class__.__name__}: {err} (set FSAD_BENCH_DEBUG=1 for the traceback; finished cells are kept)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    sys.exit(1)


if __name__ == "__main__":
    main()
