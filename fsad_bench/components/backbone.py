"""Pretrained backbones: any torchvision classifier as a feature extractor with named taps.

``weights`` is one of:

* ``"imagenet"`` — torchvision's ImageNet weights (``get_model_weights(arch).DEFAULT``) from its
  cache (``$TORCH_HOME/hub/checkpoints``), downloaded there when the network allows; offline, an
  FsadError names the file and the folder to put it in;
* ``"auto"`` — the same, but when neither the cache nor a download gives the weights, random
  initialisation (labelled ``random-init`` in every table; warned once per architecture and
  process);
* ``"none"`` — random initialisation (seeded by the caller);
* a path to a ``.pth`` state dict of the torchvision architecture, loaded strictly (a mismatch
  is an FsadError naming the file and the architecture).

Weights kinds for labels (:func:`weights_kind`): ``imagenet``, ``random-init``, ``file``.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from fsad_bench.errors import FsadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Default taps (module names in ``model.named_modules()``) per architecture. ResNets: the
#: PaDiM/RegAD blocks layer1..3; MobileNetV2: the last block at strides 4, 8, 16 (24 + 32 + 96
#: channels); AlexNet: DifferNet's ``features`` output (256 channels, stride 32).
TAPS: dict[str, list[str]] = {
    **{
        a: ["layer1", "layer2", "layer3"]
        for a in (
            "resnet18",
            "resnet34",
            "resnet50",
            "resnet101",
            "resnet152",
            "wide_resnet50_2",
            "wide_resnet101_2",
            "resnext50_32x4d",
            "resnext101_32x8d",
            "resnext101_64x4d",
        )
    },
    "mobilenet_v2": ["features.3", "features.6", "features.13"],
    "mobilenet_v3_large": ["features.3", "features.6", "features.12"],
    "mobilenet_v3_small": ["features.1", "features.3", "features.8"],
    "alexnet": ["features"],
    "efficientnet_b0": ["features.2", "features.3", "features.5"],
    "convnext_tiny": ["features.1", "features.3", "features.5"],
    "densenet121": ["features.denseblock1", "features.denseblock2", "features.denseblock3"],
}

#: Children of a classifier that are never on the path from the input to a feature tap.
_HEADS = {"fc", "classifier", "avgpool", "aux1", "aux2", "AuxLogits", "heads", "head", "dropout"}


def _checkpoint_path(arch: str) -> tuple[Path, str]:
    try:
        w = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError) as err:
        raise FsadError(f"torchvision has no pretrained weights for {arch!r}: {err}") from None
    fname = w.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / fname, w.url


@functools.cache
def _warn_random_init(arch: str, path: str) -> None:
    warnings.warn(
        f"ImageNet weights for {arch} neither cached ({path}) nor downloadable; "
        f"using random init (labelled random-init)",
        stacklevel=3,
    )


@functools.cache
def _download(url: str, folder: str) -> str | None:
    """Download ``url`` into ``folder`` (torch hub, hash-checked); the error's class name when
    that fails. Tried once per process and URL."""
    try:
        torch.hub.load_state_dict_from_url(
            url, model_dir=folder, progress=False, check_hash=True, map_location="cpu", weights_only=True
        )
    except Exception as err:  # offline, proxy, disk, hash: all mean "not available"
        return err.__class__.__name__
    return None


def check_weights_argument(weights: str, arch: str | None = None) -> Path | None:
    """``--weights`` is ``imagenet``, ``auto``, ``none`` or an existing file (returned as a Path);
    FsadError in one line otherwise (checked once at planning, and again when loaded)."""
    if weights in ("imagenet", "auto", "none"):
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FsadError(
            f"weights file {path} does not exist (expected imagenet, auto, none or a torchvision "
            f"{arch + ' ' if arch else ''}state dict .pth)"
        )
    return path


def load_state_dict(arch: str, weights: str) -> tuple[dict | None, str]:
    """Resolve ``weights`` for torchvision model ``arch``.

    Returns ``(state_dict or None, tag)`` where tag is ``"imagenet"``, ``"random-init"``
    or ``"file:<name>"``; None means keep the (seeded) random initialisation.
    """
    if weights == "none":
        return None, "random-init"
    if weights in ("imagenet", "auto"):
        path, url = _checkpoint_path(arch)
        if not path.is_file():
            failure = _download(url, str(path.parent))
            if failure is not None or not path.is_file():
                if weights == "auto":
                    _warn_random_init(arch, str(path))
                    return None, "random-init"
                raise FsadError(
                    f"ImageNet weights for {arch} not found: put {path.name} (from {url}) into {path.parent} "
                    f"(or set TORCH_HOME, pass --weights PATH, or --weights none) [{failure or 'not downloaded'}]"
                )
        try:
            return torch.load(path, map_location="cpu", weights_only=True), "imagenet"
        except Exception as err:
            raise FsadError(
                f"cannot read cached weights {path}: {err.__class__.__name__}: {err} "
                f"(delete the file to download it again)"
            ) from None
    path = check_weights_argument(weights, arch)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FsadError(f"cannot read weights file {path}: {err.__class__.__name__}: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FsadError(f"weights file {path} holds a {type(state).__name__}, expected a {arch} state dict")
    return state, f"file:{path.name}"


def weights_kind(tag: str) -> str:
    """Short kind of a weights tag for labels: ``file:x.pth`` -> ``file``; others unchanged."""
    return tag.split(":", 1)[0]


def build_torchvision(arch: str, weights: str) -> tuple[nn.Module, str]:
    """A torchvision model ``arch`` with ``weights`` loaded strictly; returns (model in eval mode, tag)."""
    state, tag = load_state_dict(arch, weights)
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError:
        raise FsadError(f"unknown torchvision architecture {arch!r} (e.g. {', '.join(sorted(TAPS))})") from None
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError:
            source = f"file {weights}" if tag.startswith("file:") else f"ImageNet weights ({tag})"
            raise FsadError(
                f"weights {source} do not fit the architecture {arch}: {_mismatch(model, state)} "
                f"(choose the file's architecture with --arch)"
            ) from None
    return model.eval(), tag


def _mismatch(model: nn.Module, state: dict) -> str:
    """One-line summary of how ``state`` differs from ``model``'s state dict."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        k for k in own if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = [
        f"{len(v)} {what} (e.g. {v[0]})"
        for what, v in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if v
    ]
    return ", ".join(parts) or "load_state_dict refused it"


