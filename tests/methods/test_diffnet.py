"""DifferNet / DiffNet+ adapters: FrEIA flow maths, training, scoring, adaptation reset, shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsad_bench import registry
from fsad_bench.adapter import AdapterConfig
from fsad_bench.components.affine import rotate
from fsad_bench.data.images import load_images
from fsad_bench.data.mvtec import MVTecDataset
from fsad_bench.data.synthetic import generate
from fsad_bench.data.torch_datasets import TensorImages
from fsad_bench.errors import FsadError
from fsad_bench.methods.diffnet.adapter import DiffNet, DiffNetPlus
from fsad_bench.methods.diffnet.torch_model import DifferNetViews, build_flow
from fsad_bench.metrics import pixel_auroc

SIZE = 128  # suite image size of the test images
# tiny but real: images resized to one 64 px scale (AlexNet's minimum is 63 px), small flow
TINY = {
    "img_size": 64,
    "n_scales": 1,
    "n_coupling_blocks": 2,
    "fc_internal": 32,
    "n_transforms_test": 2,
    "feature_pool": 4,
    "meta_epochs": 2,
    "sub_epochs": 4,
}


def config(seed=0, **options):
    return AdapterConfig(weights="none", image_size=SIZE, seed=seed, options={**TINY, **options})


def new(cls, cfg: AdapterConfig):
    """Construct as the run layer does: torch seeded with the adapter's seed right before (initial
    flow and, with ``weights = "none"``, the frozen random AlexNet come from torch's global RNG)."""
    torch.manual_seed(cfg.seed)
    return cls(cfg)


@pytest.fixture(scope="module")
def category(tmp_path_factory, load_test_set):
    root = generate(
        tmp_path_factory.mktemp("syn"), categories=1, seed=0, n_train=6, n_test_good=8, n_test_per_defect=3, size=SIZE
    )
    ds = MVTecDataset(root, name="synthetic")
    split = ds.split(ds.categories[0])
    return load_images(split.train, SIZE), load_test_set(split, SIZE)


def test_registered():
    assert registry.get("diffnet") is DiffNet and DiffNet.protocol == "individual"
    assert registry.get("diffnet+") is DiffNetPlus and DiffNetPlus.protocol == "aggregated"
    assert {"cpu", "paper"} <= set(DiffNet.presets) and {"cpu", "paper"} <= set(DiffNetPlus.presets)
    paper = DiffNet.presets["paper"]
    assert (paper["img_size"], paper["n_scales"], paper["n_coupling_blocks"], paper["fc_internal"]) == (448, 3, 8, 2048)
    assert (paper["lr"], paper["n_transforms"], paper["n_transforms_test"]) == (2e-4, 4, 64)


def test_flow_inverts_and_logdet_matches_autograd_jacobian():
    torch.manual_seed(0)
    flow = build_flow(6, n_blocks=3, hidden=16, clamp=3.0).double().eval()
    with torch.no_grad():  # make the scales non-trivial (default init gives |s| ≪ 1 already, but not 0)
        for p in flow.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    x = torch.randn(5, 6, dtype=torch.float64)
    z, log_det = flow(x)
    x_back, log_det_rev = flow(z, rev=True)
    assert torch.allclose(x_back, x, atol=1e-4)
    assert torch.allclose(log_det_rev, -log_det, atol=1e-6)
    assert log_det.abs().max() > 0.1  # not a volume-preserving special case
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])
        assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, log_det[i], atol=1e-6)


def test_rotation_is_differentiable_and_zero_filled():
    x = torch.ones(1, 3, 16, 16, requires_grad=True)
    y = rotate(x, torch.tensor([np.pi / 4]))
    assert y[0, :, 0, 0].abs().max() == 0  # corner comes from outside: black
    assert torch.allclose(rotate(x, torch.zeros(1)), x, atol=1e-6)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    views = DifferNetViews(32)(torch.rand(2, 3, 64, 64), torch.Generator().manual_seed(0))
    assert views.shape == (2, 3, 32, 32)


def test_nll_of_training_features_drops(category):
    train, _ = category
    a = new(DiffNet, config(lr=2e-3, meta_epochs=6))
    a.fit({"c": TensorImages(train)})
    assert a.loss_history[-1] < a.loss_history[0] - 0.15, a.loss_history
    assert a.loss_history[-1] < min(a.loss_history[:3])


def test_anomalies_found_and_shapes(category):
    """The cpu preset (128 px, 2 scales) with random AlexNet weights. The robust signal is the
    gradient map (pixel AUROC 0.61-0.71 over seeds and data versions); the image AUROC of these
    small defects is near chance with random weights (0.46-0.59), and images of another
    synthetic category even get a *lower* mean z² — so no image-level AUROC is asserted."""
    train, test = category
    a = new(DiffNet, AdapterConfig(weights="none", image_size=SIZE, seed=0, options={"n_transforms_test": 4}))
    a.fit({"c": TensorImages(train)})
    a.adapt(train)
    scores, maps = a.predict(test.images)
    n = len(test.labels)
    assert scores.shape == (n,) and maps.shape == (n, SIZE, SIZE)
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all() and (maps >= 0).all()
    assert pixel_auroc(test.masks.numpy(), maps.numpy()) > 0.58
    # the anomaly map concentrates on the defect: mean map inside masks > outside
    masks = test.masks > 0.5
    assert maps[masks].mean() > maps[~masks & (torch.as_tensor(test.labels) == 1)[:, None, None]].mean()
    # the same images give the same scores whatever batch they are in
    s2, _ = a.predict(test.images[:3])
    assert torch.allclose(s2, scores[:3], rtol=1e-4, atol=1e-6)


