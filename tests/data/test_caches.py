"""Caches never serve a wrong number: the decoded-image cache is keyed by the decoding code and the
files' content identity, the data fingerprint follows symbolic links, cached models and features
are checked before they are loaded, and decoding errors name the file."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fsad_bench import identity
from fsad_bench.cli import main
from fsad_bench.components.feature_cache import CachedBackbone
from fsad_bench.data import image_cache, images
from fsad_bench.data.image_cache import ImageCache, cache_key, decoder_fingerprint, load_cached_image
from fsad_bench.data.images import MAX_PIXELS, load_image
from fsad_bench.data.integrity import verify_readable
from fsad_bench.data.mvtec import MVTecDataset
from fsad_bench.errors import FsadError
from fsad_bench.identity import CorruptFileWarning, digest_path, tree_fingerprint
from fsad_bench.protocols import Suite
from fsad_bench.records.store import ResultStore
from fsad_bench.run.plan import plan
from fsad_bench.run.schedule import run_suite

BASE = ["run", "--suite", "demo", "--k", "1", "--runs", "1", "--weights", "none", "--image-size", "64"]


def _suite(root: Path, methods=("meandiff",), runs: int = 2) -> Suite:
    return Suite(
        name="t",
        dataset="synthetic",
        data_root=str(root),
        methods=list(methods),
        categories=["grid"],
        k=[1],
        runs=runs,
        image_size=64,
        weights="none",
        seed=0,
    )


def _scores(out: Path, suite: Suite) -> dict[str, list[float]]:
    """Scores of the records of ``suite``'s current cells (stale ones may lie beside them)."""
    ids = {c.cell_id for c in plan(suite).cells}
    return {(r["k"], r["run"]): r["scores"] for r in ResultStore(out).records() if r["cell_id"] in ids}


def _fresh_cache(monkeypatch, tmp_path: Path, name: str) -> None:
    monkeypatch.setenv("FSAD_BENCH_CACHE", str(tmp_path / name))


# -- 1. the decoded-image cache is keyed by what produced its pixels ----------------------------------------
def test_decoder_edit_is_not_served_old_pixels(synth_root, spies, tmp_path, monkeypatch):
    """After an edit of the decoding code, recomputed records equal a run with an empty cache."""
    run_suite(_suite(synth_root), tmp_path / "a")  # warms the image cache with the old decoder
    original_load, original_source = image_cache.load_image, identity._source
    images_py = Path(images.__file__).resolve()
    monkeypatch.setattr(
        image_cache, "load_image", lambda p, s, r="bilinear": original_load(p, s, r) ** 2
    )  # the "new decoder"
    monkeypatch.setattr(
        identity,
        "_source",
        lambda p: original_source(p) + (b"\nGAMMA = 2\n" if Path(p).resolve() == images_py else b""),
    )
    for f in (identity.code_fingerprint, identity.module_fingerprint, decoder_fingerprint):
        f.cache_clear()
    try:
        run_suite(_suite(synth_root), tmp_path / "a")  # stale records recomputed through the same cache
        _fresh_cache(monkeypatch, tmp_path, "empty")
        run_suite(_suite(synth_root), tmp_path / "b")
        assert _scores(tmp_path / "a", _suite(synth_root)) == _scores(tmp_path / "b", _suite(synth_root))
    finally:
        monkeypatch.undo()
        for f in (identity.code_fingerprint, identity.module_fingerprint, decoder_fingerprint):
            f.cache_clear()


def _stored_png(src: Path, dst: Path, edit=None) -> None:
    """Re-save ``src`` as an uncompressed PNG at ``dst`` (its size then depends on the pixel count only)."""
    arr = np.asarray(Image.open(src).convert("RGB")).copy()
    if edit is not None:
        edit(arr)
    Image.fromarray(arr).save(dst, compress_level=0)


