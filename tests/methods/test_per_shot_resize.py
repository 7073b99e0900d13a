"""Per-shot shared fits (RegAD ``paper``: one model per k, as the official ``train.py --shot k``), the
per-method resize filter (RegAD ``paper``: PIL's LANCZOS, the official ``Image.ANTIALIAS``) and
DiffNet's official test views (PIL nearest rotation of the 8-bit image, per-image random angles)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from fsad_bench import registry
from fsad_bench.adapter import Adapter, AdapterConfig
from fsad_bench.data.image_cache import load_cached_image
from fsad_bench.data.images import crop_box, load_image, load_images
from fsad_bench.errors import FsadError
from fsad_bench.methods.diffnet.adapter import DiffNet
from fsad_bench.methods.diffnet.torch_model import rotate_nearest_uint8
from fsad_bench.methods.regad import adapter as regad_adapter
from fsad_bench.methods.regad.adapter import RegAD, RegADL
from fsad_bench.methods.tdg.adapter import TDG
from fsad_bench.run import model_cache
from fsad_bench.run.paths import cache_dir
from fsad_bench.run.plan import open_dataset
from fsad_bench.run.schedule import run_suite

TINY = {"epochs": 2, "batch_size": 4, "max_queries_per_category": 4, "infer_batch": 8}  # epoch 1 of 1 has lr 0


class MeanDiff(Adapter):
    """|image − mean support image|, channel-averaged (training-free)."""

    name = "spy-meandiff"

    def adapt(self, support):
        self.mean = support.mean(0)

    def predict(self, images):
        maps = (images - self.mean).abs().mean(1)
        return maps.flatten(1).max(1).values, maps


class PerShotSpy(MeanDiff):
    """Aggregated spy whose fit depends on k; records the k it was fitted for."""

    name = "spy-pershot"
    protocol = "aggregated"
    fit_calls: list = []

    @classmethod
    def per_shot_fit(cls, hparams) -> bool:
        return True

    def fit(self, train):
        type(self).fit_calls.append(self.fit_shot)

    def state_dict(self):
        return {"k": torch.tensor(self.fit_shot)}

    def load_state_dict(self, state):
        self.loaded = int(state["k"])


class LanczosSpy(MeanDiff):
    """Training-free spy that wants its images at 48 px resized with LANCZOS; records what it is given."""

    name = "spy-lanczos"
    seen: list = []

    @property
    def input_size(self) -> int:
        return 48

    @property
    def resize_filter(self) -> str:
        return "lanczos"

    def adapt(self, support):
        type(self).seen.append(("support", support.clone()))
        super().adapt(support)

    def predict(self, images):
        type(self).seen.append(("test", images.clone()))
        return super().predict(images)


@pytest.fixture
def spy(request):
    cls = request.param
    cls.fit_calls, cls.seen = [], []
    registry.register(cls)
    yield cls
    registry.unregister(cls.name)


@pytest.mark.parametrize("spy", [PerShotSpy], indirect=True)
def test_run_layer_fits_once_per_k_when_the_adapter_asks(spy, make_suite, tmp_path):
    suite = make_suite(methods=["spy-pershot"], k=[1, 2], runs=2, categories=["grid"])
    run_suite(suite, tmp_path / "a")
    assert spy.fit_calls == [1, 2]  # one fit per k, shared by the runs of that k
    files = sorted(p.name for p in (cache_dir() / "models" / "spy-pershot").rglob("*.pt"))
    assert len(files) == 2 and "-k1-" in files[0] and "-k2-" in files[1]
    run_suite(suite, tmp_path / "b")  # a second run loads both fits from the model cache
    assert spy.fit_calls == [1, 2]


@pytest.fixture
def shots(monkeypatch) -> list[int]:
    """The ``shot`` of every RegAD training run (``train_registration`` spied on)."""
    seen: list[int] = []
    original = regad_adapter.train_registration

    def spy(*args, **kw):
        seen.append(kw["shot"])
        return original(*args, **kw)

    monkeypatch.setattr(regad_adapter, "train_registration", spy)
    return seen


def _fit(cls, suite, dataset, k, options):
    torch.manual_seed(0)
    a = cls(AdapterConfig(weights="none", preset="paper", image_size=64, seed=0, options=options))
    model_cache.fit_cached(a, suite, dataset, "grid", "hash", 0, shot=k)
    return a


def test_regad_paper_trains_one_model_per_shot(make_suite, shots):
    suite = make_suite(methods=["regad"], preset="paper", k=[2, 4], categories=["grid"])
    dataset = open_dataset(suite)
    a2 = _fit(RegAD, suite, dataset, 2, TINY)
    a4 = _fit(RegAD, suite, dataset, 4, TINY)
    assert shots == [2, 4] and (a2.fit_shot, a4.fit_shot) == (2, 4)  # k supports per training query
    files = sorted((cache_dir() / "models" / "regad").rglob("*.pt"))
    assert [("-k2-" in f.name, "-k4-" in f.name) for f in files] == [(True, False), (False, True)]
    w2, w4 = a2.model.stns[0].regressor[0].weight, a4.model.stns[0].regressor[0].weight
    assert not torch.equal(w2, w4)  # two different fits
    again = _fit(RegAD, suite, dataset, 4, TINY)  # loaded from the cache
    assert shots == [2, 4] and torch.equal(again.model.stns[0].regressor[0].weight, w4)


def test_regad_shared_fit_option_keeps_one_model_for_every_k(make_suite, shots):
    suite = make_suite(methods=["regad"], preset="paper", k=[2, 4], categories=["grid"])
    dataset = open_dataset(suite)
    a = _fit(RegAD, suite, dataset, 2, {**TINY, "train_shot": 2})
    _fit(RegAD, suite, dataset, 4, {**TINY, "train_shot": 2})
    assert shots == [2] and a.fit_shot is None  # trained once, k = 4 loads it
    files = list((cache_dir() / "models" / "regad").rglob("*.pt"))
    assert len(files) == 1 and "-k" not in files[0].name.split("-t0")[1][:3]


def test_regad_per_shot_needs_k():
    a = RegAD(AdapterConfig(weights="none", preset="paper", image_size=64, options=TINY))
    with pytest.raises(FsadError, match="train_shot"):
        a.fit({"x": torch.utils.data.TensorDataset(torch.rand(2, 3, 64, 64))})
    # RegAD-L (individual): k is the number of support images
    assert (
        RegADL(AdapterConfig(weights="none", preset="paper", image_size=64)).train_shot(
            {"grid": [torch.zeros(3, 64, 64)] * 4}
        )
        == 4
    )
    assert RegAD.per_shot_fit(RegAD.presets["paper"]) and not RegAD.per_shot_fit(RegAD.presets["cpu"])


def test_labels_name_the_non_official_choices():
    cfg = dict(weights="none", image_size=64)
    assert RegAD(AdapterConfig(preset="paper", **cfg)).label == "regad [paper, resnet18, random-init]"
    shared = RegAD(AdapterConfig(preset="paper", options={"train_shot": 2, "resize": "bilinear"}, **cfg))
    assert shared.label == "regad [paper, resnet18, random-init, train_shot=2, resize=bilinear]"
    assert RegAD(AdapterConfig(preset="cpu", **cfg)).label == "regad [cpu, resnet18, random-init]"
    for bad in ({"train_shot": "K"}, {"train_shot": 0}, {"resize": "bicubic"}):
        with pytest.raises(FsadError):
            RegAD.check_options(bad)
    d = dict(img_size=64, n_scales=1, n_coupling_blocks=1, fc_internal=8)
    assert (
        DiffNet(AdapterConfig(preset="paper", options=d, **cfg)).label
        == "diffnet [paper, alexnet, random-init, img_size=64, n_scales=1, n_coupling_blocks=1, fc_internal=8]"
    )
    cheap = DiffNet(
        AdapterConfig(
            preset="paper",
            options={**d, "rotate_filter": "bilinear", "test_views": "shared", "grad_map": "summed"},
            **cfg,
        )
    )
    assert cheap.label.endswith("rotate_filter=bilinear, test_views=shared, grad_map=summed]")
    assert DiffNet.presets["cpu"]["grad_map"] == "summed" and DiffNet.presets["paper"]["grad_map"] == "official"


def test_resize_filter_is_pils(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(path)
    pil = Image.open(path).convert("RGB")
    lanczos, bilinear = load_image(path, 17, "lanczos"), load_image(path, 17)
    assert torch.equal(lanczos, TF.to_tensor(pil.resize((17, 17), Image.LANCZOS)))
    assert torch.equal(bilinear, TF.to_tensor(pil.resize((17, 17), Image.BILINEAR)))
    assert not torch.equal(lanczos, bilinear)
    assert torch.equal(load_image(path, 17, "bilinear"), bilinear)  # the default is bilinear
    assert torch.equal(load_image(path, 17, "bicubic"), TF.to_tensor(pil.resize((17, 17), Image.BICUBIC)))
    with pytest.raises(FsadError, match="resize filter"):
        load_image(path, 17, "nearest")
    cache = tmp_path / "cache"
    for _ in range(2):  # decoded, then read back: each filter its own cache entry
        assert torch.equal(load_cached_image(path, 17, cache, "lanczos"), lanczos)
        assert torch.equal(load_cached_image(path, 17, cache), bilinear)
    assert len(list(cache.rglob("*.npy"))) == 2
    assert RegAD(AdapterConfig(weights="none", preset="paper", image_size=64)).resize_filter == "lanczos"
    assert RegAD(AdapterConfig(weights="none", preset="cpu", image_size=64)).resize_filter == "bilinear"
    assert MeanDiff().resize_filter == "bilinear"
    for preset in ("paper", "cpu"):  # the official loaders' filters: TDG Lanczos (ANTIALIAS)
        assert TDG(AdapterConfig(weights="none", preset=preset, image_size=64)).resize_filter == "lanczos-crop"
    bil = TDG(AdapterConfig(weights="none", preset="cpu", image_size=64, options={"resize": "bilinear"}))
    assert bil.resize_filter == "bilinear" and "resize=bilinear" in bil.label


def test_inctrl_loads_bicubic_at_the_clips_side():
    pytest.importorskip("open_clip")
    from fsad_bench.methods.inctrl.adapter import InCTRL

    a = InCTRL(AdapterConfig(weights="none", image_size=64, options={"clip_model": "tiny"}))
    assert a.resize_filter == "bicubic-crop" and a.input_size == a.clip.image_size == 64
    assert InCTRL.presets["paper"]["resize"] == "bicubic-crop" and InCTRL.presets["paper"]["clip_model"].endswith(
        "-240"
    )
    squashed = InCTRL(AdapterConfig(weights="none", image_size=64, options={"clip_model": "tiny", "resize": "bicubic"}))
    assert squashed.resize_filter == "bicubic" and "resize=bicubic" in squashed.label


@pytest.mark.parametrize("shape", [(40, 52), (52, 40), (33, 33)])
def test_crop_resize_is_torchvisions_resize_then_center_crop(tmp_path, shape):
    """``"<filter>-crop"``: the official InCTRL / TDG loaders' ``Resize(size)`` + ``CenterCrop(size)``."""
    h, w = shape
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    pil = Image.open(path).convert("RGB")
    official = TF.center_crop(TF.resize(pil, 17, interpolation=TF.InterpolationMode.BICUBIC), [17, 17])
    assert torch.equal(load_image(path, 17, "bicubic-crop"), TF.to_tensor(official))
    if h == w:  # a square image: the crop is the whole frame, the same pixels as the squashing resize
        assert torch.equal(load_image(path, 17, "bicubic-crop"), load_image(path, 17, "bicubic"))
        assert crop_box(w, h, 17) == (0.0, 0.0, 1.0, 1.0)
    else:
        assert not torch.equal(load_image(path, 17, "bicubic-crop"), load_image(path, 17, "bicubic"))
        left, top, right, bottom = crop_box(w, h, 17)
        assert (left > 0) == (w > h) and (top > 0) == (h > w) and 0 < right <= 1 and 0 < bottom <= 1
    cache = tmp_path / "cache"
    for _ in range(2):  # its own cache entry, read back bit for bit
        assert torch.equal(load_cached_image(path, 17, cache, "bicubic-crop"), load_image(path, 17, "bicubic-crop"))
    with pytest.raises(FsadError, match="bicubic-crop"):
        load_image(path, 17, "nearest-crop")


