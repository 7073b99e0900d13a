"""``paper`` presets against independent re-computations of the official pipelines (issue 12, items 1–5).

Every reference below is written from the official code's description (RegAD ``models/stn.py`` /
``test.py`` / ``utils/funcs.py``, anomalib's PaDiM, OpenCV's CLAHE), never from our own helpers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from fsad_bench.adapter import AdapterConfig
from fsad_bench.components.augment import augment_support
from fsad_bench.components.maps import concat_pyramid, gaussian_blur
from fsad_bench.errors import FsadError
from fsad_bench.methods.diffnet.adapter import DiffNet, DiffNetPlus
from fsad_bench.methods.gaussian import GaussianAdapter
from fsad_bench.methods.regad.adapter import RegAD
from fsad_bench.methods.tdg.adapter import TDG, TDGPlus
from fsad_bench.methods.tdg.torch_model import TDGHierarchy, clahe_rgb, clahe_uint8
from fsad_bench.methods.tdg.training import HierarchyTrainer
from fsad_bench.protocols import load_suite

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A seeded random-init torchvision ResNet-18 and the .pth file holding its weights."""
    torch.manual_seed(123)
    net = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("w") / "r18.pth"
    torch.save(net.state_dict(), path)
    return net, str(path)


def images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


# -- independent references ---------------------------------------------------------------
def repeat_up(f: torch.Tensor, size: int) -> torch.Tensor:
    """RegAD/PaDiM ``embedding_concat``: every coarse cell repeated over an s x s block."""
    s = size // f.shape[-1]
    return f.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)


@torch.no_grad()
def resnet_embedding(net, x: torch.Tensor, normalize: bool) -> torch.Tensor:
    if normalize:
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
    f1 = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))
    f2 = net.layer2(f1)
    f3 = net.layer3(f2)
    return torch.cat([f1, repeat_up(f2, f1.shape[-1]), repeat_up(f3, f1.shape[-1])], dim=1)