def test_same_size_edit_with_restored_mtime_is_seen_by_force(synth_root, spies, tmp_path, monkeypatch):
    """An edit that keeps the size, its mtime restored (``touch -r``): ``--force`` recomputes from the new pixels."""
    root = shutil.copytree(synth_root, tmp_path / "d", ignore=shutil.ignore_patterns("washer", "stripes*"))
    for p in (root / "grid").rglob("*.png"):
        _stored_png(p, p)
    run_suite(_suite(root), tmp_path / "a")
    victim = root / "grid" / "test" / "good" / "001.png"
    st = victim.stat()
    _stored_png(victim, victim, lambda a: a.__setitem__((slice(20, 40), slice(20, 40)), 255))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    run_suite(_suite(root), tmp_path / "a", force=True)
    _fresh_cache(monkeypatch, tmp_path, "empty")
    run_suite(_suite(root), tmp_path / "b")
    assert _scores(tmp_path / "a", _suite(root)) == _scores(tmp_path / "b", _suite(root))


def test_cache_key_fields(synth_root, tmp_path):
    src = tmp_path / "x.png"
    _stored_png(synth_root / "grid" / "train" / "good" / "000.png", src)
    stat_key, sample_key, full_key = (cache_key(src, 32, c) for c in ("stat", "sample", "full"))
    assert len({stat_key, sample_key, full_key}) == 3  # each mode keeps its own entries
    assert cache_key(src, 32) == stat_key and cache_key(src, 48) != stat_key
    st = src.stat()
    _stored_png(src, src, lambda a: a.__setitem__((0, 0), 7))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache_key(src, 32, "sample") != sample_key and cache_key(src, 32, "full") != full_key
    with pytest.raises(FsadError, match="not one of stat, sample, full"):
        ImageCache(tmp_path, "everything")


def test_sampled_and_full_content_hashes(tmp_path):
    f = tmp_path / "f.bin"
    data = bytearray(os.urandom(300_000))
    f.write_bytes(data)
    sampled, full = identity.sampled_sha256(f), identity.content_sha256(f)
    assert full == hashlib.sha256(data).hexdigest()
    data[-1] ^= 1  # the end is read by both
    f.write_bytes(data)
    assert identity.sampled_sha256(f) != sampled and identity.content_sha256(f) != full
    sampled, full = identity.sampled_sha256(f), identity.content_sha256(f)
    data[150_000] ^= 1  # the middle of a large file: only the full hash sees it (documented)
    f.write_bytes(data)
    assert identity.sampled_sha256(f) == sampled and identity.content_sha256(f) != full


def test_verify_data_hashes_every_image(synth_root, spies, tmp_path, capsys, monkeypatch):
    calls = []
    real = image_cache.content_sha256
    monkeypatch.setattr(image_cache, "content_sha256", lambda p: calls.append(p) or real(p))
    args = BASE + ["--data-root", str(synth_root), "--methods", "meandiff", "--categories", "grid"]
    main(args + ["--out", str(tmp_path / "a")])
    assert not calls
    main(args + ["--out", str(tmp_path / "b"), "--verify-data"])
    assert "1 cells" in capsys.readouterr().out
    assert {p.parent.parent.name for p in calls} == {"test", "train"}  # test images and the support


def test_cached_pixels_are_bit_identical(synth_root, tmp_path):
    paths = sorted((synth_root / "grid").rglob("test/*/*.png"))
    direct = torch.stack([load_image(p, 48) for p in paths])
    for check in ("stat", "sample", "full"):
        cache = ImageCache(tmp_path / "c", check)
        miss = torch.stack([load_cached_image(p, 48, cache) for p in paths])
        hit = torch.stack([load_cached_image(p, 48, cache) for p in paths])
        assert torch.equal(miss, direct) and torch.equal(hit, direct)


# -- 2. symbolic links in the data fingerprint ---------------------------------------------------------------
def _old_tree_fingerprint(folder: Path) -> str:
    """The fingerprint before links were followed (a tree without links must keep it)."""
    folder = Path(folder).resolve()
    h = hashlib.sha256(str(folder).encode())
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"\0{p.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _linked_copy(synth_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``grid`` whose ``train/good`` is a symbolic link to a folder outside it."""
    root = shutil.copytree(synth_root, tmp_path / "d", ignore=shutil.ignore_patterns("washer", "stripes*"))
    target = tmp_path / "elsewhere" / "good"
    shutil.move(root / "grid" / "train" / "good", target)
    (root / "grid" / "train" / "good").symlink_to(target, target_is_directory=True)
    return root, target


