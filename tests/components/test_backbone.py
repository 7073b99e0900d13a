import urllib.error

import pytest
import torch
import torchvision

from fsad_bench.components.backbone import ResNetFeatures, load_state_dict
from fsad_bench.errors import FsadError


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    return tmp_path / "hub" / "checkpoints"


def test_missing_imagenet_weights_name_the_file(empty_hub):
    with pytest.raises(FsadError, match=r"put resnet18-f37072fd\.pth .* into .*hub/checkpoints"):
        load_state_dict("resnet18", "imagenet")


def test_auto_falls_back_to_labelled_random_init(empty_hub):
    assert load_state_dict("alexnet", "auto") == (None, "random-init")
    assert ResNetFeatures("resnet18", "auto").weights_tag == "random-init"


def test_cached_and_explicit_weights(empty_hub, tmp_path):
    net = torchvision.models.resnet18()
    empty_hub.mkdir(parents=True)
    torch.save(net.state_dict(), empty_hub / "resnet18-f37072fd.pth")
    state, tag = load_state_dict("resnet18", "auto")
    assert tag == "imagenet" and torch.equal(state["fc.weight"], net.state_dict()["fc.weight"])
    torch.save(net.state_dict(), tmp_path / "mine.pth")
    feats = ResNetFeatures("resnet18", str(tmp_path / "mine.pth"))
    assert feats.weights_tag == "file:mine.pth"
    assert torch.equal(feats.stages[0][-1][0].conv1.weight, net.layer1[0].conv1.weight)  # stage 0 = stem + layer1
    with pytest.raises(FsadError, match="weights file .*nope.pth does not exist"):
        load_state_dict("resnet18", str(tmp_path / "nope.pth"))
    torch.save({"wrong": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(
        FsadError, match=r"weights file .*bad\.pth do not fit the architecture resnet18: .*missing keys"
    ):
        ResNetFeatures("resnet18", str(tmp_path / "bad.pth"))


def test_feature_shapes_channels_last():
    f = ResNetFeatures("resnet18", "none")(torch.rand(2, 3, 64, 64))
    assert [tuple(x.shape) for x in f] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert f[0].is_contiguous(memory_format=torch.channels_last)


# -- FeatureExtractor: any torchvision CNN, named taps, weights (issue 11) ----------------
import os  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from fsad_bench.adapter import AdapterConfig  # noqa: E402
from fsad_bench.components.backbone import TAPS, FeatureExtractor, build_torchvision  # noqa: E402


@pytest.mark.parametrize(
    "arch,shapes",
    [
        ("resnet18", [(64, 16), (128, 8), (256, 4)]),
        ("wide_resnet50_2", [(256, 16), (512, 8), (1024, 4)]),
        ("mobilenet_v2", [(24, 16), (32, 8), (96, 4)]),
        ("alexnet", [(256, 1)]),
    ],
)
def test_taps_shapes_channels_last_and_stages(arch, shapes):
    torch.manual_seed(0)
    fe = FeatureExtractor(arch, "none")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps = fe(x)
    assert [(m.shape[1], m.shape[-1]) for m in maps] == shapes and fe.channels == [c for c, _ in shapes]
    assert all(m.shape[0] == 2 and m.is_contiguous(memory_format=torch.channels_last) for m in maps)
    assert fe.taps == TAPS[arch] and len(fe.stages) == len(shapes) and fe.weights_tag == "random-init"
    with torch.no_grad():  # the stages chained reproduce the taps (RegAD puts an STN between them)
        y = fe.prepare(x)
        for stage, m in zip(fe.stages, maps):
            y = stage(y)
            assert torch.equal(y, m)


def test_default_layout_equals_torchvision_feature_extractor():
    """channels_last=False: torch's default layout, bit-identical to torchvision's create_feature_extractor
    on the same weights (PatchCore's numbers before it moved to FeatureExtractor)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    fe = FeatureExtractor("resnet18", "none", taps=["layer2", "layer3"], channels_last=False)
    torch.manual_seed(0)
    ref = create_feature_extractor(build_torchvision("resnet18", "none")[0], {"layer2": "a", "layer3": "b"})
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps, want = fe(x), ref((x - fe.mean) / fe.std)
    assert all(m.is_contiguous() for m in maps)
    assert torch.equal(maps[0], want["a"]) and torch.equal(maps[1], want["b"])


def test_custom_taps_frozen_and_trainable():
    fe = FeatureExtractor("resnet18", "none", taps=["layer1.0", "layer2"])
    assert fe.channels == [64, 128] and not any(p.requires_grad for p in fe.parameters())
    assert not fe.train().training  # frozen: BatchNorm stays in eval mode
    tr = FeatureExtractor("mobilenet_v2", "none", trainable=True)
    assert all(p.requires_grad for p in tr.parameters()) and tr.train().training
    with pytest.raises(FsadError, match="taps .*layer9.* not found in resnet18"):
        FeatureExtractor("resnet18", "none", taps=["layer9"])
    with pytest.raises(FsadError, match="unknown torchvision architecture 'resnet19'"):
        build_torchvision("resnet19", "none")


def test_imagenet_download_is_used_and_offline_names_file(tmp_path, monkeypatch):
    from fsad_bench.components import backbone

    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    backbone._download.cache_clear()
    net = torchvision.models.mobilenet_v2()
    calls = []

    def fake_download(url, model_dir, **kwargs):  # what torch.hub does: file into model_dir
        calls.append(url)
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), Path(model_dir) / url.rsplit("/", 1)[-1])
        return net.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    fe = FeatureExtractor("mobilenet_v2", "imagenet")
    assert fe.weights_tag == "imagenet" and len(calls) == 1
    assert torch.equal(fe.stages[0][0][0].weight, net.features[0][0].weight)
    assert FeatureExtractor("mobilenet_v2", "auto").weights_tag == "imagenet" and len(calls) == 1  # cached now

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    backbone._download.cache_clear()
    with pytest.raises(
        FsadError,
        match=r"^ImageNet weights for alexnet not found: put alexnet-[\w-]+\.pth .* into "
        r".*hub/checkpoints .*\[URLError\]$",
    ):
        load_state_dict("alexnet", "imagenet")
    backbone._warn_random_init.cache_clear()
    with pytest.warns(UserWarning, match="alexnet .* random init"):
        assert load_state_dict("alexnet", "auto") == (None, "random-init")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per architecture and process
        assert load_state_dict("alexnet", "auto") == (None, "random-init")


def test_state_dict_file_strict_and_mismatch_names_file_and_arch(tmp_path):
    net = torchvision.models.mobilenet_v2()
    path = tmp_path / "mnv2.pth"
    torch.save(net.state_dict(), path)
    fe = FeatureExtractor("mobilenet_v2", str(path))
    assert fe.weights_tag == "file:mnv2.pth" and torch.equal(fe.stages[0][0][0].weight, net.features[0][0].weight)
    with pytest.raises(
        FsadError,
        match=r"^weights file .*mnv2\.pth do not fit the architecture resnet18: "
        r"\d+ missing keys \(e\.g\. conv1\.weight\), \d+ unexpected keys",
    ):
        FeatureExtractor("resnet18", str(path))
    state = net.state_dict()
    state.pop("classifier.1.bias")  # strict: one missing key is enough
    torch.save(state, path)
    with pytest.raises(FsadError, match=r"1 missing keys \(e\.g\. classifier\.1\.bias\)"):
        FeatureExtractor("mobilenet_v2", str(path))


def test_labels_show_arch_and_weights_kind(tmp_path):
    from fsad_bench.methods.gaussian import GaussianAdapter
    from fsad_bench.protocols import Suite, apply_arch

    net = torchvision.models.mobilenet_v2()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    a = GaussianAdapter(AdapterConfig(weights=str(tmp_path / "w.pth"), options={"arch": "mobilenet_v2"}))
    assert a.label == "gaussian [paper, mobilenet_v2, file]"
    assert GaussianAdapter(AdapterConfig(weights="none")).label == "gaussian [paper, resnet18, random-init]"
    suite = Suite(
        name="s",
        dataset="d",
        methods=["random", "gaussian", "diffnet", "tdg"],
        k=[1],
        arch="mobilenet_v2",
        options={"diffnet": {"arch": "alexnet"}},
    )
    apply_arch(suite)
    assert suite.options == {"gaussian": {"arch": "mobilenet_v2"}, "diffnet": {"arch": "alexnet"}}
    apply_arch(suite, override=True)  # --arch on the command line
    assert suite.options["diffnet"] == {"arch": "mobilenet_v2"}


SHARED = Path(os.environ.get("FSAD_BENCH_SHARED", Path(__file__).resolve().parents[3] / "shared"))
MNV2 = SHARED / "weights" / "mobilenet_v2_imagenet1k_dequantized_float_statedict.pth"
BOTTLE = SHARED / "data" / "mvtec_ad" / "bottle"


@pytest.mark.skipif(not (MNV2.is_file() and BOTTLE.is_dir()), reason="../shared (real weights and data) not here")
def test_shared_mobilenet_v2_separates_real_bottle_images():
    """The real ImageNet MobileNetV2 loads strictly; gaussian at k = 2 ranks 4 defective bottles above 4 good ones."""
    from fsad_bench.data.images import load_images
    from fsad_bench.data.mvtec import MVTecDataset
    from fsad_bench.methods.gaussian import GaussianAdapter

    split = MVTecDataset(BOTTLE.parent, categories=["bottle"]).split("bottle")
    good = [s.path for s in split.test if s.label == 0][:4]
    bad = [s.path for s in split.test if s.label == 1][::16][:4]
    a = GaussianAdapter(
        AdapterConfig(weights=str(MNV2), image_size=96, seed=0, options={"arch": "mobilenet_v2", "augment": False})
    )
    assert a.label == "gaussian [paper, mobilenet_v2, file, augment=False]"
    a.adapt(load_images(split.train[:2], 96))
    scores, maps = a.predict(load_images(good + bad, 96))
    assert maps.shape == (8, 96, 96)
    assert roc_auc_score([0] * 4 + [1] * 4, scores.numpy()) >= 0.9
    assert float(np.mean(scores.numpy()[4:])) > float(np.mean(scores.numpy()[:4]))