def test_uncrop_puts_the_map_on_its_crop_and_the_minimum_around_it(tmp_path):
    from fsad_bench.run.predict import _to_size, _uncrop

    paths = []
    for name, (h, w) in {"wide": (20, 40), "square": (30, 30)}.items():
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(paths[-1])
    maps = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) + 1
    full = _uncrop(maps, paths, 16)
    assert full.shape == (2, 16, 16)
    assert torch.equal(full[1], _to_size(maps[1:], 16)[0])  # square: the plain resize
    assert torch.all(full[0][:, :4] == maps[0].min()) and torch.all(full[0][:, 12:] == maps[0].min())
    inner = torch.nn.functional.interpolate(maps[:1, None], size=(16, 8), mode="bilinear", align_corners=False)
    assert torch.equal(full[0][:, 4:12], inner[0, 0])


@pytest.mark.parametrize("spy", [LanczosSpy], indirect=True)
def test_run_layer_loads_with_the_adapters_filter(spy, make_suite, tmp_path):
    run_suite(
        make_suite(methods=["spy-lanczos"], k=[2], runs=1, categories=["grid"], operating_point=False), tmp_path / "r"
    )  # no leave-one-out support scoring: the spy sees the test images only
    dataset = open_dataset(make_suite(categories=["grid"]))
    test_paths = [s.path for s in dataset.split("grid").test]
    seen = torch.cat([x for kind, x in spy.seen if kind == "test"])
    assert torch.equal(seen, load_images(test_paths, 48, "lanczos"))
    assert not torch.equal(seen, load_images(test_paths, 48))