def test_tree_without_links_keeps_its_fingerprint(synth_root):
    assert tree_fingerprint(synth_root / "grid") == _old_tree_fingerprint(synth_root / "grid")


def test_fingerprint_enters_linked_folders(synth_root, tmp_path):
    root, target = _linked_copy(synth_root, tmp_path)
    grid = root / "grid"
    before = tree_fingerprint(grid)
    (target / "003.png").unlink()
    deleted = tree_fingerprint(grid)
    assert deleted != before
    os.utime(target / "004.png", ns=(1, 1))
    assert tree_fingerprint(grid) != deleted
    touched = tree_fingerprint(grid)
    copy = shutil.copytree(target, tmp_path / "copy", copy_function=shutil.copy2)  # same names, sizes, mtimes
    (grid / "train" / "good").unlink()
    (grid / "train" / "good").symlink_to(copy, target_is_directory=True)
    assert tree_fingerprint(grid) != touched  # the link's target is part of the identity


def test_fingerprint_follows_linked_files_and_survives_cycles(synth_root, tmp_path):
    root, target = _linked_copy(synth_root, tmp_path)
    grid = root / "grid"
    (target / "loop").symlink_to(target.parent, target_is_directory=True)  # good/loop -> elsewhere (contains good)
    (grid / "self").symlink_to(grid, target_is_directory=True)
    lone = tmp_path / "lone.png"
    shutil.copy(target / "000.png", lone)
    (grid / "extra.png").symlink_to(lone)
    (grid / "dangling.png").symlink_to(tmp_path / "nothing.png")
    before = tree_fingerprint(grid)  # terminates
    lone.write_bytes(lone.read_bytes() + b"x")
    assert tree_fingerprint(grid) != before


def test_dry_run_sees_changes_behind_a_linked_train_folder(synth_root, tmp_path, capsys):
    root, target = _linked_copy(synth_root, tmp_path)
    args = BASE + [
        "--data-root",
        str(root),
        "--methods",
        "random",
        "--categories",
        "grid",
        "--out",
        str(tmp_path / "r"),
    ]
    main(args)
    capsys.readouterr()
    (target / "003.png").unlink()
    os.utime(target / "004.png")
    main(args + ["--dry-run"])
    assert "0 done, 1 to do (1 of them stale" in capsys.readouterr().out


# -- 3. cached models and features are checked before they are loaded ---------------------------------------
def _model_file() -> Path:
    files = list(Path(os.environ["FSAD_BENCH_CACHE"]).glob("models/spy-agg/*/*.pt"))
    assert len(files) == 1 and digest_path(files[0]).is_file()
    return files[0]


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped", "no-record"])
def test_damaged_model_is_deleted_and_retrained(damage, synth_root, spies, tmp_path):
    suite = _suite(synth_root, ["spy-agg"], runs=1)
    run_suite(suite, tmp_path / "a")
    assert len(spies["spy-agg"].fit_calls) == 1
    model = _model_file()
    data = model.read_bytes()
    if damage == "truncated":
        model.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        model.write_bytes(b"")
    elif damage == "flipped":
        model.write_bytes(data[:-30] + bytes([data[-30] ^ 1]) + data[-29:])
    else:
        digest_path(model).unlink()
    with pytest.warns(CorruptFileWarning, match=rf"cached model {model}.*deleted, training again"):
        run_suite(suite, tmp_path / "b")
    assert len(spies["spy-agg"].fit_calls) == 2  # retrained
    assert _model_file() == model and identity.digest_problem(model) is None  # written again, checked
    run_suite(suite, tmp_path / "c")
    assert len(spies["spy-agg"].fit_calls) == 2  # and loaded


