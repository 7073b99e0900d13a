"""Issue 13: never a stale or mixed record, every bad input caught before the work, safe I/O."""

import errno
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from fsad_bench import identity, registry
from fsad_bench.adapter import Adapter
from fsad_bench.cli import main
from fsad_bench.records.store import ResultStore
from fsad_bench.report.tables import paper_table
from fsad_bench.run.plan import config_hash, open_dataset
from fsad_bench.run.schedule import run_suite

BASE = ["run", "--suite", "demo", "--k", "1", "--runs", "1", "--weights", "none", "--image-size", "64"]


def _one_line_error(args, cli, *needles):
    code, _, err = cli(args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def _hash(suite, method="gaussian", category="grid"):
    ds = open_dataset(suite)
    return config_hash(suite, method, category, ds)


# -- §1 stale and mixed records ----------------------------------------------------------------
def test_config_hash_covers_what_changes_numbers(make_suite, synth_root, tmp_path, monkeypatch):
    suite = make_suite(methods=["gaussian"])
    h = _hash(suite)
    assert _hash(make_suite(methods=["gaussian"])) == h  # deterministic
    assert _hash(make_suite(methods=["gaussian"], preset="paper")) == h  # gaussian's cpu and paper: same values
    assert _hash(make_suite(methods=["gaussian"], preset="padim")) != h
    assert _hash(make_suite(methods=["gaussian"], options={"gaussian": {"eps": 0.5}})) != h
    assert _hash(make_suite(methods=["gaussian"], image_size=96)) != h
    assert _hash(make_suite(methods=["gaussian"], seed=1)) != h
    cls = registry.get("gaussian")
    monkeypatch.setitem(cls.presets, "cpu", {**cls.presets["cpu"], "sigma": 2.0})  # edited preset value
    assert _hash(suite) != h
    monkeypatch.undo()
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"a" * 100)
    hw = _hash(make_suite(methods=["gaussian"], weights=str(weights)))
    weights.write_bytes(b"b" * 100)
    assert _hash(make_suite(methods=["gaussian"], weights=str(weights))) != hw
    supports = tmp_path / "s.json"
    supports.write_text("{}")
    hs = _hash(make_suite(methods=["gaussian"], support_lists=str(supports)))
    supports.write_text('{"x": 1}')
    assert _hash(make_suite(methods=["gaussian"], support_lists=str(supports))) != hs
    # data identity: another file in the category changes it; another category only for aggregated methods
    root = shutil.copytree(synth_root, tmp_path / "d")
    other = make_suite(methods=["gaussian"], data_root=str(root))
    hg, hw_, ha = _hash(other), _hash(other, category="washer"), _hash(other, "regad", "washer")
    shutil.copy(root / "grid" / "train" / "good" / "000.png", root / "grid" / "train" / "good" / "999.png")
    assert _hash(other) != hg and _hash(other, category="washer") == hw_
    assert _hash(other, "regad", "washer") != ha  # regad (aggregated) trains on grid


def test_code_edit_changes_the_hash(make_suite, tmp_path, monkeypatch):
    mod = tmp_path / "editme.py"
    src = (
        "from fsad_bench.adapter import Adapter\n"
        "class EditMe(Adapter):\n    name = 'editme'\n    def adapt(self, s): pass\n"
        "    def predict(self, x): return x.mean((1, 2, 3)), x.mean(1)  # v1\n"
    )
    mod.write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    import editme

    registry.register(editme.EditMe)
    try:
        suite = make_suite(methods=["editme"])
        h = _hash(suite, "editme")
        mod.write_text(src.replace("# v1", "# the first version"))  # a comment: the same code
        identity.code_fingerprint.cache_clear()
        assert _hash(suite, "editme") == h
        mod.write_text(src.replace("x.mean(1)", "x.amax(1)"))  # the code
        identity.code_fingerprint.cache_clear()
        assert _hash(suite, "editme") != h
    finally:
        registry.unregister("editme")


def test_weights_hash_is_cached_by_path_size_mtime(tmp_path, monkeypatch):
    f = tmp_path / "w.pth"
    f.write_bytes(b"x" * 1000)
    first = identity.file_sha256(f, tmp_path / "cache")
    monkeypatch.setattr(identity, "_sha256_file", lambda p: pytest.fail("re-read an unchanged file"))
    assert identity.file_sha256(f, tmp_path / "cache") == first
    monkeypatch.undo()
    f.write_bytes(b"y" * 1001)
    assert identity.file_sha256(f, tmp_path / "cache") != first