def test_diffnet_plus_adapts_from_pretrained_state_each_time(category):
    train, test = category
    a = new(DiffNetPlus, config(finetune_epochs=3))
    a.fit({"other": TensorImages(train[3:])})
    pretrained = {k: v.clone() for k, v in a.flow.state_dict().items()}
    support = train[:2]
    a.adapt(support)
    s1, m1 = a.predict(test.images[:4])
    a.adapt(train[2:4])  # a different cell in between must not leak into the next one
    a.adapt(support)
    s2, m2 = a.predict(test.images[:4])
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    assert all(torch.equal(v, pretrained[k]) for k, v in a.flow.state_dict().items())
    assert any(not torch.equal(v, pretrained[k]) for k, v in a.adapted.state_dict().items())
    # the cached state (engine) is the pre-trained flow only, and it round-trips
    # a fresh adapter constructed as the run layer does (same torch seed: same frozen random AlexNet,
    # which the state does not hold), with an untrained flow, then the cached state
    b = new(DiffNetPlus, AdapterConfig(weights="none", image_size=SIZE, seed=0, options={**TINY, "finetune_epochs": 3}))
    assert set(a.state_dict()) == {"flow"}
    assert any(not torch.equal(v, pretrained[k]) for k, v in b.flow.state_dict().items())
    b_first = b.predict(test.images[:4])[0]
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(v, pretrained[k]) for k, v in b.flow.state_dict().items())
    assert not torch.allclose(b_first, s1, rtol=1e-3)  # before loading, b scored differently
    b.adapt(support)
    assert torch.allclose(b.predict(test.images[:4])[0], s1, rtol=1e-5)


def test_weights_tag_and_labels():
    a = DiffNet(config())
    assert a.weights_tag == "random-init"
    assert a.extractor.n_feat == 256 and DiffNet(AdapterConfig(weights="none")).extractor.n_feat == 512
    with pytest.raises(FsadError, match="n_scales"):  # a cross-option check: in the constructor
        DiffNet(AdapterConfig(weights="none", options={"img_size": 128, "n_scales": 3}))


def flow_params(a: DiffNet) -> list[torch.Tensor]:
    return [p.detach().clone() for p in a.flow.parameters()]


def test_initial_weights_come_from_the_callers_seed():
    """Constructors never reseed torch: the run layer seeds right before constructing an adapter,
    so the same torch seed gives the same initial flow, another seed another one, whatever ``config.seed``."""

    def build(torch_seed: int, seed: int = 0) -> DiffNet:
        torch.manual_seed(torch_seed)
        return DiffNet(config(seed=seed))

    first, again, other_config_seed, other = build(5), build(5), build(5, seed=9), build(6)
    assert all(torch.equal(p, q) for p, q in zip(flow_params(first), flow_params(again)))
    assert all(torch.equal(p, q) for p, q in zip(flow_params(first), flow_params(other_config_seed)))
    assert any(not torch.equal(p, q) for p, q in zip(flow_params(first), flow_params(other)))
    # with weights = "none" the frozen AlexNet is random too: it follows the same seed
    ext = [dict(a.extractor.state_dict()) for a in (first, again, other)]
    assert all(torch.equal(v, ext[1][k]) for k, v in ext[0].items())
    assert any(not torch.equal(v, ext[2][k]) for k, v in ext[0].items())


def test_declared_options(presets_declared):
    for cls in (DiffNet, DiffNetPlus):
        presets_declared(cls)
    DiffNetPlus.check_options({"finetune_epochs": 0, "feature_pool": 0, "betas": [0.9, 0.99], "lr": 1})
    for bad in (
        {"img_size": 0},
        {"n_scales": 1.5},
        {"lr": 0.0},
        {"dropout": 1.0},
        {"betas": [0.9, 1.2]},
        {"meta_epochs": 0},
        {"feature_pool": -1},
        {"rotation": 270.0},
        {"brightness": 2.0},
        {"view_chunk": 0},
        {"grad_sigma": -1.0},
    ):
        with pytest.raises(FsadError, match=next(iter(bad))):
            DiffNet.check_options(bad)
    with pytest.raises(FsadError, match="finetune_epochs"):
        DiffNetPlus.check_options({"finetune_epochs": -1})
    with pytest.raises(FsadError, match="finetune_epochs"):  # not an option of diffnet
        DiffNet.check_options({"finetune_epochs": 3})
    with pytest.raises(FsadError, match=r"betas.*\(exactly 2\)"):
        DiffNet.check_options({"betas": [0.8, 0.8, 0.8]})
    with pytest.raises(FsadError, match="smallest scale below AlexNet"):  # checked on construction too
        DiffNet(AdapterConfig(weights="none", options={"arch": "alexnet", "img_size": 128, "n_scales": 3}))


def test_foreach_adam_is_bit_identical(category, monkeypatch):
    """``training.ADAM_FOREACH`` (a speed-up, not an option): the same flow as the per-tensor Adam loop."""
    from fsad_bench.methods.diffnet import training

    train, _ = category
    states = []
    for foreach in (False, True):
        monkeypatch.setattr(training, "ADAM_FOREACH", foreach)
        a = new(DiffNet, config(weight_decay=1e-5))
        a.fit({"c": TensorImages(train)})
        states.append({k: v.clone() for k, v in a.flow.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