def gaussian_distances(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Loop over positions, float64: unbiased covariance + 0.01 I, explicit inverse, Mahalanobis."""
    n, c, h, w = train.shape
    out = np.zeros((test.shape[0], h, w))
    eye = np.eye(c)
    for i in range(h):
        for j in range(w):
            x = train[:, :, i, j]
            mu = x.mean(axis=0)
            inv = np.linalg.inv(np.cov(x, rowvar=False) + 0.01 * eye)
            for b in range(test.shape[0]):
                d = test[b, :, i, j] - mu
                out[b, i, j] = np.sqrt(d @ inv @ d)
    return out


def anomalib_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """anomalib ``GaussianBlur2d``: 2-D kernel of side 2·int(4σ + 0.5) + 1, reflect padding."""
    ks = 2 * int(4.0 * sigma + 0.5) + 1
    x = torch.arange(ks, dtype=torch.float64) - ks // 2
    k1 = torch.exp(-(x**2) / (2 * sigma**2))
    k2 = torch.outer(k1, k1)
    k2 = k2 / k2.sum()
    r = ks // 2
    return F.conv2d(F.pad(maps, (r, r, r, r), mode="reflect"), k2.view(1, 1, ks, ks))


# -- item 5: gaussian against anomalib's PaDiM and RegAD's Table 5 row A -------------------
@pytest.mark.parametrize("n_features", [None, 60])
def test_gaussian_padim_equals_reference(r18, n_features):
    net, path = r18
    support, test = images(5, 32, 0), images(3, 32, 1)
    opts = {} if n_features is None else {"n_features": n_features, "channel_seed": 7}
    a = GaussianAdapter(AdapterConfig(weights=path, preset="padim", image_size=32, seed=0, options=opts))
    a.adapt(support)
    scores, maps = a.predict(test)
    train_e, test_e = resnet_embedding(net, support, True), resnet_embedding(net, test, True)
    if n_features is not None:
        idx = torch.randperm(448, generator=torch.Generator().manual_seed(7))[:n_features]
        train_e, test_e = train_e[:, idx], test_e[:, idx]
    dist = torch.from_numpy(gaussian_distances(train_e.double().numpy(), test_e.double().numpy()))
    up = F.interpolate(dist[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    ref = anomalib_blur(up)[:, 0]
    assert maps.shape == (3, 32, 32)
    np.testing.assert_allclose(maps.double().numpy(), ref.numpy(), rtol=2e-4, atol=1e-6 * float(ref.max()))
    np.testing.assert_allclose(scores.double().numpy(), ref.flatten(1).max(1).values.numpy(), rtol=2e-4)
    # the channel subset and the seed that drew it (an overridden option) are both in the label
    assert a.label == "gaussian [padim, resnet18, file" + (f", d={n_features}, channel_seed=7]" if n_features else "]")


def test_gaussian_paper_is_regad_table5_row_a(r18):
    """Raw [0, 1] input, 22 views, nearest concat, scipy ``gaussian_filter(sigma=4)`` (mode reflect)."""
    from scipy.ndimage import gaussian_filter

    net, path = r18
    support, test = images(2, 32, 2), images(2, 32, 3)
    a = GaussianAdapter(AdapterConfig(weights=path, preset="paper", image_size=32, seed=4))
    a.adapt(support)
    scores, maps = a.predict(test)
    views = augment_support(support, generator=torch.Generator().manual_seed(4))
    assert views.shape[0] == 44
    train_e, test_e = resnet_embedding(net, views, False), resnet_embedding(net, test, False)
    dist = torch.from_numpy(gaussian_distances(train_e.double().numpy(), test_e.double().numpy()))
    up = F.interpolate(dist[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0].numpy()
    ref = np.stack([gaussian_filter(u, sigma=4) for u in up])
    np.testing.assert_allclose(maps.double().numpy(), ref, rtol=2e-4, atol=1e-6 * ref.max())
    np.testing.assert_allclose(scores.double().numpy(), ref.reshape(2, -1).max(1), rtol=2e-4)


def test_gaussian_options_change_the_pipeline_and_are_labelled():
    cfg = dict(weights="none", image_size=32, seed=0)
    paper = GaussianAdapter(AdapterConfig(preset="paper", **cfg))
    assert (
        paper.backbone.normalize is False
        and paper.hparams["augment"]
        and paper.label == "gaussian [paper, resnet18, random-init]"
    )
    padim = GaussianAdapter(AdapterConfig(preset="padim", **cfg))
    assert padim.backbone.normalize is True and not padim.hparams["augment"]
    other = GaussianAdapter(AdapterConfig(preset="paper", options={"upsample": "bilinear", "n_features": 10}, **cfg))
    assert other.label == "gaussian [paper, resnet18, random-init, upsample=bilinear, d=10]"
    assert paper.cached.tag != padim.cached.tag  # raw and normalised features never share cache entries
    feats = paper.backbone(images(2, 32, 0))
    assert torch.equal(concat_pyramid(feats, "nearest")[:, 64:192], repeat_up(feats[1], 8))
    s1 = GaussianAdapter(AdapterConfig(preset="paper", options={"n_features": 10}, **cfg)).channel_index
    s2 = GaussianAdapter(AdapterConfig(preset="paper", options={"n_features": 10}, **{**cfg, "seed": 1})).channel_index
    assert s1.shape == (10,) and not torch.equal(s1, s2)
    with pytest.raises(FsadError, match="n_features.*at most 448"):
        GaussianAdapter(AdapterConfig(preset="paper", options={"n_features": 449}, **cfg))


def test_symmetric_blur_is_scipy_reflect_and_reflect_is_mirror():
    from scipy.ndimage import gaussian_filter

    x = torch.rand(2, 1, 23, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for border, mode in (("symmetric", "reflect"), ("reflect", "mirror")):
        ours = gaussian_blur(x, 2.0, border)[:, 0].numpy()
        ref = np.stack([gaussian_filter(u, 2.0, mode=mode) for u in x[:, 0].numpy()])
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)  # float32 kernel taps
    small = torch.rand(1, 1, 9, 9, dtype=torch.float64)  # kernel radius 16 > side: periodic extension
    np.testing.assert_allclose(
        gaussian_blur(small, 4.0, "symmetric")[0, 0].numpy(),
        gaussian_filter(small[0, 0].numpy(), 4.0, mode="reflect"),
        rtol=1e-6,
    )


# -- item 1: RegAD's test frame ------------------------------------------------------------
def tilted_regad(**options) -> RegAD:
    torch.manual_seed(0)  # as the run layer, right before constructing: every call gets the same weights
    a = RegAD(AdapterConfig(weights="none", image_size=64, seed=0, options={"infer_batch": 8, **options}))
    with torch.no_grad():  # constant, clearly non-identity transforms (rotation, anisotropic scale)
        for stn, p in zip(a.model.stns, ((0.3, 0.9, 1.1), (-0.2, 1.05, 0.95), (0.25, 1.1, 0.9))):
            stn.regressor[2].bias.copy_(torch.tensor(p))
    return a


def official_inverse(theta: torch.Tensor) -> torch.Tensor:
    """``np.linalg.inv`` of the float32 3x3 homogeneous matrices, first two rows (models/stn.py)."""
    t = theta.detach().cpu().numpy()
    last = np.tile(np.array([0, 0, 1], dtype=np.float32), (t.shape[0], 1, 1))
    return torch.from_numpy(np.linalg.inv(np.concatenate([t, last], axis=1))[:, :-1, :])


def fixstn(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def test_regad_paper_features_are_the_official_image_frame():
    a = tilted_regad()
    assert a.hparams["feature_frame"] == "image" and RegAD.presets["cpu"]["feature_frame"] == "image"
    x = images(3, 64, 5)
    with torch.no_grad():
        maps, thetas = a.model(x)
    inv = [official_inverse(t) for t in thetas]
    out1 = fixstn(maps[0], inv[0])
    out2 = fixstn(fixstn(maps[1], inv[1]), inv[0])
    out3 = fixstn(fixstn(fixstn(maps[2], inv[2]), inv[1]), inv[0])
    ref = torch.cat([out1, repeat_up(out2, 16), repeat_up(out3, 16)], dim=1)
    feats, _ = a.features(x)
    assert feats.shape == ref.shape == (3, 448, 16, 16)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    assert a.label == "regad [cpu, resnet18, random-init]"


def test_regad_registered_frame_option_differs_and_is_labelled():
    x, support = images(2, 64, 6), images(2, 64, 7)
    official, registered = tilted_regad(), tilted_regad(feature_frame="registered")
    assert registered.label == "regad [cpu, resnet18, random-init, frame=registered]"
    fo, fr = official.features(x)[0], registered.features(x)[0]
    assert (fo - fr).abs().max() > 1e-2  # different feature frames
    official.adapt(support)
    registered.adapt(support)
    mo, mr = official.predict(x)[1], registered.predict(x)[1]
    assert mo.shape == mr.shape == (2, 64, 64) and not torch.allclose(mo, mr, rtol=1e-3)
    assert tilted_regad(concat_upsample="bilinear", blur_border="reflect").label.endswith(
        "upsample=bilinear, border=reflect]"
    )
    with pytest.raises(FsadError, match="concat_upsample"):  # declared: refused when a suite is planned
        RegAD.check_options({"concat_upsample": "bicubic"})


def test_regad_identity_stn_equals_gaussian_paper(r18):
    """Untrained RegAD (identity STNs) through the official test = Table 5 row A = ``gaussian`` paper."""
    _, path = r18
    support, test = images(2, 32, 8), images(2, 32, 9)
    r = RegAD(AdapterConfig(weights=path, preset="paper", image_size=32, seed=3))
    g = GaussianAdapter(AdapterConfig(weights=path, preset="paper", image_size=32, seed=3))
    r.adapt(support)
    g.adapt(support)
    (sr, mr), (sg, mg) = r.predict(test), g.predict(test)
    torch.testing.assert_close(mr, mg, rtol=1e-3, atol=1e-4 * float(mg.max()))
    torch.testing.assert_close(sr, sg, rtol=1e-3, atol=0.0)


# -- item 2: MPDD uses the affine STN -------------------------------------------------------
def test_paper_mpdd_runs_regad_with_the_affine_stn():
    suite = load_suite("paper_mpdd")
    assert suite.options["regad"]["stn_mode"] == "affine"
    assert "regad" not in load_suite("paper_mvtec").options
    a = RegAD(AdapterConfig(weights="none", image_size=64, preset="paper", options=suite.options["regad"]))
    assert all(stn.mode == "affine" for stn in a.model.stns)


# -- item 3: DiffNet's input resolution ------------------------------------------------------
def test_diffnet_declares_its_resolution_and_never_upsamples(monkeypatch):
    small = {"n_coupling_blocks": 1, "fc_internal": 8}  # the resolution comes from the preset
    cfg = dict(weights="none", image_size=224, seed=0, options=small)
    assert DiffNet(AdapterConfig(preset="paper", **cfg)).input_size == 448
    assert DiffNetPlus.presets["paper"]["img_size"] == 448 and DiffNetPlus.input_size is DiffNet.input_size
    assert DiffNet(AdapterConfig(preset="cpu", **cfg)).input_size == 128
    assert GaussianAdapter(AdapterConfig(weights="none", image_size=32)).input_size is None  # base default
    tiny = {"img_size": 64, "n_scales": 1, "n_coupling_blocks": 1, "fc_internal": 16, "n_transforms_test": 2}
    a = DiffNet(AdapterConfig(weights="none", image_size=32, seed=0, options=tiny))
    assert a.input_size == 64
    calls = []
    real = F.interpolate
    monkeypatch.setattr(torch.nn.functional, "interpolate", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    scores, maps = a.predict(images(2, 64, 0))  # images arrive at img_size: no resize at all
    assert not calls and scores.shape == (2,) and maps.shape == (2, 64, 64)
    scores, maps = a.predict(images(2, 96, 0))  # any other size: resized inside, maps at the given size
    assert calls and maps.shape == (2, 96, 96) and torch.isfinite(maps).all()


# -- item 4: TDG's CLAHE and the pre-training index channel -------------------------------------
def opencv_clahe_reference(img: np.ndarray, clip: float = 2.0, tiles: int = 8) -> np.ndarray:
    """OpenCV's 8-bit CLAHE, pixel by pixel, as written in modules/imgproc/src/clahe.cpp's description."""
    h, w = img.shape
    src = img
    if h % tiles or w % tiles:
        src = np.pad(img, ((0, (tiles - h % tiles) % tiles), (0, (tiles - w % tiles) % tiles)), mode="reflect")
    th, tw = src.shape[0] // tiles, src.shape[1] // tiles
    area = th * tw
    limit = max(int(clip * area / 256), 1)
    lut = np.zeros((tiles, tiles, 256))
    scale = np.float32(255) / np.float32(area)
    for ty in range(tiles):
        for tx in range(tiles):
            hist = np.bincount(src[ty * th : (ty + 1) * th, tx * tw : (tx + 1) * tw].ravel(), minlength=256)
            clipped = int(np.maximum(hist - limit, 0).sum())
            hist = np.minimum(hist, limit) + clipped // 256
            residual = clipped - (clipped // 256) * 256
            if residual:
                step = max(256 // residual, 1)
                i = 0
                while i < 256 and residual > 0:
                    hist[i] += 1
                    i += step
                    residual -= 1
            total = 0
            for v in range(256):
                total += int(hist[v])
                lut[ty, tx, v] = min(max(np.rint(np.float32(total) * scale), 0), 255)
    out = np.zeros_like(img)
    for y in range(h):
        fy = np.float32(y) * (np.float32(1.0) / np.float32(th)) - np.float32(0.5)
        y1 = int(np.floor(fy))
        ya = np.float32(fy - y1)
        y1c, y2c = max(y1, 0), min(y1 + 1, tiles - 1)
        for x in range(w):
            fx = np.float32(x) * (np.float32(1.0) / np.float32(tw)) - np.float32(0.5)
            x1 = int(np.floor(fx))
            xa = np.float32(fx - x1)
            x1c, x2c = max(x1, 0), min(x1 + 1, tiles - 1)
            v = img[y, x]
            l = [np.float32(lut[a, b, v]) for a, b in ((y1c, x1c), (y1c, x2c), (y2c, x1c), (y2c, x2c))]
            res = (l[0] * (np.float32(1) - xa) + l[1] * xa) * (np.float32(1) - ya) + (
                l[2] * (np.float32(1) - xa) + l[3] * xa
            ) * ya
            out[y, x] = min(max(int(np.rint(res)), 0), 255)
    return out


@pytest.mark.parametrize("shape", [(32, 32), (37, 45)])
def test_clahe_matches_opencv_algorithm(shape):
    rng = np.random.default_rng(0)
    img = (rng.normal(110, 25, shape).clip(0, 255)).astype(np.int64)
    img[: shape[0] // 2, : shape[1] // 3] = rng.integers(0, 40, (shape[0] // 2, shape[1] // 3))  # dark region
    ours = clahe_uint8(torch.from_numpy(img)).numpy()
    ref = opencv_clahe_reference(img)
    np.testing.assert_array_equal(ours, ref)
    assert ours.std() > img.std()  # contrast is stretched


def test_clahe_rgb_keeps_hue_and_saturation():
    x = images(1, 32, 3) * 0.6
    y = clahe_rgb(x)
    assert y.shape == x.shape and torch.all((y * 255 - (y * 255).round()).abs() < 1e-4)
    xq = (x * 255).round() / 255  # the official code equalises the 8-bit image
    v, v2 = xq.amax(1, keepdim=True), y.amax(1, keepdim=True)
    # hue and saturation kept: every channel scaled by V'/V (up to the final 8-bit rounding)
    assert ((y - xq * v2 / v).abs() <= 0.5 / 255 + 1e-6).all()
    assert (v2 - v).abs().max() > 0.05  # V itself was equalised


def test_tdg_trains_on_equalised_images_only(monkeypatch):
    seen = []
    monkeypatch.setattr(HierarchyTrainer, "train", lambda self, model, imgs, *a, **kw: seen.append((imgs, kw)))
    support, test = images(3, 32, 1), images(2, 32, 2)
    on = TDG(AdapterConfig(weights="none", image_size=32, seed=0))
    on.adapt(support)
    torch.testing.assert_close(seen[-1][0], clahe_rgb(support))
    off = TDG(AdapterConfig(weights="none", image_size=32, seed=0, options={"clahe": False}))
    off.adapt(support)
    assert torch.equal(seen[-1][0], support) and off.label == "tdg [cpu, clahe=off]" and on.label == "tdg [cpu]"
    monkeypatch.undo()
    scoring = []
    monkeypatch.setattr(
        TDGHierarchy, "score", lambda self, imgs, frac: scoring.append(imgs) or (imgs[:, 0, 0, 0], imgs[:, 0])
    )
    on.predict(test)
    assert torch.equal(scoring[-1], test)  # test images are scored as they are (official)


def test_tdg_plus_pretraining_index_is_scaled_to_the_official_range():
    opts = {"pretrain_niter": 1, "pretrain_batch": 3, "pretrain_images_per_category": None, "clahe": False}
    train = {"a": [t for t in images(5, 32, 0)], "b": [t for t in images(4, 32, 1)]}

    def ids_seen(adapter):
        seen = []
        hooks = [
            g.register_forward_pre_hook(lambda m, args: seen.append(args[2].detach().clone()))
            for g in adapter.model.generators
        ]
        adapter.fit(train)
        for h in hooks:
            h.remove()
        return torch.cat(seen)

    scaled = TDGPlus(AdapterConfig(weights="none", image_size=32, seed=0, options=opts))
    assert scaled.index_scale(9) == pytest.approx(2 / 8) and scaled.index_scale(3) == 1.0
    assert scaled.index_scale(3400) == pytest.approx(2 / 3399)
    ids = ids_seen(scaled)
    assert ids.max() <= 2 + 1e-6 and ids.min() >= 0
    raw = TDGPlus(AdapterConfig(weights="none", image_size=32, seed=0, options={**opts, "pretrain_index": "raw"}))
    assert (
        raw.label
        == ("tdg+ [cpu, clahe=off, index=raw, pretrain_niter=1, pretrain_batch=3, pretrain_images_per_category=None]")
        and ids_seen(raw).max() > 2
    )
    with pytest.raises(FsadError, match="pretrain_index.*'scaled', 'raw'"):
        TDGPlus.check_options({"pretrain_index": "minmax"})