def test_changed_data_recomputes_and_old_records_are_not_shown(synth_root, tmp_path, capsys):
    root = shutil.copytree(synth_root, tmp_path / "d")
    out = tmp_path / "r"
    args = BASE + ["--data-root", str(root), "--methods", "random", "--runs", "2", "--out", str(out)]
    main(args)
    capsys.readouterr()
    img = root / "grid" / "test" / "good" / "000.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(img)  # other images, same names
    main(args)
    text = capsys.readouterr().out
    assert "6 cells (4 done)" in text and "2 of them were computed before with another configuration" in text
    assert "2 records of another configuration ignored (random: 2); `fsad-bench prune" in text
    assert len(ResultStore(out).frame()) == 6


def test_image_size_change_does_not_mix_records(make_suite, tmp_path, capsys):
    out = tmp_path / "r"
    run_suite(make_suite(runs=2), out)
    run_suite(make_suite(runs=2, image_size=96), out)
    store = ResultStore(out)
    assert len(store.records()) == 24 and len(store.frame()) == 12
    assert set(store.frame()["image_size"]) == {96}
    main(["table", str(out)])
    assert "12 records of another configuration ignored (random: 12)" in capsys.readouterr().out
    main(["prune", str(out), "--yes"])
    assert "removed 12 records" in capsys.readouterr().out
    assert len(store.records()) == 12 and store.foreign_note() is None
    assert paper_table(store.frame(), "image_auroc").equals(paper_table(store.frame(everything=True), "image_auroc"))


def test_model_cache_key_follows_the_configuration(make_suite, spies, tmp_path, monkeypatch):
    monkeypatch.setattr(spies["spy-agg"], "presets", {"cpu": {"lr": 1.0}})
    run_suite(make_suite(methods=["spy-agg"], k=[1], runs=1), tmp_path / "a")
    run_suite(make_suite(methods=["spy-agg"], k=[1], runs=1), tmp_path / "b")
    assert len(spies["spy-agg"].fit_calls) == 3  # same configuration: the cached fits
    run_suite(make_suite(methods=["spy-agg"], k=[1], runs=1, options={"spy-agg": {"lr": 2.0}}), tmp_path / "c")
    assert len(spies["spy-agg"].fit_calls) == 6  # another configuration: trained again, not the old model
    run_suite(make_suite(methods=["spy-agg"], k=[1], runs=1), tmp_path / "a", force=True)
    assert len(spies["spy-agg"].fit_calls) == 9  # --force retrains too


def test_force_and_dry_run(synth_root, tmp_path, capsys):
    out = tmp_path / "r"
    args = BASE + ["--data-root", str(synth_root), "--methods", "random", "--out", str(out)]
    main(args + ["--dry-run"])
    text = capsys.readouterr().out
    assert "0 done, 3 to do" in text and not out.exists()  # nothing written
    main(args)
    before = {r["cell_id"]: r["finished_at"] for r in ResultStore(out).records()}
    capsys.readouterr()
    main(args + ["--k", "2", "--dry-run"])
    assert "0 done, 3 to do (0 of them stale" in capsys.readouterr().out
    main(args + ["--image-size", "96", "--dry-run"])
    assert "0 done, 3 to do (3 of them stale" in capsys.readouterr().out
    main(args + ["--dry-run"])
    assert "3 done, 0 to do" in capsys.readouterr().out
    assert {r["cell_id"]: r["finished_at"] for r in ResultStore(out).records()} == before
    main(args + ["--force"])
    assert "3 cells (0 done)" in capsys.readouterr().out
    after = ResultStore(out).records()
    assert {r["cell_id"] for r in after} == set(before)
    assert all(np.isfinite(r["image_auroc"]) for r in after)


# -- §3 bad input --------------------------------------------------------------------------------
def _suite_file(tmp_path, synth_root, extra="", **replace):
    lines = {
        "name": '"t"',
        "dataset": '"synthetic"',
        "data_root": f'"{synth_root}"',
        "methods": '["random", "gaussian"]',
        "k": "[1]",
        "runs": "1",
        "image_size": "64",
        "weights": '"none"',
    }
    lines.update(replace)
    path = tmp_path / "s.toml"
    path.write_text("\n".join(f"{k} = {v}" for k, v in lines.items()) + "\n" + extra)
    return path


