"""``inctrl`` adapter: the frozen CLIP, the head, presets and options (see README.md)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fsad_bench.adapter import Adapter, Interval, ListOf, OneOf
from fsad_bench.components.clip import FrozenCLIP, import_open_clip
from fsad_bench.errors import FsadError
from fsad_bench.methods.inctrl.torch_model import InCTRLHead, inctrl_scores, patch_residuals
from fsad_bench.methods.inctrl.training import Batch, TrainingPool, train_head


class InCTRL(Adapter):
    """InCTRL: residuals between a query and k normal prompts, scored by a head trained on another dataset."""

    name = "inctrl"
    protocol = "cross-dataset"
    paper = "InCTRL (Zhu & Pang, CVPR 2024): generalist AD via in-context residual learning"
    bookkeeping_options = frozenset({"feature_cache_mb", "encode_batch"})
    presets = {
        "paper": {
            "clip_model": "ViT-B-16-plus-240",
            "pretrained": "laion400m_e32",
            "layers": [6, 8, 10],
            "epochs": 10,
            "steps_per_epoch": 100,
            "batch_size": 16,
            "train_shots": 2,
            "lr": 1e-3,
            "weight_decay": 0.01,
            "focal_gamma": 2.0,
            "loss_on": "as_logits",
            "feature_cache_mb": 4096,
            "encode_batch": 32,
            # engine_IC.py / engine_test.py: transforms.Resize(240, BICUBIC) of the original, CenterCrop(240)
            "resize": "bicubic-crop",
        },
        "cpu": {
            "clip_model": "ViT-B-32",
            "pretrained": "laion2b_s34b_b79k",
            "layers": [6, 8, 10],
            "epochs": 2,
            "steps_per_epoch": 50,
            "batch_size": 16,
            "train_shots": 2,
            "lr": 1e-3,
            "weight_decay": 0.01,
            "focal_gamma": 2.0,
            "loss_on": "as_logits",
            "feature_cache_mb": 1024,
            "encode_batch": 16,
            "resize": "bicubic-crop",
        },
    }
    option_constraints = {
        "clip_model": [str],  # an open_clip model name or "tiny" (checked when the CLIP is built)
        "pretrained": [str],
        "layers": [ListOf(Interval(int, 0))],  # 0-based blocks (range checked when the CLIP is built)
        "epochs": [Interval(int, 1)],
        "steps_per_epoch": [Interval(int, 1)],
        "batch_size": [Interval(int, 2)],  # half normal, half anomalous
        "train_shots": [Interval(int, 1)],
        "lr": [Interval(float, 0, closed="neither")],
        "weight_decay": [Interval(float, 0)],
        "focal_gamma": [Interval(float, 0)],
        "loss_on": [OneOf("as_logits", "probability")],
        "feature_cache_mb": [Interval(float, 0)],
        "encode_batch": [Interval(int, 1)],
        "resize": [OneOf("bicubic-crop", "bicubic", "bilinear")],
    }

    @property
    def resize_filter(self) -> str:
        """``"bicubic-crop"`` (the official ``Resize(240, BICUBIC)`` of the shorter side + ``CenterCrop(240)``;
        the maps are put back into the full frame by the run layer); ``"bicubic"`` (squashed to the square)
        or ``"bilinear"`` by option (labelled)."""
        return str(self.hparams["resize"])

    @property
    def input_size(self) -> int:
        """The CLIP's input side (240 for ``ViT-B-16-plus-240``): images are resized once, from the
        original files, as the official loader does (no second resampling inside the CLIP)."""
        return int(self.clip.image_size)

    def __init__(self, config=None):
        super().__init__(config)
        import_open_clip("inctrl")
        h = self.hparams
        layers = h.get("layers")
        if h["clip_model"] == "tiny" and layers == self.presets[self.preset_name]["layers"]:
            layers = [1, 2, 3]  # the tiny CLIP has 4 blocks
        self.clip = FrozenCLIP(h["clip_model"], self.config.weights, h["pretrained"], layers).to(self.device)
        self.weights_tag = self.clip.weights_tag
        self.head = InCTRLHead(self.clip.embed_dim, self.clip.num_patches).to(self.device)
        #: Category name for the text prior; the run layer sets it before ``adapt`` (default "object").
        self.category: str | None = None
        self._prompt_cls: torch.Tensor | None = None
        self._prompt_patches: torch.Tensor | None = None

    # -- features ------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class embeddings ``(N, D)`` and patch tokens ``(N, L, P, W)`` of images ``(N, 3, S, S)``, in batches."""
        bs = self.hparams["encode_batch"]
        cls, patches = [], []
        for i in range(0, len(images), bs):
            c, p = self.clip(images[i : i + bs].to(self.device))
            cls.append(c)
            patches.append(p)
        return torch.cat(cls), torch.cat(patches)

    # -- training ------------------------------------------------------------------------
    def fit(self, train: Mapping[str, torch.utils.data.Dataset]) -> None:
        """Train adapter + heads on labelled auxiliary data (see README.md).

        ``train``: category -> Dataset of ``(image, label)`` (:class:`fsad_bench.data.torch_datasets.LabelledImages`) or of
        plain images (all normal; anomalies are then synthesised with
        :func:`~fsad_bench.methods.inctrl.training.cutpaste`).
        """
        h = self.hparams
        g = torch.Generator().manual_seed(self.config.seed)
        clip = self.clip
        bytes_per_image = 4 * (clip.embed_dim + len(clip.layers) * clip.num_patches * clip.width)
        pool = TrainingPool(train, self.encode, g, bytes_per_image, h["feature_cache_mb"], self.device)
        train_head(
            self.head,
            pool,
            self._score_batch,
            epochs=h["epochs"],
            steps_per_epoch=h["steps_per_epoch"],
            batch_size=h["batch_size"],
            shots=h["train_shots"],
            lr=h["lr"],
            weight_decay=h["weight_decay"],
            focal_gamma=h["focal_gamma"],
            as_logits=h["loss_on"] == "as_logits",
        )

    def _text_scores(self, q_cls: torch.Tensor, categories: list[str]) -> torch.Tensor:
        """Text prior ``(B,)`` of each query (class embedding ``(B, D)``) for its category's prompts."""
        return torch.cat([self.clip.text_score(q_cls[i : i + 1], c) for i, c in enumerate(categories)])

    def _score_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        q_cls, q_patches, p_cls, p_patches, categories = batch[:5]
        return inctrl_scores(self.head, q_cls, q_patches, p_cls, p_patches, self._text_scores(q_cls, categories))

    # -- test time -----------------------------------------------------------------------
    def adapt(self, support: torch.Tensor) -> None:
        self.head.eval()
        cls, patches = self.encode(support)
        self._prompt_cls = cls  # (K, D)
        self._prompt_patches = patches.permute(1, 0, 2, 3).reshape(patches.shape[1], -1, patches.shape[-1])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._prompt_cls is None:
            raise FsadError("inctrl.predict called before adapt")
        self.head.eval()
        q_cls, q_patches = self.encode(images)
        text = self._text_scores(q_cls, [self.category or "object"] * len(images))
        final, _ = inctrl_scores(self.head, q_cls, q_patches, self._prompt_cls, self._prompt_patches, text)
        residual = patch_residuals(q_patches, self._prompt_patches).mean(dim=1)
        g = self.clip.grid
        maps = F.interpolate(residual.view(-1, 1, g, g), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return final.cpu(), maps[:, 0].cpu()

    def state_dict(self):  # CLIP is frozen and rebuilt from its weights: only the head is trained
        return {"head": self.head.state_dict()}
