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
