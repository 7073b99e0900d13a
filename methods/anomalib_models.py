"""``anomalib:<Model>``: anomalib's image models that fit from normal images alone, run as
training-free few-shot methods on fsad-bench's support sets (``pip install 'fsad-bench[anomalib]'``,
anomalib >= 2.7).

Only anomalib's **torch models** are wrapped (``PadimModel``, ``PatchcoreModel``,
``WinClipModel``): no Lightning module, engine, pre-processor, post-processor or metric. The
adapter feeds them ImageNet-normalised (CLIP-normalised for WinClip) tensors at the suite's
image size, reads their raw ``pred_score`` and ``anomaly_map``, and fsad-bench's metrics score
those — anomalib's own ``AUROC`` is never used (torchmetrics applies a sigmoid to scores outside
[0, 1], which collapses raw Mahalanobis scores to 0.5: anomalib issue #3407).

Offline backbones: the CNN is a **torchvision** model built by
:func:`fsad_bench.components.backbone.build_torchvision` with fsad-bench's weights resolution
(``--weights imagenet|auto|none|FILE``, e.g. the MobileNetV2 state-dict file) and handed to
anomalib as an ``nn.Module`` (anomalib then extracts the taps with torchvision's
``create_feature_extractor``), so anomalib's timm backbones are never created and nothing is
downloaded. Tap names are torchvision node names (``layer1``, ``features.6``, ...).

Models (``anomalib:<Model>``, options = preset values, all overridable):

* ``Padim`` — anomalib defaults: taps ``layer1..3`` (ResNet) / ``features.3, .6, .13``
  (MobileNetV2), ``n_features``: anomalib's random channel subset (ResNet-18: 100, WRN-50: 550,
  other backbones: all), ``"all"`` keeps every channel; ε = 0.01, σ = 4 px, score = map maximum.
  Channel subset drawn with ``torch.randperm`` under the adapter's seed. Needs k >= 2 (the
  covariance of one image divides by N − 1 = 0; FsadError at k = 1).
* ``Patchcore`` — taps ``layer2``, ``layer3`` (MobileNetV2 ``features.6, .13``),
  ``coreset_ratio`` 0.1 (anomalib's default k-center greedy; 1.0 keeps every patch without
  running the sampler), ``num_neighbors`` 9.
* ``WinClip`` — k-shot WinCLIP+ (``setup(category, support)``), 240 px, OpenCLIP
  ViT-B-16-plus-240 ``laion400m_e31`` weights from the local Hugging Face / OpenCLIP cache only;
  when absent the adapter stops with one line naming them. Needs ``open_clip``.

The record stores ``anomalib_version`` and every hyper-parameter (``Adapter.describe``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fsad_bench.adapter import Adapter, Interval, ListOf, OneOf
from fsad_bench.components.backbone import IMAGENET_MEAN, IMAGENET_STD, build_torchvision
from fsad_bench.components.clip import CLIP_MEAN, CLIP_STD, cached_candidates, import_open_clip, offline
from fsad_bench.errors import FsadError

PREFIX = "anomalib:"
MIN_VERSION = (2, 7)
#: Default taps (torchvision node names) per model and architecture.
DEFAULT_TAPS: dict[str, dict[str, list[str]]] = {
    "Padim": {
        "resnet18": ["layer1", "layer2", "layer3"],
        "wide_resnet50_2": ["layer1", "layer2", "layer3"],
        "mobilenet_v2": ["features.3", "features.6", "features.13"],
    },
    "Patchcore": {
        "resnet18": ["layer2", "layer3"],
        "wide_resnet50_2": ["layer2", "layer3"],
        "mobilenet_v2": ["features.6", "features.13"],
    },
}
PADIM_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}  # anomalib's _N_FEATURES_DEFAULTS
WINCLIP_WEIGHTS = ("ViT-B-16-plus-240", "laion400m_e31")


def anomalib_version() -> str | None:
    """Installed (importable) anomalib version, None when absent."""
    try:
        from importlib.metadata import version
        from importlib.util import find_spec

        return version("anomalib") if find_spec("anomalib") is not None else None
    except Exception:  # not installed, or blocked (sys.modules["anomalib"] = None)
        return None


def _require_anomalib() -> str:
    v = anomalib_version()
    if v is None:
        raise FsadError("anomalib:<Model> methods need anomalib >= 2.7: pip install 'fsad-bench[anomalib]'")
    parts = tuple(int(p) for p in v.split(".")[:2] if p.isdigit())
    if parts < MIN_VERSION:
        raise FsadError(f"anomalib {v} is installed; anomalib:<Model> methods need anomalib >= 2.7")
    return v


def _taps(model: str, arch: str, taps: list[str] | None) -> list[str]:
    if taps:
        return list(taps)
    if arch not in DEFAULT_TAPS[model]:
        raise FsadError(
            f"anomalib:{model}: no default taps for arch {arch!r}; pass the taps option "
            f"(torchvision node names, e.g. layer2)"
        )
    return DEFAULT_TAPS[model][arch]


class _AnomalibAdapter(Adapter):
    """Common part: normalisation, batching, reading ``InferenceBatch`` outputs."""

    protocol = "training-free"
    model_name = ""
    bookkeeping_options = frozenset({"batch_size"})
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, config=None):
        super().__init__(config)
        self.hparams["anomalib_version"] = _require_anomalib()
        self.model: nn.Module = self.build().to(self.device).eval()

    def build(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.to(self.device) - m) / s

    def backbone(self) -> nn.Module:
        net, self.weights_tag = build_torchvision(self.hparams["arch"], self.config.weights)
        return net

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()
        scores, maps = [], []
        bs = self.hparams.get("batch_size", 16)
        for i in range(0, len(images), bs):
            out = self.model(self.normalize(images[i : i + bs]))
            scores.append(out.pred_score.reshape(-1).float().cpu())
            m = out.anomaly_map.float().cpu()
            maps.append(m.reshape(m.shape[0], *m.shape[-2:]))
        return torch.cat(scores), torch.cat(maps)

    def state_dict(self):  # nothing is trained
        return {}


class AnomalibPadim(_AnomalibAdapter):
    """anomalib's ``PadimModel`` on the support set (see the module docstring)."""

    name = "anomalib:Padim"
    model_name = "Padim"
    paper = "anomalib PadimModel — PaDiM (Defard et al., ICPR 2020)"
    presets = {"cpu": {"arch": "resnet18", "taps": None, "n_features": None, "batch_size": 16}}
    option_constraints = {
        "arch": [str],  # a torchvision classifier (checked when built)
        "taps": [None, ListOf(str)],  # torchvision node names; None: DEFAULT_TAPS
        # None / "default": anomalib's count for the arch; "all"; or a count (<= the taps' channels: checked when built)
        "n_features": [None, OneOf("default", "all"), Interval(int, 1)],
        "batch_size": [Interval(int, 1)],
    }

    def build(self) -> nn.Module:
        from anomalib.models.image.padim.torch_model import PadimModel

        arch = self.hparams["arch"]
        taps = _taps("Padim", arch, self.hparams["taps"])
        net = self.backbone()
        n = self.hparams["n_features"]
        model = PadimModel(backbone=net, layers=taps, pre_trained=False, n_features=1)  # n_features set below
        total = model.n_features_original
        if n in (None, "default"):
            n = PADIM_N_FEATURES.get(arch, total)
        n = total if n == "all" else int(n)
        if not 0 < n <= total:
            raise FsadError(f"anomalib:Padim: n_features must be in 1..{total} for {arch} taps {taps}, got {n}")
        model.n_features = n  # the channel subset, drawn like anomalib's (torch.randperm) from the adapter's seed
        model.idx = torch.randperm(total, generator=torch.Generator().manual_seed(self.config.seed))[:n]
        self.hparams.update(taps=taps, n_features_used=n, channels_total=total)
        return model

    @torch.no_grad()
    def adapt(self, support: torch.Tensor) -> None:
        if len(support) < 2:  # anomalib's covariance divides by N - 1: NaN maps at k = 1
            raise FsadError(
                f"anomalib:Padim needs k >= 2 support images (PadimModel's covariance of "
                f"{len(support)} image is undefined); run it with --k 2,4,..."
            )
        self.model.train()
        self.model.memory_bank = []
        bs = self.hparams["batch_size"]
        for i in range(0, len(support), bs):
            self.model(self.normalize(support[i : i + bs]))
        self.model.fit()
        self.model.eval()


