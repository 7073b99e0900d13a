import shutil

import numpy as np
import pytest
import torch

from fsad_bench.data import FolderDataset, load_image, load_test_set
from fsad_bench.errors import FsadError


def test_reader_lists_mvtec_layout(synth_root):
    ds = FolderDataset(synth_root, name="synthetic")
    assert ds.categories == ["grid", "stripes", "washer"]
    split = ds.split("washer")
    assert len(split.train) == 12 and all(p.parent.name == "good" for p in split.train)
    assert sum(1 for s in split.test if s.label == 0) == 6 and split.n_anomalous == 8
    assert all((s.mask_path is None) == (s.label == 0) for s in split.test)


def test_test_set_images_and_binary_masks(synth_root):
    split = FolderDataset(synth_root).split("stripes")
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
        FolderDataset(root).split("grid")


def test_corrupt_image_names_the_file(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path / "d")
    bad = root / "grid" / "train" / "good" / "003.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(FsadError, match=r"cannot read image .*003\.png"):
        load_image(bad, 32)


def test_missing_root_and_unknown_category(tmp_path, synth_root):
    with pytest.raises(FsadError, match="does not exist"):
        FolderDataset(tmp_path / "nope")
    with pytest.raises(FsadError, match="category 'bottle' not found"):
        FolderDataset(synth_root, categories=["bottle"])


def test_btad_style_layout(tmp_path, synth_root):
    """BTAD names normal folders ``ok`` and masks ``<stem>.png``."""
    root = tmp_path / "btad" / "01"
    shutil.copytree(synth_root / "grid" / "train" / "good", root / "train" / "ok")
    shutil.copytree(synth_root / "grid" / "test" / "good", root / "test" / "ok")
    shutil.copytree(synth_root / "grid" / "test" / "hole", root / "test" / "ko")
    (root / "ground_truth" / "ko").mkdir(parents=True)
    for m in (synth_root / "grid" / "ground_truth" / "hole").iterdir():
        shutil.copy(m, root / "ground_truth" / "ko" / m.name.replace("_mask", ""))
    split = FolderDataset(tmp_path / "btad").split("01")
    assert split.n_anomalous == 2 and len(split.train) == 12
