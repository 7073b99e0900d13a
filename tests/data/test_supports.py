"""`fsad-bench supports import / export`: the papers' support files matched back to image files, SHA-256 checked lists.

The official files are rebuilt here from small generated images with torchvision, as the official code
makes them (RegAD ``datasets/mvtec.py`` ``transform_x``; InCTRL ``engine_test.py`` ``transform``), never
with the project's own preprocessing, so that the matcher is checked against the official pipelines.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from fsad_bench.cli import main
from fsad_bench.data.mvtec import MVTecDataset
from fsad_bench.data.official_supports import CLIP_MEAN, CLIP_STD, read_stored
from fsad_bench.data.sampler import SupportSampler
from fsad_bench.data.support_lists import lists_from_records
from fsad_bench.errors import FsadError
from fsad_bench.identity import content_sha256

SIZE = 24  # --size of the tests (the official 224 / 240 work the same, slower)


def regad_tensor(path, size=SIZE):
    """RegAD's transform_x: RGB, Resize(size, ANTIALIAS = Lanczos), ToTensor."""
    return T.Compose([T.Resize(size, T.InterpolationMode.LANCZOS), T.ToTensor()])(Image.open(path).convert("RGB"))


def inctrl_tensor(path, size=SIZE):
    """InCTRL's test transform: Resize(size, BICUBIC), CenterCrop, RGB, ToTensor, Normalize(CLIP)."""
    return T.Compose(
        [
            T.Resize(size, T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )(Image.open(path))


@pytest.fixture
def data(tmp_path):
    """Two categories of 8 noise images (40 x 32, one greyscale) in the MVTec layout."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for cat in ("cat_a", "cat_b"):
        for sub in ("train/good", "test/good", "test/bad", "ground_truth/bad"):
            (root / cat / sub).mkdir(parents=True)
        for i in range(8):
            arr = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
            im = Image.fromarray(arr[..., 0]) if i == 3 else Image.fromarray(arr)
            im.save(root / cat / "train" / "good" / f"{i:03d}.png")
        for sub in ("good", "bad"):
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
                root / cat / "test" / sub / "000.png"
            )
        mask = np.zeros((32, 40), np.uint8)
        mask[8:16, 8:16] = 255
        Image.fromarray(mask).save(root / cat / "ground_truth" / "bad" / "000_mask.png")
    return root


CHOSEN = {
    "cat_a": [["001.png", "005.png"], ["003.png", "000.png"], ["007.png", "002.png"]],
    "cat_b": [["004.png", "006.png"], ["002.png", "003.png"], ["000.png", "001.png"]],
}


def write_regad(data, out, stacked=False):
    """support_set/<category>/2_3.pt: 3 draws of (2, 3, S, S') tensors (a list, or one 5-d tensor)."""
    for cat, draws in CHOSEN.items():
        t = [torch.stack([regad_tensor(data / cat / "train" / "good" / n) for n in names]) for names in draws]
        (out / cat).mkdir(parents=True, exist_ok=True)
        torch.save(torch.stack(t) if stacked else t, out / cat / f"2_{len(t)}.pt")
    return out


def _ok(args, capsys):
    main(args)
    return capsys.readouterr().out


def _import(source, data, fmt, out):
    return [
        "supports",
        "import",
        str(source),
        "--data-root",
        str(data),
        "--format",
        fmt,
        "--size",
        str(SIZE),
        "--out",
        str(out),
    ]


@pytest.mark.parametrize("stacked", [False, True])
def test_regad_files_round_trip(data, tmp_path, capsys, stacked):
    src = write_regad(data, tmp_path / "support_set", stacked)
    text = _ok(_import(src, data, "regad", tmp_path / "s.json"), capsys)
    assert "6 support sets matched" in text and "written" in text
    lists = json.loads((tmp_path / "s.json").read_text())
    for cat, draws in CHOSEN.items():
        assert lists[cat]["2"] == {str(r): names for r, names in enumerate(draws)}
        assert lists["_sha256"][cat] == {
            n: content_sha256(data / cat / "train" / "good" / n) for names in draws for n in names
        }
    assert set(lists["_source"]["distances"]["cat_a/k=2/run=1"]) == {0.0}
    sampler = SupportSampler(lists=tmp_path / "s.json")  # the sampler reads (and checks) what import wrote
    split = MVTecDataset(data, name="tiny").split("cat_b")
    assert [p.name for p in sampler.support(split, 2, 2)] == CHOSEN["cat_b"][2]


def test_inctrl_files_round_trip(data, tmp_path, capsys):
    for cat, draws in CHOSEN.items():  # fs_samples/<dataset>/<k>/<category>.pt: k normalised (3, S, S) tensors
        (tmp_path / "fs" / "2").mkdir(parents=True, exist_ok=True)
        torch.save(
            [inctrl_tensor(data / cat / "train" / "good" / n) for n in draws[1]], tmp_path / "fs" / "2" / f"{cat}.pt"
        )
    _ok(_import(tmp_path / "fs", data, "inctrl", tmp_path / "s.json"), capsys)
    lists = json.loads((tmp_path / "s.json").read_text())
    assert lists["cat_a"] == {"2": {"0": ["003.png", "000.png"]}}  # 003.png is greyscale: resized before RGB
    assert lists["cat_b"] == {"2": {"0": CHOSEN["cat_b"][1]}}
    one = read_stored(tmp_path / "fs" / "2" / "cat_a.pt", "inctrl", SIZE)  # a single file too
    assert [(s.category, s.k, s.run) for s in one] == [("cat_a", 2, 0)]


def test_bad_support_files_are_one_line_exit_2(data, tmp_path, capsys, cli):
    bad = tmp_path / "bad" / "cat_a"
    bad.mkdir(parents=True)
    torch.save([torch.rand(2, 1, SIZE, SIZE)], bad / "2_1.pt")  # one channel
    code, _, err = cli(_import(bad / "2_1.pt", data, "regad", tmp_path / "s.json"))
    assert code == 2 and "2_1.pt: expected 1 draws of (k=2, 3, 24, 24) images" in err and len(err.splitlines()) == 1
    torch.save([torch.rand(3, 3, SIZE, SIZE)], bad / "2_1.pt")  # k = 3 in a file named k = 2
    assert cli(_import(bad, data, "regad", tmp_path / "s.json"))[0] == 2
    (bad / "2_1.pt").write_text("not a torch file")
    code, _, err = cli(_import(bad, data, "regad", tmp_path / "s.json"))
    assert code == 2 and "cannot read" in err and "2_1.pt" in err
    torch.save([torch.rand(3, SIZE, SIZE)], bad / "cat_a.pt")  # InCTRL: a (3, S, S) image of nothing in the data
    code, _, err = cli(_import(bad / "cat_a.pt", data, "inctrl", tmp_path / "s.json"))
    assert code == 2 and "cat_a.pt image 0: no normal training image of cat_a within 1.0 grey levels" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "s.json").exists()
    torch.save([torch.zeros(3, SIZE, SIZE)], bad / "nosuch.pt")
    code, _, err = cli(_import(bad / "nosuch.pt", data, "inctrl", tmp_path / "s.json"))
    assert code == 2 and "category 'nosuch' is not in" in err


def test_ambiguous_match_is_refused(data, tmp_path, capsys, cli):
    good = data / "cat_a" / "train" / "good"
    shutil.copy(good / "005.png", good / "008.png")  # the same image twice in the data
    src = write_regad(data, tmp_path / "support_set")
    code, _, err = cli(_import(src, data, "regad", tmp_path / "s.json"))
    assert code == 2 and "cat_a/2_3.pt draw 0 image 1: ambiguous, 005.png (0.00) and 008.png (0.00)" in err


def test_hashes_are_checked_when_present(data, tmp_path, capsys):
    src = write_regad(data, tmp_path / "support_set")
    _ok(_import(src, data, "regad", tmp_path / "s.json"), capsys)
    split = MVTecDataset(data, name="tiny").split("cat_a")
    lists = json.loads((tmp_path / "s.json").read_text())
    lists["_sha256"]["cat_a"]["005.png"] = "0" * 64
    (tmp_path / "t.json").write_text(json.dumps(lists))
    with pytest.raises(FsadError, match=r"cat_a/005.png has sha256 [0-9a-f]{12}… but the list says 000000000000…"):
        SupportSampler(lists=tmp_path / "t.json").support(split, 2, 0)
    assert [p.name for p in SupportSampler(lists=tmp_path / "t.json").support(split, 2, 1)] == ["003.png", "000.png"]
    del lists["_sha256"]  # a list without hashes is read unchecked, as before
    (tmp_path / "t.json").write_text(json.dumps(lists))
    assert len(SupportSampler(lists=tmp_path / "t.json").support(split, 2, 0)) == 2
    shutil.copy(data / "cat_a" / "train" / "good" / "006.png", data / "cat_a" / "train" / "good" / "001.png")
    with pytest.raises(FsadError, match="cat_a/001.png has sha256"):  # another copy of the data
        SupportSampler(lists=tmp_path / "s.json").support(split, 2, 0)


RUN = [
    "run",
    "--suite",
    "demo",
    "--methods",
    "random",
    "--categories",
    "cat_a,cat_b",
    "--k",
    "2",
    "--runs",
    "3",
    "--weights",
    "none",
    "--image-size",
    "32",
]


def test_run_refuses_bad_lists_before_the_first_cell(data, tmp_path, capsys, cli):
    src = write_regad(data, tmp_path / "support_set")
    _ok(_import(src, data, "regad", tmp_path / "s.json"), capsys)
    lists = json.loads((tmp_path / "s.json").read_text())
    lists["_sha256"]["cat_b"]["000.png"] = "f" * 64  # run 2 of cat_b: checked in the plan, not after 5 cells
    (tmp_path / "t.json").write_text(json.dumps(lists))
    args = RUN + ["--data-root", str(data), "--out", str(tmp_path / "r"), "--dry-run", "--support-lists"]
    code, _, err = cli(args + [str(tmp_path / "t.json")])
    assert code == 2 and "cat_b/000.png has sha256" in err and len(err.splitlines()) == 1
    lists["cat_b"]["2"]["2"] = ["000.png", "missing.png"]  # a list naming a file not in the data
    (tmp_path / "t.json").write_text(json.dumps(lists))
    code, _, err = cli(args + [str(tmp_path / "t.json")])
    assert code == 2 and "'missing.png' is not in" in err and len(err.splitlines()) == 1
    (tmp_path / "t.json").write_text("[]")
    code, _, err = cli(args + [str(tmp_path / "t.json")])
    assert code == 2 and "must be a JSON object" in err


@pytest.mark.slow
def test_export_then_run_with_the_list_draws_the_same_images(data, tmp_path, capsys):
    out = tmp_path / "r"
    _ok(RUN + ["--data-root", str(data), "--out", str(out)], capsys)
    assert "6 support sets of 2 categories" in _ok(["supports", "export", str(out)], capsys)
    lists = json.loads((out / "supports.json").read_text())
    assert lists["_sha256"]["cat_a"] and lists["_source"]["command"] == "supports export"
    out2 = tmp_path / "r2"
    _ok(RUN + ["--data-root", str(data), "--out", str(out2), "--support-lists", str(out / "supports.json")], capsys)
    _ok(["supports", "export", str(out2), "--out", str(tmp_path / "again.json")], capsys)
    again = json.loads((tmp_path / "again.json").read_text())
    assert {c: lists[c] for c in CHOSEN} == {c: again[c] for c in CHOSEN} and again["_sha256"] == lists["_sha256"]


def test_lists_from_records_refuses_disagreeing_records():
    recs = [
        {"method": "a", "category": "c", "k": 2, "run": 0, "support": ["1.png", "2.png"]},
        {"method": "b", "category": "c", "k": 2, "run": 0, "support": ["1.png", "2.png"]},
        {"method": "a", "category": "c", "k": 2, "run": 1, "support": ["3.png", "2.png"]},
    ]
    assert lists_from_records(recs) == {"c": {2: {0: ["1.png", "2.png"], 1: ["3.png", "2.png"]}}}
    recs.append({"method": "b", "category": "c", "k": 2, "run": 1, "support": ["3.png", "4.png"]})
    with pytest.raises(FsadError, match="records disagree on the support set of c k=2 run 1: a used"):
        lists_from_records(recs)
    with pytest.raises(FsadError, match="has no 'support' file names"):
        lists_from_records([{"method": "a", "category": "c", "k": 2, "run": 0}])


def test_export_refuses_what_is_not_a_results_folder(tmp_path, capsys, cli):
    code, _, err = cli(["supports", "export", str(tmp_path)])
    assert code == 2 and "is not a results folder" in err
