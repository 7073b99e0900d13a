"""Pretrained backbones: torchvision weights from the local cache, an explicit file, or none.

``weights`` is one of:

* ``"imagenet"`` — torchvision's ImageNet weights from its cache (``$TORCH_HOME/hub/checkpoints``),
  downloaded if possible; an FsadError names the file to put where when they cannot be had;
* ``"auto"`` — ImageNet weights when the cache holds them, otherwise random initialisation
  (labelled ``random-init`` in every table; warned once per process; never downloads);
* ``"none"`` — random initialisation (seeded), for tests;
* a path to a ``.pth`` state dict.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import FsadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _checkpoint_path(arch: str) -> tuple[Path, str]:
    w = torchvision.models.get_model_weights(arch).DEFAULT
    fname = w.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / fname, w.url


@functools.lru_cache(maxsize=None)
def _warn_random_init(arch: str, path: str) -> None:
    warnings.warn(f"ImageNet weights for {arch} not cached ({path}); using random init (labelled random-init)",
                  stacklevel=3)


def load_state_dict(arch: str, weights: str) -> tuple[dict | None, str]:
    """Resolve ``weights`` for torchvision model ``arch``.

    Returns ``(state_dict or None, tag)`` where tag is ``"imagenet"``, ``"random-init"``
    or ``"file:<name>"``; None means keep the (seeded) random initialisation.
    """
    if weights == "none":
        return None, "random-init"
    if weights in ("imagenet", "auto"):
        path, url = _checkpoint_path(arch)
        if not path.is_file() and weights == "auto":
            _warn_random_init(arch, str(path))
            return None, "random-init"
        if not path.is_file():
            try:
                torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)
            except Exception as err:  # offline, proxy, disk: all mean "not available"
                raise FsadError(
                    f"ImageNet weights for {arch} not found: put {path.name} (from {url}) into {path.parent} "
                    f"(or set TORCH_HOME, pass --weights PATH, or --weights none) [{err.__class__.__name__}]"
                ) from None
        return torch.load(path, map_location="cpu", weights_only=True), "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FsadError(f"weights file {path} does not exist (expected a torchvision {arch} state dict .pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FsadError(f"cannot read weights file {path}: {err.__class__.__name__}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state, f"file:{path.name}"


def build_torchvision(arch: str, weights: str) -> tuple[nn.Module, str]:
    """A torchvision model ``arch`` with ``weights`` loaded; returns (model in eval mode, tag)."""
    state, tag = load_state_dict(arch, weights)
    model = torchvision.models.get_model(arch, weights=None)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise FsadError(f"weights for {arch} do not match the architecture: {str(err).splitlines()[0]}") from None
    return model.eval(), tag


def state_hash(module: nn.Module) -> str:
    """Short content hash of a module's parameters (cache keys)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ResNetFeatures(nn.Module):
    """ResNet blocks layer1..layer3 of a torchvision ResNet (layer4 and pooling dropped).

    Input ``(B, 3, H, W)`` in [0, 1] (ImageNet normalisation applied inside when
    ``normalize``); output: list of 3 maps ``(B, 64, H/4, W/4)``, ``(B, 128, H/8, W/8)``,
    ``(B, 256, H/16, W/16)`` for ResNet-18, in channels-last memory format (faster
    convolutions on CPU, and per-position feature vectors are contiguous).
    """

    def __init__(self, arch: str = "resnet18", weights: str = "imagenet", normalize: bool = True):
        super().__init__()
        net, self.weights_tag = build_torchvision(arch, weights)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.channels = [self.layer1[-1].conv1.in_channels, self.layer2[-1].conv1.in_channels,
                         self.layer3[-1].conv1.in_channels]
        self.to(memory_format=torch.channels_last)
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.normalize:
            x = (x - self.mean) / self.std
        x = x.contiguous(memory_format=torch.channels_last)
        f1 = self.layer1(self.stem(x))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]