class AnomalibPatchcore(_AnomalibAdapter):
    """anomalib's ``PatchcoreModel`` on the support set (see the module docstring)."""

    name = "anomalib:Patchcore"
    model_name = "Patchcore"
    paper = "anomalib PatchcoreModel — PatchCore (Roth et al., CVPR 2022)"
    presets = {
        "cpu": {"arch": "wide_resnet50_2", "taps": None, "coreset_ratio": 0.1, "num_neighbors": 9, "batch_size": 16}
    }
    option_constraints = {
        "arch": [str],
        "taps": [None, ListOf(str)],
        "coreset_ratio": [Interval(float, 0, 1, closed="right")],  # 1: every patch, no sampler
        "num_neighbors": [Interval(int, 1)],
        "batch_size": [Interval(int, 1)],
    }

    def build(self) -> nn.Module:
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        taps = _taps("Patchcore", self.hparams["arch"], self.hparams["taps"])
        self.hparams["taps"] = taps
        return PatchcoreModel(
            layers=taps, backbone=self.backbone(), pre_trained=False, num_neighbors=int(self.hparams["num_neighbors"])
        )

    @torch.no_grad()
    def adapt(self, support: torch.Tensor) -> None:
        self.model.train()
        self.model.embedding_store.clear()
        bs = self.hparams["batch_size"]
        for i in range(0, len(support), bs):
            self.model(self.normalize(support[i : i + bs]))
        ratio = float(self.hparams["coreset_ratio"])
        if ratio >= 1.0:  # keep every patch (the sampler would only reorder them, slowly)
            self.model.memory_bank = torch.vstack(self.model.embedding_store)
            self.model.embedding_store.clear()
        else:
            # anomalib's k-center greedy draws its start from torch's RNG and its sparse random projection
            # from numpy's global one (sklearn, random_state=None): seed both from the adapter's seed, then put
            # numpy's state back
            torch.manual_seed(self.config.seed)
            state = np.random.get_state()
            np.random.seed(self.config.seed % 2**32)
            try:
                self.model.subsample_embedding(ratio)
            finally:
                np.random.set_state(state)
        self.model.eval()


