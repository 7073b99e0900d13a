import shutil

import numpy as np
import pytest
import torch

from fsad_bench.data.images import load_image
from fsad_bench.data.mvtec import MVTecDataset
from fsad_bench.errors import FsadError


def test_reader_lists_mvtec_layout(synth_root):
    ds = MVTecDataset(synth_root, name="synthetic")
    assert ds.categories == ["grid", "stripes", "washer"]
    split = ds.split("washer")
    assert len(split.train) == 12 and all(p.parent.name == "good" for p in split.train)
    assert sum(1 for s in split.test if s.label == 0) == 6 and split.n_anomalous == 8
    assert all((s.mask_path is None) == (s.label == 0) for s in split.test)


def test_test_set_images_and_binary_masks(synth_root, load_test_set):
    split = MVTecDataset(synth_root).split("stripes")
    test = load_test_set(split, 32)
    assert test.images.shape == (14, 3, 32, 32) and 0 <= test.images.min() and test.images.max() <= 1
    assert set(np.unique(test.masks.numpy())) <= {0.0, 1.0}
    normal = torch.as_tensor(test.labels == 0)
    assert test.masks[normal].sum() == 0
    assert (test.masks[~normal].flatten(1).sum(1) > 0).all()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_mask_is_one_clear_error(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path / "d")
    (root / "grid" / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(FsadError, match=r"missing ground-truth mask for .*hole/000\.png: expected .*000_mask\.png"):
        MVTecDataset(root).split("grid")


def test_corrupt_image_names_the_file(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path / "d")
    bad = root / "grid" / "train" / "good" / "003.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(FsadError, match=r"cannot read image .*003\.png"):
        load_image(bad, 32)


def test_missing_root_and_unknown_category(tmp_path, synth_root):
    with pytest.raises(FsadError, match="does not exist"):
        MVTecDataset(tmp_path / "nope")
    with pytest.raises(FsadError, match="category 'bottle' not found"):
        MVTecDataset(synth_root, categories=["bottle"])


def test_btad_style_layout(tmp_path, synth_root):
    """BTAD names normal folders ``ok`` and masks ``<stem>.png``."""
    root = tmp_path / "btad" / "01"
    shutil.copytree(synth_root / "grid" / "train" / "good", root / "train" / "ok")
    shutil.copytree(synth_root / "grid" / "test" / "good", root / "test" / "ok")
    shutil.copytree(synth_root / "grid" / "test" / "hole", root / "test" / "ko")
    (root / "ground_truth" / "ko").mkdir(parents=True)
    for m in (synth_root / "grid" / "ground_truth" / "hole").iterdir():
        shutil.copy(m, root / "ground_truth" / "ko" / m.name.replace("_mask", ""))
    split = MVTecDataset(tmp_path / "btad").split("01")
    assert split.n_anomalous == 2 and len(split.train) == 12


# -- formats, layouts, pooled roots, bad input (issue 11, issue 13 §3) ----------------------
import csv  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from PIL import Image  # noqa: E402

from fsad_bench.data.dataset import DataWarning  # noqa: E402
from fsad_bench.data.folder_pair import FolderPairDataset  # noqa: E402
from fsad_bench.data.images import load_mask  # noqa: E402
from fsad_bench.data.integrity import verify_readable  # noqa: E402
from fsad_bench.data.roots import PooledDataset, open_data_root  # noqa: E402
from fsad_bench.data.visa import VisaDataset  # noqa: E402


def _pattern(w: int, h: int, seed: int, defect: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A smooth grey pattern ``(h, w)`` uint8 and its defect mask (a bright square when ``defect``)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = 100 + 40 * np.sin(x / 5.0 + rng.uniform(0, 1)) + rng.normal(0, 3, (h, w))
    mask = np.zeros((h, w), np.uint8)
    if defect:
        mask[h // 3 : h // 3 + h // 4, w // 3 : w // 3 + w // 4] = 255
        img[mask > 0] = 250
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _save(arr: np.ndarray, path: Path, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode == "RGB":
        im = im.convert("RGB")
    elif mode == "I;16":
        im = Image.fromarray(arr.astype(np.uint16) * 257)
    im.save(path)
    return path


def _mvtec(
    root: Path,
    cat: str,
    ext: str = ".png",
    mode: str = "L",
    mask_ext: str = ".png",
    sizes: list[tuple[int, int]] | None = None,
) -> Path:
    """A tiny MVTec-layout category: 4 train, 2 good + 2 defective test images (masks ``<stem>_mask``)."""
    sizes = sizes or [(40, 32)]
    c = root / cat
    for i in range(4):
        _save(_pattern(*sizes[i % len(sizes)], i)[0], c / "train" / "good" / f"{i:03d}{ext}", mode)
    for i in range(2):
        _save(_pattern(*sizes[i % len(sizes)], 10 + i)[0], c / "test" / "good" / f"{i:03d}{ext}", mode)
        img, mask = _pattern(*sizes[(i + 1) % len(sizes)], 20 + i, defect=True)
        _save(img, c / "test" / "crack" / f"{i:03d}{ext}", mode)
        _save(mask, c / "ground_truth" / "crack" / f"{i:03d}_mask{mask_ext}")
    return root


@pytest.mark.parametrize(
    "ext,mode,mask_ext",
    [
        (".jpg", "L", ".png"),  # magnetic tile: grayscale JPEG, PNG masks
        (".JPG", "RGB", ".PNG"),  # upper-case suffixes (VisA ships .JPG)
        (".bmp", "RGB", ".bmp"),  # BTAD-style BMP
        (".tif", "L", ".tiff"),  # TIFF images and masks
        (".tiff", "I;16", ".tif"),  # 16-bit grayscale TIFF
        (".png", "I;16", ".png"),  # 16-bit PNG
    ],
)
def test_formats_read_as_rgb_and_binary_masks(tmp_path, ext, mode, mask_ext, load_test_set):
    root = _mvtec(tmp_path / "d", "part", ext, mode, mask_ext, sizes=[(40, 32), (52, 30)])
    ds = MVTecDataset(root)
    split = ds.split("part")
    assert len(split.train) == 4 and split.n_anomalous == 2
    assert all(p.suffix == ext for p in split.train)
    test = load_test_set(split, 24)
    assert test.images.shape == (4, 3, 24, 24)
    # grey replicated into 3 channels; 16-bit scaled, not clipped at 255
    assert torch.allclose(test.images[:, 0], test.images[:, 2])
    assert 0.2 < float(test.images[test.labels == 0].mean()) < 0.6
    assert set(np.unique(test.masks.numpy())) == {0.0, 1.0}
    assert (test.masks[test.labels == 1].flatten(1).sum(1) > 0).all()
    assert verify_readable(ds) == 4 + 4 + 2


def test_mask_of_another_size_names_both_files(tmp_path, load_test_set):
    root = _mvtec(tmp_path / "d", "part")
    mask = root / "part" / "ground_truth" / "crack" / "001_mask.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(mask)
    split = MVTecDataset(root).split("part")
    pattern = r"mask .*001_mask\.png is 20x20 but its image .*crack/001\.png is 40x32"
    with pytest.raises(FsadError, match=pattern):
        verify_readable(split)
    with pytest.raises(FsadError, match=pattern):
        load_test_set(split, 16)
    with pytest.raises(FsadError, match=pattern):
        load_mask(mask, 16, image=root / "part" / "test" / "crack" / "001.png")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])
def test_verify_readable_finds_empty_and_truncated_files(tmp_path, damage, ext):
    root = _mvtec(tmp_path / "d", "part", ext)
    bad = root / "part" / "train" / "good" / f"002{ext}"
    data = bad.read_bytes()
    bad.write_bytes(b"" if damage == "empty" else data[: len(data) * 2 // 3])
    with pytest.raises(FsadError, match=rf"cannot read image .*002\{ext}"):
        verify_readable(MVTecDataset(root))


def test_folder_without_train_good_warns_or_fails(tmp_path):
    root = _mvtec(tmp_path / "d", "part")
    (root / "broken" / "test" / "good").mkdir(parents=True)
    with pytest.warns(DataWarning, match=r"skipping folder\(s\) without train/good: broken"):
        assert MVTecDataset(root).categories == ["part"]
    with pytest.raises(FsadError, match=r"category 'broken' not found .*broken/train/good"):
        MVTecDataset(root, categories=["part", "broken"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # listed explicitly: nothing to warn about
        assert MVTecDataset(root, categories=["part"]).categories == ["part"]


def _visa(root: Path) -> Path:
    """VisA layout: <obj>/Data/Images/{Normal,Anomaly}/*.JPG, masks PNG (values 0/1), split_csv/1cls.csv."""
    rows = []
    for obj in ("candle", "pcb1"):
        base = root / obj / "Data"
        for i in range(5):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _save(_pattern(36, 28, i)[0], root / rel, "RGB")
            rows.append([obj, "train" if i < 3 else "test", "normal", rel, ""])
        for i in range(2):
            img, mask = _pattern(36, 28, 30 + i, defect=True)
            rel, mrel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _save(img, root / rel, "RGB")
            _save((mask > 0).astype(np.uint8), root / mrel)  # label image: 0 / 1
            rows.append([obj, "test", "anomaly", rel, mrel])
        assert base.is_dir()
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["object", "split", "label", "image", "mask"], *rows])
    return root


def test_visa_split_csv(tmp_path, load_test_set):
    root = _visa(tmp_path / "VisA")
    ds = open_data_root("visa", root)  # layout auto-detected from split_csv/1cls.csv
    assert isinstance(ds, VisaDataset) and ds.categories == ["candle", "pcb1"]
    split = ds.split("pcb1")
    assert [p.name for p in split.train] == ["0000.JPG", "0001.JPG", "0002.JPG"]
    assert [(s.label, s.defect) for s in split.test] == [(0, "good"), (0, "good"), (1, "anomaly"), (1, "anomaly")]
    test = load_test_set(split, 16)
    assert (test.masks[test.labels == 1].flatten(1).sum(1) > 0).all()  # 0/1 masks are not lost
    assert verify_readable(ds) == 2 * (5 + 2 + 2)
    with pytest.raises(FsadError, match="category 'cable' not found"):
        open_data_root("visa", root, categories=["cable"])
    (root / "pcb1" / "Data" / "Images" / "Normal" / "0004.JPG").unlink()
    with pytest.raises(FsadError, match=r"1cls\.csv: row pcb1,test,normal,.*0004\.JPG names .* does not exist"):
        VisaDataset(root).split("pcb1")


def test_folder_pair_dataset(tmp_path, load_test_set):
    root = tmp_path / "screws"
    for i in range(10):
        _save(_pattern(30, 30, i)[0], root / "normal" / f"n{i}.png")
    for i in range(3):
        img, mask = _pattern(30, 30, 40 + i, defect=True)
        _save(img, root / "abnormal" / f"a{i}.png")
        _save(mask, root / "masks" / f"a{i}.png")
    spec = {"normal_dir": "normal", "abnormal_dir": "abnormal", "mask_dir": "masks", "normal_split_ratio": 0.2}
    ds = open_data_root("mine", root, layout="folder", folder=spec)
    assert isinstance(ds, FolderPairDataset) and ds.categories == ["screws"]
    split = ds.split("screws")
    assert len(split.train) == 8 and sum(1 - s.label for s in split.test) == 2 and split.n_anomalous == 3
    assert not {s.path for s in split.test} & set(split.train)
    assert split.train == open_data_root("mine", root, layout="folder", folder=spec).split("screws").train
    test = load_test_set(split, 16)
    assert (test.masks[test.labels == 1].flatten(1).sum(1) > 0).all()
    with pytest.raises(FsadError, match="unknown key 'mask'"):
        open_data_root("mine", root, layout="folder", folder={"mask": "masks"})


def test_pooled_roots(tmp_path, synth_root):
    a = _mvtec(tmp_path / "a", "tile", ".jpg")
    ds = open_data_root("pair", [str(synth_root), str(a)])
    assert isinstance(ds, PooledDataset)
    assert ds.categories == ["grid", "stripes", "washer", "tile"] and ds.roots == [synth_root, a]
    split = ds.split("tile")
    assert split.dataset == "pair" and split.train[0].suffix == ".jpg"
    assert ds.split("grid").root == synth_root / "grid"
    only = open_data_root("pair", [synth_root, a], categories=["tile", "grid"])
    assert only.categories == ["tile", "grid"]
    dup = _mvtec(tmp_path / "b", "grid")
    with pytest.raises(FsadError, match=r"category 'grid' is in both .* and .*b: pooled roots need distinct"):
        open_data_root("pair", [synth_root, dup])


def test_cli_pools_data_roots_and_sets_arch(synth_root, tmp_path, capsys, demo_args):
    from fsad_bench.cli import main

    extra = _mvtec(tmp_path / "extra", "tile", ".jpg", sizes=[(70, 64), (64, 80)])
    out = tmp_path / "r"
    args = ["--categories", "grid,tile", "--arch", "mobilenet_v2", "--data-root", str(extra)]
    main(demo_args(synth_root, out, *args, methods="random,gaussian"))
    text = capsys.readouterr().out
    assert "4 cells (0 done)" in text and "gaussian [paper, mobilenet_v2, random-init]" in text
    assert {p.name.split("-k1")[0] for p in (out / "cells").glob("*.json")} == {
        "gaussian-tile",
        "gaussian-grid",
        "random-tile",
        "random-grid",
    }
