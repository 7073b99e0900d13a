"""Tests of the RegAD / RegAD-L adapters (tiny sizes, weights none, synthetic data)."""

from __future__ import annotations

import math

import pytest
import torch

from fsad_bench.adapter import AdapterConfig
from fsad_bench.components.affine import (
    IDENTITY_PARAMS,
    N_PARAMS,
    affine_from_params,
    affine_warp,
    compose_affine,
    invert_affine,
)
from fsad_bench.data.images import load_images
from fsad_bench.data.mvtec import MVTecDataset
from fsad_bench.data.torch_datasets import TensorImages
from fsad_bench.errors import FsadError
from fsad_bench.methods.regad.adapter import RegAD, RegADL
from fsad_bench.methods.regad.torch_model import SpatialTransformer, simsiam_loss
from fsad_bench.methods.regad.training import training_batches
from fsad_bench.protocols import training_data

SIZE = 64
TINY = {"epochs": 1, "batch_size": 4, "max_queries_per_category": 4, "infer_batch": 8}


def new(cls, cfg: AdapterConfig):
    """Construct as the run layer does: torch seeded with the adapter's seed right before (initial weights)."""
    torch.manual_seed(cfg.seed)
    return cls(cfg)


def smooth_map(n: int = 1, size: int = 48) -> torch.Tensor:
    """Low-frequency maps ``(n, 1, size, size)`` (interpolation-friendly, not symmetric)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    m = torch.sin(2.0 * x + 0.5) * torch.cos(1.5 * y) + 0.5 * x * y
    return m.expand(n, 1, size, size).clone()


def rotation_scale(angle: float, sx: float, sy: float) -> torch.Tensor:
    return affine_from_params(torch.tensor([[angle, sx, sy]]), "rotation_scale")


@pytest.mark.parametrize("mode", sorted(N_PARAMS))
def test_stn_identity_init_returns_input(mode):
    torch.manual_seed(0)
    stn = SpatialTransformer(8, (12, 12), mode).eval()
    x = torch.randn(3, 8, 12, 12)
    out, theta = stn(x)
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3), atol=1e-6)
    assert torch.allclose(out, x, atol=1e-5)


def test_affine_parameterisation_is_differentiable_and_official():
    params = torch.tensor([[0.3, 1.2, 0.8]], requires_grad=True)
    theta = affine_from_params(params, "rotation_scale")
    c, s = math.cos(0.3), math.sin(0.3)
    assert torch.allclose(theta, torch.tensor([[[1.2 * c, -s, 0.0], [s, 0.8 * c, 0.0]]]))
    theta.sum().backward()
    assert params.grad is not None and torch.all(params.grad != 0)
    for mode, ident in IDENTITY_PARAMS.items():
        assert torch.allclose(affine_from_params(torch.tensor([ident]), mode), torch.eye(3)[None, :2]), mode


def test_inverse_transform_undoes_forward_away_from_borders():
    m = smooth_map(2)
    theta = torch.cat([rotation_scale(0.25, 0.9, 1.1), rotation_scale(-0.15, 1.05, 0.95)])
    back = affine_warp(affine_warp(m, theta), invert_affine(theta))
    inner = (slice(None), slice(None), slice(12, 36), slice(12, 36))
    err = (back - m)[inner].abs().max()
    moved = (affine_warp(m, theta) - m)[inner].abs().max()
    assert err < 0.03 and moved > 0.2  # undone within interpolation error, and the warp did move it


def test_composition_order_matches_successive_warps():
    """Warping by θ1 then the result by θ2 samples the original at θ1 θ2 p (the STN chain's frame)."""
    m = smooth_map(1)
    t1 = rotation_scale(0.4, 1.0, 1.0)  # rotation, then an anisotropic scale and a shift: no commuting
    t2 = rotation_scale(0.0, 0.7, 1.0) + torch.tensor([[[0.0, 0.0, 0.2], [0.0, 0.0, -0.1]]])
    twice = affine_warp(affine_warp(m, t1), t2)
    once = affine_warp(m, compose_affine(t1, t2))
    wrong = affine_warp(m, compose_affine(t2, t1))
    inner = (slice(None), slice(None), slice(12, 36), slice(12, 36))
    assert (twice - once)[inner].abs().max() < 0.03
    assert (twice - wrong)[inner].abs().max() > 0.1


def test_simsiam_stop_gradient():
    g = torch.Generator().manual_seed(0)
    p1, z1, p2, z2 = (torch.randn(2, 16, 3, 3, generator=g).requires_grad_() for _ in range(4))
    loss = simsiam_loss(p1, z1, p2, z2)
    loss.backward()
    assert p1.grad is not None and p2.grad is not None and p1.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None  # targets are detached
    same = torch.randn(2, 16, 3, 3)
    assert simsiam_loss(same, same, same, same).item() == pytest.approx(-1.0, abs=1e-5)


def test_held_out_category_never_in_training_pairs(synth_root):
    ds = MVTecDataset(synth_root)
    target = ds.categories[1]
    train = training_data("aggregated", ds, target, torch.empty(0), SIZE)
    sizes = {c: len(d) for c, d in train.items()}
    g = torch.Generator().manual_seed(0)
    batches = training_batches(sizes, batch_size=5, shot=3, generator=g)
    assert target not in {b.category for b in batches}
    assert {b.category for b in batches} == set(ds.categories) - {target}
    for c in sizes:  # every image is a query exactly once per epoch
        queries = sorted(q for b in batches if b.category == c for q in b.queries)
        assert queries == list(range(sizes[c]))
    for b in batches:
        assert len(b.queries) <= 5 and len(b.supports) == len(b.queries)
        for q, sup in zip(b.queries, b.supports):
            assert len(sup) == 3 and q not in sup and all(0 <= i < sizes[b.category] for i in sup)


def test_fit_adapt_predict_end_to_end(synth_root):
    ds = MVTecDataset(synth_root)
    target = ds.categories[0]
    train = training_data("aggregated", ds, target, torch.empty(0), SIZE)
    a = new(RegAD, AdapterConfig(weights="none", image_size=SIZE, seed=0, options=TINY))
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    a.fit(train)
    assert any(not torch.equal(before[k], v) for k, v in a.model.state_dict().items())  # backbone+STNs trained
    split = ds.split(target)
    support = load_images(split.train[:2], SIZE)
    images = load_images([s.path for s in split.test[:3]], SIZE)
    a.adapt(support)
    scores, maps = a.predict(images)
    assert scores.shape == (3,) and maps.shape == (3, SIZE, SIZE)
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()
    assert torch.allclose(scores, maps.flatten(1).max(1).values)


@pytest.mark.parametrize("k", [1, 3])
def test_regad_l_trains_on_support_only(k):
    g = torch.Generator().manual_seed(0)
    support = torch.rand(k, 3, SIZE, SIZE, generator=g)
    a = new(RegADL, AdapterConfig(weights="none", image_size=SIZE, seed=1, options={**TINY, "epochs": 2}))
    assert a.protocol == "individual" and a.name == "regad-l"
    a.fit({"target": TensorImages(support)})
    assert len(a.loss_history) == 2 and all(math.isfinite(v) for v in a.loss_history)
    a.adapt(support)
    scores, maps = a.predict(torch.rand(2, 3, SIZE, SIZE, generator=g))
    assert scores.shape == (2,) and maps.shape == (2, SIZE, SIZE) and torch.isfinite(maps).all()


def test_state_dict_round_trip_gives_identical_predictions():
    g = torch.Generator().manual_seed(0)
    train = {c: TensorImages(torch.rand(4, 3, SIZE, SIZE, generator=g)) for c in ("a", "b")}
    support, images = torch.rand(2, 3, SIZE, SIZE, generator=g), torch.rand(2, 3, SIZE, SIZE, generator=g)
    a = new(RegAD, AdapterConfig(weights="none", image_size=SIZE, seed=0, options={**TINY, "lr": 0.05}))
    a.fit(train)
    b = new(RegAD, AdapterConfig(weights="none", image_size=SIZE, seed=7, options=TINY))
    b.load_state_dict(a.state_dict())
    a.adapt(support)
    b.adapt(support)
    sa, ma = a.predict(images)
    sb, mb = b.predict(images)
    # b's seed also shuffles its 22-view support differently: equal up to float32 summation order
    assert torch.allclose(sa, sb, rtol=1e-5, atol=0) and torch.allclose(ma, mb, rtol=1e-5, atol=1e-5)
    c = new(RegAD, AdapterConfig(weights="none", image_size=SIZE, seed=7, options=TINY))
    c.adapt(support)
    assert not torch.allclose(c.predict(images)[0], sa, rtol=1e-3)  # the loaded state is what made them equal


def tilt(a: RegAD) -> RegAD:
    """Give the three STNs constant, clearly non-identity transforms (rotation, anisotropic scale)."""
    with torch.no_grad():
        for stn, p in zip(a.model.stns, ((0.3, 0.9, 1.1), (-0.2, 1.05, 0.95), (0.25, 1.1, 0.9))):
            stn.regressor[2].bias.copy_(torch.tensor(p))
    return a


def frame_pair(tilted: bool) -> tuple[RegAD, RegAD]:
    """Two adapters with the same weights: ``feature_frame`` "image" and "registered"."""
    out = []
    for frame in ("image", "registered"):
        a = new(
            RegAD,
            AdapterConfig(weights="none", image_size=SIZE, seed=0, options={"feature_frame": frame, "infer_batch": 8}),
        )
        out.append(tilt(a) if tilted else a)
    return out[0], out[1]


def test_image_frame_variant_is_the_image_frame_and_differs_from_registered():
    g = torch.Generator().manual_seed(0)
    x, support = torch.rand(2, 3, SIZE, SIZE, generator=g), torch.rand(2, 3, SIZE, SIZE, generator=g)
    image, registered = frame_pair(tilted=True)
    assert image.hparams["feature_frame"] == "image" and registered.hparams["feature_frame"] == "registered"
    assert image.label == "regad [cpu, resnet18, random-init]"
    assert registered.label == "regad [cpu, resnet18, random-init, frame=registered]"
    with torch.no_grad():
        maps, thetas = image.model(x)
    assert (thetas[0] - torch.eye(3)[None, :2]).abs().max() > 0.05  # the STNs really move
    fi, ti = image.features(x)
    fr, tr = registered.features(x)
    torch.testing.assert_close(ti, tr)  # same network, same transforms: only the frame differs
    c1 = maps[0].shape[1]
    # registered frame: the STN outputs themselves; image frame: each warped back by the inverse STN transforms
    assert torch.equal(fr[:, :c1], maps[0])
    torch.testing.assert_close(fi[:, :c1], affine_warp(maps[0], invert_affine(thetas[0])))
    back3 = affine_warp(
        affine_warp(affine_warp(maps[2], invert_affine(thetas[2])), invert_affine(thetas[1])), invert_affine(thetas[0])
    )
    torch.testing.assert_close(fi[:, -maps[2].shape[1] :], back3.repeat_interleave(4, -1).repeat_interleave(4, -2))
    assert (fi - fr).abs().max() > 1e-2
    image.adapt(support)
    registered.adapt(support)
    (si, mi), (sr, mr) = image.predict(x), registered.predict(x)
    assert mi.shape == mr.shape == (2, SIZE, SIZE) and torch.isfinite(mi).all() and torch.isfinite(mr).all()
    assert not torch.allclose(mi, mr, rtol=1e-3)
    assert torch.equal(si, mi.flatten(1).max(1).values) and torch.equal(sr, mr.flatten(1).max(1).values)


def test_frames_agree_when_the_stns_are_the_identity():
    """Untrained STNs are the identity: the two frames differ only through the transforms."""
    g = torch.Generator().manual_seed(1)
    x, support = torch.rand(2, 3, SIZE, SIZE, generator=g), torch.rand(2, 3, SIZE, SIZE, generator=g)
    image, registered = frame_pair(tilted=False)
    torch.testing.assert_close(image.features(x)[0], registered.features(x)[0], rtol=1e-5, atol=1e-5)
    image.adapt(support)
    registered.adapt(support)
    torch.testing.assert_close(image.predict(x)[1], registered.predict(x)[1], rtol=1e-3, atol=1e-4)


def test_declared_options(presets_declared):
    for cls in (RegAD, RegADL):
        presets_declared(cls)
    RegAD.check_options({"feature_frame": "registered", "max_queries_per_category": None, "lr": 1, "eps": 0.1})
    for bad in (
        {"stn_mode": "projective"},
        {"feature_frame": "canonical"},
        {"concat_upsample": "bicubic"},
        {"blur_border": "wrap"},
        {"lr_schedule": "linear"},
        {"epochs": 0},
        {"batch_size": 2.0},
        {"lr": 0.0},
        {"eps": -1.0},
        {"max_queries_per_category": 0},
        {"imagenet_norm": 1},
    ):
        with pytest.raises(FsadError, match=next(iter(bad))):
            RegADL.check_options(bad)
    with pytest.raises(ValueError):  # direct use of the torch module: its own argument check
        SpatialTransformer(8, (12, 12), "projective")
