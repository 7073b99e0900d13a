import urllib.error

import pytest
import torch
import torchvision

from fsad_bench.backbone import ResNetFeatures, load_state_dict
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
    assert torch.equal(feats.layer1[0].conv1.weight, net.layer1[0].conv1.weight)
    with pytest.raises(FsadError, match="weights file .*nope.pth does not exist"):
        load_state_dict("resnet18", str(tmp_path / "nope.pth"))
    torch.save({"wrong": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(FsadError, match="do not match the architecture"):
        ResNetFeatures("resnet18", str(tmp_path / "bad.pth"))


def test_feature_shapes_channels_last():
    f = ResNetFeatures("resnet18", "none")(torch.rand(2, 3, 64, 64))
    assert [tuple(x.shape) for x in f] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert f[0].is_contiguous(memory_format=torch.channels_last)
