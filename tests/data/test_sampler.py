import json

import pytest

from fsad_bench.data.mvtec import MVTecDataset
from fsad_bench.data.sampler import SupportSampler, support_indices
from fsad_bench.errors import FsadError


def test_support_depends_only_on_dataset_category_k_run():
    a = support_indices("mvtec", "bottle", 4, 3, 209)
    assert a == support_indices("mvtec", "bottle", 4, 3, 209)
    assert len(set(a)) == 4 and all(0 <= i < 209 for i in a)
    others = {tuple(support_indices("mvtec", "bottle", 4, r, 209)) for r in range(10)}
    assert len(others) == 10  # runs differ
    assert a != support_indices("mvtec", "cable", 4, 3, 209)
    assert a != support_indices("mvtec", "bottle", 4, 3, 209, seed=1)


def test_sampler_same_for_every_caller(synth_root):
    split = MVTecDataset(synth_root, name="synthetic").split("grid")
    s1, s2 = SupportSampler(0), SupportSampler(0)
    assert s1.support(split, 2, 5) == s2.support(split, 2, 5)


def test_k_larger_than_train_set_is_an_error(synth_root):
    split = MVTecDataset(synth_root, name="synthetic").split("grid")
    with pytest.raises(FsadError, match="k=13 is larger than the 12 normal training images of synthetic/grid"):
        SupportSampler(0).support(split, 13, 0)


def test_explicit_support_lists(synth_root, tmp_path):
    split = MVTecDataset(synth_root, name="synthetic").split("grid")
    path = tmp_path / "supports.json"
    path.write_text(json.dumps({"grid": {"2": {"0": ["004.png", "007.png"]}}}))
    sampler = SupportSampler(lists=path)
    assert [p.name for p in sampler.support(split, 2, 0)] == ["004.png", "007.png"]
    with pytest.raises(FsadError, match=r"no entry \['grid'\]\['2'\]\['1'\]"):
        sampler.support(split, 2, 1)
    path.write_text(json.dumps({"grid": {"1": {"0": ["zzz.png"]}}}))
    with pytest.raises(FsadError, match="'zzz.png' is not in"):
        SupportSampler(lists=path).support(split, 1, 0)


def _split(n_good: int, defects: dict[str, int]):
    from pathlib import Path

    from fsad_bench.data.dataset import CategorySplit, TestSample

    test = [TestSample(Path(f"good/{i:03d}.png"), 0, "good", None) for i in range(n_good)]
    for d, n in defects.items():
        test += [TestSample(Path(f"{d}/{i:03d}.png"), 1, d, Path(f"gt/{d}/{i:03d}.png")) for i in range(n)]
    return CategorySplit("ds", "cat", Path("root"), [], test)


def test_subsample_test_is_stratified_seeded_and_ordered():
    from collections import Counter

    from fsad_bench.data.sampler import subsample_test

    split = _split(60, {"crack": 30, "hole": 9, "rare": 1})
    sub = subsample_test(split, 20, seed=0)
    assert len(sub.test) == 20 and split.test and len(split.test) == 100  # the split itself is unchanged
    counts = Counter(s.defect for s in sub.test)
    assert counts == {"good": 12, "crack": 6, "hole": 1, "rare": 1}  # shares 12 / 6 / 1.8 / 0.2, each kept
    assert [split.test.index(s) for s in sub.test] == sorted(split.test.index(s) for s in sub.test)
    assert subsample_test(split, 20, seed=0).test == sub.test  # same seed, same images
    assert subsample_test(split, 20, seed=1).test != sub.test
    assert subsample_test(split, None) is split and subsample_test(split, 100) is split
    assert len(subsample_test(split, 3).test) == 3  # fewer than strata: the smallest shares go first
    with pytest.raises(FsadError, match="test_subset must be at least 2"):
        subsample_test(split, 1)