def test_empty_model_through_the_cli_is_not_an_interrupt(synth_root, spies, tmp_path, capsys):
    args = BASE + ["--data-root", str(synth_root), "--methods", "spy-agg", "--categories", "grid", "--train-seeds", "1"]
    main(args + ["--out", str(tmp_path / "a")])
    model = _model_file()
    model.write_bytes(b"")
    capsys.readouterr()
    main(args + ["--out", str(tmp_path / "b")])  # no SystemExit: retrained, finished
    out = capsys.readouterr().out.replace("\n", "")  # the warning prints above the progress bar, in one line
    assert "CorruptFileWarning" in out and "is unusable" in out and model.name in out
    assert len(ResultStore(tmp_path / "b").records()) == 1


def test_eof_error_is_a_crash_not_an_interrupt(synth_root, tmp_path, capsys, monkeypatch, cli):
    import fsad_bench.run.schedule as schedule

    def fail(*a, **k):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(schedule, "run_suite", fail)
    code, _, err = cli(BASE + ["--data-root", str(synth_root), "--methods", "random", "--out", str(tmp_path / "r")])
    assert code == 1 and "EOFError: Ran out of input" in err and "interrupted" not in err


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_feature_file_is_recomputed(damage, tmp_path):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = backbone

        def forward(self, x):
            return [self.body(x).contiguous(memory_format=torch.channels_last)]

    images_ = torch.rand(2, 3, 16, 16)
    expected = CachedBackbone(Net(), "t", tmp_path)(images_)[0]
    files = sorted(tmp_path.rglob("*.feat.pt"))
    assert len(files) == 2 and all(digest_path(f).is_file() for f in files)
    files[0].write_bytes(files[0].read_bytes()[:40] if damage == "truncated" else b"")
    with pytest.warns(CorruptFileWarning, match=rf"cached features {files[0]}.*computing them again"):
        again = CachedBackbone(Net(), "t", tmp_path)
        out = again(images_)[0]
    assert torch.allclose(out, expected, atol=1e-6) and again.misses == 1 and again.hits == 1  # batch of 1: float order
    assert identity.digest_problem(files[0]) is None  # rewritten


# -- 4. decoding errors name the file --------------------------------------------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` (1-bit gray), with a tiny IDAT and IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("side", [14000, 9500])  # Pillow's bomb error (> 2x its limit), and just over the limit
def test_too_large_image_is_one_line_naming_the_file(side, synth_root, tmp_path, capsys, cli):
    assert side * side > MAX_PIXELS
    bomb = _png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(FsadError, match=rf"cannot read image {bomb}: .*larger than {MAX_PIXELS} pixels"):
        load_image(bomb, 64)
    root = shutil.copytree(synth_root, tmp_path / "d", ignore=shutil.ignore_patterns("washer", "stripes*"))
    victim = root / "grid" / "test" / "good" / "002.png"
    shutil.copy(bomb, victim)
    with pytest.raises(FsadError, match=rf"{victim}.*larger than {MAX_PIXELS} pixels"):
        verify_readable(MVTecDataset(root))
    code, _, err = cli(BASE + ["--data-root", str(root), "--methods", "random", "--out", str(tmp_path / "r")])
    assert code == 2 and str(victim) in err and f"larger than {MAX_PIXELS} pixels" in err
    assert len(err.strip().splitlines()) == 1, err


def test_any_pillow_error_while_decoding_names_the_file(synth_root, monkeypatch):
    path = synth_root / "grid" / "train" / "good" / "000.png"

    def unsupported(im):
        raise KeyError(im.mode)

    monkeypatch.setattr(images, "_as_rgb", unsupported)
    with pytest.raises(FsadError, match=rf"cannot read image {path} \(mode RGB, 64x64\): KeyError: 'RGB' \(expected "):
        load_image(path, 32)
    monkeypatch.setattr(images, "_mask_array", unsupported)
    mask = next((synth_root / "grid" / "ground_truth").rglob("*.png"))
    with pytest.raises(FsadError, match=rf"cannot read mask {mask} \(mode .*\): KeyError"):
        images.load_mask(mask, 32)