@pytest.mark.parametrize(
    "extra,needles",
    [
        ("[options.gaussian]\nepss = 0.5\n", ["unknown option 'epss' for method 'gaussian'", "valid:", "eps"]),
        ("[options.gausian]\neps = 0.5\n", ["[options.gausian] names no method of this suite", "gaussian"]),
        ('[options.gaussian]\neps = "big"\n', ["option 'eps' of method 'gaussian' must be a number > 0", "'big'"]),
        ("[options.gaussian]\naugment = 1\n", ["option 'augment' of method 'gaussian' must be true or false"]),
    ],
)
def test_bad_options_are_errors_before_any_work(extra, needles, synth_root, tmp_path, capsys, cli):
    path = _suite_file(tmp_path, synth_root, extra)
    _one_line_error(["run", "--suite", str(path), "--out", str(tmp_path / "r")], cli, *needles)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("runs", '"two"', "key 'runs' must be an integer, got 'two' (str)"),
        ("image_size", "64.5", "key 'image_size' must be an integer, got 64.5 (float)"),
        ("weights", "false", "key 'weights' must be a string, got False (bool)"),
        ("k", '[1, "2"]', "key 'k' must be a list of integers"),
        ("categories", "[1]", "key 'categories' must be a list of strings"),
    ],
)
def test_suite_types_are_checked(key, value, needle, synth_root, tmp_path, capsys, cli):
    path = _suite_file(tmp_path, synth_root, **{key: value})
    _one_line_error(["run", "--suite", str(path), "--out", str(tmp_path / "r")], cli, needle, str(path))


def test_single_values_of_list_keys_are_lists(synth_root, tmp_path, capsys):
    from fsad_bench.protocols import load_suite

    suite = load_suite(str(_suite_file(tmp_path, synth_root, k="2", categories='"washer"', methods='"random"')))
    assert (suite.k, suite.categories, suite.methods) == ([2], ["washer"], ["random"])


def test_unknown_preset_and_device(synth_root, tmp_path, capsys, cli):
    args = BASE + ["--data-root", str(synth_root), "--methods", "random,diffnet", "--out", str(tmp_path / "r")]
    _one_line_error(args + ["--preset", "papr"], cli, "unknown preset 'papr'", "cpu, paper")
    _one_line_error(args + ["--device", "tpu"], cli, "unknown --device 'tpu'", "cpu, cuda")
    assert not (tmp_path / "r").exists()


def test_missing_weights_file_is_an_error_at_planning(synth_root, tmp_path, capsys, cli):
    args = BASE + ["--data-root", str(synth_root), "--methods", "gaussian", "--out", str(tmp_path / "r")]
    missing = tmp_path / "nope.pth"
    _one_line_error(args + ["--weights", str(missing)], cli, f"weights file {missing} does not exist")
    assert not (tmp_path / "r").exists()


def test_cell_ids_are_plain_file_names():
    from fsad_bench.run.plan import Cell

    cell = Cell("anomalib:Padim", "training-free", "mvtec", "metal nut", 2, 0, "abc", 1)
    assert cell.cell_id.startswith("anomalib_Padim-metal_nut-k2-r0-t1-")
    other = Cell("anomalib_Padim", "training-free", "mvtec", "metal nut", 2, 0, "abc", 1)
    assert other.cell_id != cell.cell_id  # the hash keeps the raw names apart


def test_stale_counts_each_train_seed(synth_root, tmp_path, capsys):
    out = tmp_path / "r"
    args = BASE + ["--data-root", str(synth_root), "--methods", "regad-l", "--categories", "grid", "--out", str(out)]
    main(args + ["--train-seeds", "1"])
    capsys.readouterr()
    main(args + ["--train-seeds", "2", "--image-size", "96", "--dry-run"])
    assert "0 done, 2 to do (1 of them stale" in capsys.readouterr().out