def state_hash(module: nn.Module) -> str:
    """Short content hash of a module's parameters (cache keys)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _sequential_path(model: nn.Module, taps: list[str], arch: str) -> list[tuple[str, nn.Module]]:
    """The modules from the input to the last tap, in forward order, each tap ending one piece.

    Top level: the model's children in definition order, minus classifier heads (true for every
    torchvision CNN family whose ``forward`` chains its children: ResNet/ResNeXt/Wide-ResNet,
    MobileNet, AlexNet, VGG, EfficientNet, ConvNeXt, RegNet, DenseNet, MNASNet, ShuffleNet,
    SqueezeNet). A child that contains a tap is expanded only if it is an ``nn.Sequential``.
    """
    wanted = set(taps)
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module, top: bool) -> bool:  # True once every tap is emitted
        for name, child in module.named_children():
            if top and name in _HEADS:
                continue
            full = f"{prefix}{name}"
            if full in wanted:
                out.append((full, child))
                wanted.discard(full)
            elif any(t.startswith(full + ".") for t in wanted):
                if not isinstance(child, nn.Sequential):
                    raise FsadError(
                        f"tap inside {full} of {arch} ({type(child).__name__}) cannot be split "
                        f"into stages: tap {full} itself or a module of a Sequential"
                    )
                if walk(full + ".", child, False):
                    return True
            else:
                out.append((full, child))
            if not wanted:
                return True
        return False

    if not walk("", model, True):
        known = [n for n, _ in model.named_modules() if n and n.split(".")[0] not in _HEADS][:12]
        raise FsadError(f"taps {sorted(wanted)} not found in {arch} (module names such as {', '.join(known)}, ...)")
    return out


class FeatureExtractor(nn.Module):
    """Feature maps of a torchvision classifier at named taps.

    ``arch``: any name of ``torchvision.models.list_models()`` whose forward chains its
    children (every CNN family; not ViT/Swin); ``taps``: module names (default ``TAPS[arch]``),
    in forward order; ``normalize``: apply ImageNet mean/std inside; ``trainable``: parameters
    get gradients and ``train()`` switches BatchNorm to training mode (otherwise frozen:
    ``requires_grad`` off, always in eval mode); ``channels_last``: weights and input in
    channels-last memory format (faster convolutions on CPU; False keeps torch's default
    layout, whose convolutions can differ in the last bits).

    ``forward(x)``: ``(B, 3, H, W)`` in [0, 1] -> list of tap maps ``(B, C_i, H_i, W_i)`` in
    channels-last memory format (``channels_last``; otherwise the layout torch gives). ``.stages`` (``nn.ModuleList``): stage ``i`` maps the previous
    tap's output (stage 0: the normalised image) to tap ``i``'s; ``.channels``: ``C_i``;
    ``.weights_tag``: ``imagenet`` | ``random-init`` | ``file:<name>``; ``.arch``, ``.taps``.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        weights: str = "imagenet",
        taps: list[str] | None = None,
        normalize: bool = True,
        trainable: bool = False,
        channels_last: bool = True,
    ):
        super().__init__()
        if taps is None:
            if arch not in TAPS:
                raise FsadError(
                    f"no default taps for {arch!r}: give taps (module names) or use one of {', '.join(sorted(TAPS))}"
                )
            taps = TAPS[arch]
        self.arch, self.taps = arch, list(taps)
        model, self.weights_tag = build_torchvision(arch, weights)
        path = _sequential_path(model, self.taps, arch)
        stages, current = [], []
        for name, module in path:
            current.append(module)
            if name in self.taps:
                stages.append(current[0] if len(current) == 1 else nn.Sequential(*current))
                current = []
        order = [n for n, _ in path if n in self.taps]
        if order != self.taps:
            raise FsadError(f"taps of {arch} must be in forward order: {', '.join(order)}")
        self.stages = nn.ModuleList(stages)
        self.normalize = normalize
        self.trainable = trainable
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(trainable)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.eval()
        with torch.no_grad():  # channel counts; 64 px is enough for every listed family but AlexNet
            shapes = [
                f.shape
                for f in self(torch.zeros(1, 3, 96 if arch == "alexnet" else 64, 96 if arch == "alexnet" else 64))
            ]
        bad = [t for t, s in zip(self.taps, shapes) if len(s) != 4]
        if bad:
            raise FsadError(f"tap {bad[0]} of {arch} is not a (B, C, H, W) feature map")
        self.channels = [int(s[1]) for s in shapes]

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(mode and self.trainable)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input of stage 0: normalised (when ``normalize``), in :attr:`memory_format`."""
        if self.normalize:
            x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.prepare(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class ResNetFeatures(FeatureExtractor):
    """Frozen layer1..layer3 of a torchvision ResNet (kept for existing callers): ``(B, 3, H, W)``
    -> ``[(B, 64, H/4, W/4), (B, 128, H/8, W/8), (B, 256, H/16, W/16)]`` for ResNet-18."""

    def __init__(self, arch: str = "resnet18", weights: str = "imagenet", normalize: bool = True):
        super().__init__(arch, weights, ["layer1", "layer2", "layer3"], normalize=normalize)