def test_diffnet_nearest_rotation_is_pils_on_the_8bit_image():
    arr = np.random.default_rng(1).integers(0, 256, (29, 29, 3), dtype=np.uint8)
    x = TF.to_tensor(Image.fromarray(arr))[None]
    for deg in (0.0, 17.3, 90.0, -135.5, 180.0):
        ref = TF.to_tensor(TF.rotate(Image.fromarray(arr), deg, TF.InterpolationMode.NEAREST))[None]
        assert torch.equal(rotate_nearest_uint8(x, [deg]), ref)


def test_diffnet_paper_views_are_per_image_and_batch_independent():
    opts = {
        "img_size": 64,
        "n_scales": 1,
        "n_coupling_blocks": 2,
        "fc_internal": 16,
        "n_transforms_test": 3,
        "view_chunk": 3,
    }
    torch.manual_seed(0)
    a = DiffNet(AdapterConfig(weights="none", preset="paper", image_size=64, seed=1, options=opts))
    a._trained = True
    images = torch.round(torch.rand(3, 3, 64, 64) * 255) / 255
    angles, _ = a.test_views(images)
    assert angles.shape == (3, 3) and not torch.equal(angles[0], angles[1])  # each image its own angles
    s, m = a.predict(images)
    s2, m2 = a.predict(images[[2, 0]])
    assert torch.equal(s2, s[[2, 0]]) and torch.equal(m2, m[[2, 0]]) and m.shape == (3, 64, 64)