def test_duplicates_are_computed_once(synth_root, spies, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(spies["meandiff"], "adapt", lambda self, s: calls.append(1) or setattr(self, "mean", s.mean(0)))
    out = tmp_path / "r"
    main(BASE + ["--data-root", str(synth_root), "--methods", "meandiff,meandiff", "--k", "1,1", "--out", str(out)])
    assert "3 cells (0 done), 1 methods" in capsys.readouterr().out
    assert len(calls) == 3


def test_truncated_image_found_at_planning(synth_root, tmp_path, capsys, cli):
    root = shutil.copytree(synth_root, tmp_path / "d")
    (root / "washer" / "train" / "good" / "011.png").write_bytes(b"")  # a file no k=1 draw may ever pick
    err = _one_line_error(
        BASE + ["--data-root", str(root), "--methods", "random", "--out", str(tmp_path / "r")],
        cli,
        "washer/train/good/011.png",
    )
    assert not (tmp_path / "r").exists(), err


# -- §4 I/O ---------------------------------------------------------------------------------------
def test_unusable_out_folders(synth_root, tmp_path, capsys, monkeypatch, cli):
    args = BASE + ["--data-root", str(synth_root), "--methods", "random", "--out"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(args + [str(afile)], cli, f"--out {afile} is a file")
    _one_line_error(args + [str(afile / "sub")], cli, f"cannot write to results folder {afile / 'sub'}")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    if _writable_anyway(ro):  # root (CAP_DAC_OVERRIDE, as in CI) ignores modes: refuse as the kernel refuses others
        _refuse_new_entries(ro, monkeypatch)
    _one_line_error(args + [str(ro / "r")], cli, f"cannot write to results folder {ro / 'r'}", "Permission denied")


def _writable_anyway(folder) -> bool:
    """Whether this process can create an entry in ``folder`` whatever its mode says (root can)."""
    try:
        (folder / "probe").mkdir()
    except PermissionError:
        return False
    (folder / "probe").rmdir()
    return True


def _refuse_new_entries(folder, monkeypatch) -> None:
    """``os.mkdir`` / ``os.open(O_CREAT)`` of an entry directly in ``folder`` fail with EACCES, the error
    the kernel gives a non-root process in a folder of mode 0o555 (so the same code path runs as root)."""
    real_mkdir, real_open = os.mkdir, os.open

    def refused(path):
        return os.path.dirname(os.path.abspath(os.fspath(path))) == str(folder)

    def mkdir(path, *args, **kwargs):
        if refused(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and refused(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


def test_disk_full_leaves_nothing_partial(synth_root, tmp_path, capsys, monkeypatch, cli):
    import fsad_bench.records.store as store_mod

    real = np.savez_compressed

    def full(f, **arrays):
        real(f, **arrays)  # the bytes are half on disk when the device fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_mod.np, "savez_compressed", full)
    out = tmp_path / "r"
    _one_line_error(
        BASE + ["--data-root", str(synth_root), "--methods", "random", "--out", str(out)],
        cli,
        f"cannot write {out / 'maps'}",
        "No space left on device",
    )
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert not list((out / "maps").glob("*.npz"))


def test_empty_cache_variable_is_not_the_current_folder(monkeypatch, tmp_path):
    from fsad_bench.run.paths import cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FSAD_BENCH_CACHE", "")
    assert cache_dir() != tmp_path and cache_dir().is_absolute()
    monkeypatch.setenv("FSAD_BENCH_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_written_files_have_ordinary_modes(make_suite, tmp_path):
    out = tmp_path / "r"
    run_suite(make_suite(methods=["random"], k=[1], runs=1), out)
    from fsad_bench.report.tables import write_tables

    write_tables(out)
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in out.rglob("*") if p.is_file() and p.name != ".lock"]
    assert {p.parent.name for p in files} >= {"cells", "maps", "tables", "r"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


class Hog(Adapter):
    """Allocates (and touches) 300 MiB while adapting, frees it after predicting."""

    name = "hog"
    protocol = "training-free"

    def adapt(self, support):
        self.big = np.ones(300 * 2**20 // 8)

    def predict(self, images):
        self.big = None
        return torch.zeros(len(images)), torch.zeros(len(images), *images.shape[-2:])


@pytest.mark.parametrize("hwm_reset", [True, False])
def test_peak_memory_is_each_cells_own(hwm_reset, make_suite, spies, tmp_path, monkeypatch):
    import fsad_bench.run.peak_memory as memory

    if not hwm_reset:  # as in containers that refuse /proc/self/clear_refs: the sampling thread alone
        monkeypatch.setattr(memory, "_vm_hwm_mb", lambda: None)
    registry.register(Hog)
    try:
        run_suite(make_suite(methods=["hog", "meandiff"], k=[1], runs=1), tmp_path / "r")
    finally:
        registry.unregister("hog")
    recs = ResultStore(tmp_path / "r").records()
    hog = [r["peak_memory_mb"] for r in recs if r["method"] == "hog"]
    light = [r["peak_memory_mb"] for r in recs if r["method"] == "meandiff"]
    assert min(hog) > max(light) + 200, (hog, light)  # meandiff ran after hog, in the same process