def winclip_weights_cached() -> str | None:
    """Where the OpenCLIP ViT-B-16-plus-240 laion400m_e31 weights are cached (the Hugging Face cache or
    ``~/.cache/clip``, where open_clip itself looks), None if nowhere or without open_clip."""
    try:
        found = [p for p in cached_candidates(*WINCLIP_WEIGHTS, torch_hub=False) if p.is_file()]
    except FsadError:  # open_clip is not installed
        return None
    return str(found[0]) if found else None


class AnomalibWinClip(_AnomalibAdapter):
    """anomalib's ``WinClipModel`` in its k-shot mode (WinCLIP+); CLIP weights from the cache only."""

    name = "anomalib:WinClip"
    model_name = "WinClip"
    paper = "anomalib WinClipModel — WinCLIP+ (Jeong et al., CVPR 2023)"
    presets = {"cpu": {"scales": [2, 3], "batch_size": 8}}
    option_constraints = {
        "scales": [ListOf(Interval(int, 1))],  # window sizes in patches
        "batch_size": [Interval(int, 1)],
    }
    mean, std = CLIP_MEAN, CLIP_STD

    @property
    def input_size(self) -> int:
        return 240  # ViT-B-16-plus-240

    def build(self) -> nn.Module:
        import_open_clip("anomalib:WinClip", install="pip install open-clip-torch")
        if winclip_weights_cached() is None:
            raise FsadError(
                "anomalib:WinClip: OpenCLIP weights ViT-B-16-plus-240 / laion400m_e31 are not cached "
                "(Hugging Face hub timm/vit_base_patch16_plus_clip_240.laion400m_e31); nothing is downloaded"
            )
        from anomalib.models.image.winclip.torch_model import WinClipModel

        self.weights_tag = "clip:" + "/".join(WINCLIP_WEIGHTS)
        with offline():
            return WinClipModel(scales=tuple(self.hparams["scales"]))

    @torch.no_grad()
    def adapt(self, support: torch.Tensor) -> None:
        name = (self.category or "object").replace("_", " ")
        self.model.setup(class_name=name, reference_images=self.normalize(support))


MODELS: dict[str, type[_AnomalibAdapter]] = {
    "Padim": AnomalibPadim,
    "Patchcore": AnomalibPatchcore,
    "WinClip": AnomalibWinClip,
}


def names() -> list[str]:
    """Registry names ``anomalib:<Model>`` (empty when anomalib is not installed)."""
    return [PREFIX + m for m in MODELS] if anomalib_version() else []


def get(model: str) -> type[Adapter]:
    """Adapter class for ``anomalib:<model>``; FsadError for unknown models or a missing anomalib."""
    if model not in MODELS:
        raise FsadError(
            f"unknown anomalib model {model!r} (wrapped: {', '.join(PREFIX + m for m in MODELS)}; "
            f"anomalib models that need training on defects or many images are not wrapped)"
        )
    _require_anomalib()
    return MODELS[model]
