"""CLIP (open_clip) as a frozen feature extractor, and offline lookup of its weights.

``open_clip`` is an optional dependency, imported on first use (:func:`import_open_clip`);
nothing here downloads: weights come from a local file or a cache (:func:`resolve_clip_weights`).

* :data:`CLIP_MEAN` / :data:`CLIP_STD`: OpenAI CLIP's input normalisation (per RGB channel,
  images in [0, 1]);
* :class:`FrozenCLIP`: class embeddings and intermediate patch tokens of an open_clip model,
  plus a zero-shot normal / anomalous text prior (WinCLIP-style prompt ensembles);
* :data:`TINY_CLIP`: a 64 px, 4-block CLIP (random init only) for tests and smoke runs;
* :func:`cached_candidates` / :func:`resolve_clip_weights`: where an open_clip checkpoint may
  be cached (torch hub checkpoints, ``~/.cache/clip``, the Hugging Face cache) and the file to load.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fsad_bench.errors import FsadError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The tiny CLIP for tests: 64 px, 16 px patches (4 × 4 grid), 4 vision / 2 text blocks.
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# Prompt ensembles of the text prior (WinCLIP's state × template lists).
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALY_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of a {}.",
    "a dark photo of the {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for anomaly detection.",
    "a photo of the {} for anomaly detection.",
)

#: ``weights`` values that mean "the pretrained tag's cached file" (anything else but "none" is a path).
PRETRAINED_WEIGHTS = ("auto", "clip", "imagenet", "pretrained")


def import_open_clip(
    needed_by: str = "CLIP", install: str = "pip install 'fsad-bench[inctrl]' (or: pip install open-clip-torch)"
):
    """The ``open_clip`` module (imported lazily; sets ``HF_HUB_OFFLINE=1`` unless set, so it never
    reaches the network); FsadError naming ``needed_by`` and ``install`` when it is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import open_clip
    except ImportError:
        raise FsadError(f"{needed_by} needs open_clip: {install}") from None
    return open_clip


@contextmanager
def offline():
    """``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` set to 1 inside the block, restored after."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class FrozenCLIP(nn.Module):
    """An open_clip CLIP used as a fixed feature extractor.

    ``model_name``: an open_clip model name or ``"tiny"`` (:data:`TINY_CLIP`, or ``model_cfg`` when given:
    an open_clip ``CLIP(**cfg)`` config, e.g. ViT-B-16-plus-240's shape with narrow blocks for
    ``benchmarks/parity/inctrl.py``; random init only);
    ``weights``: see :func:`resolve_clip_weights`; ``pretrained_tag``: the open_clip tag whose cached
    file ``weights="auto"`` looks for; ``layers``: 0-based indices of the visual blocks to tap.

    ``forward(images)`` takes ``(B, 3, S, S)`` in [0, 1] (any S; resized bicubic to the
    model's size) and returns class embeddings ``(B, D)`` (pooled + projected) and patch
    tokens ``(B, L, P, W)`` of the requested blocks (L = len(layers), P = grid², W = width), without
    final norm. ``.weights_tag``: ``random-init``, the pretrained tag, or ``file:<name>``.
    """

    def __init__(
        self, model_name: str, weights: str, pretrained_tag: str, layers: list[int], model_cfg: dict | None = None
    ):
        super().__init__()
        open_clip = import_open_clip()
        self.model_name = model_name
        if model_name == "tiny":
            if weights not in ("none", "auto"):
                raise FsadError("clip_model 'tiny' exists only with random init: use --weights none")
            cfg = TINY_CLIP if model_cfg is None else model_cfg
            self.model = open_clip.model.CLIP(**cfg)
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
            self.weights_tag = "random-init"
        else:
            if model_name not in open_clip.list_models():
                raise FsadError(f"unknown open_clip model {model_name!r} (e.g. ViT-B-16-plus-240, ViT-B-32, or tiny)")
            path = resolve_clip_weights(model_name, pretrained_tag, weights)  # fail before building
            self.model = open_clip.create_model(model_name, pretrained=None)
            self.tokenizer = open_clip.get_tokenizer(model_name)
            if path is None:
                self.weights_tag = "random-init"
            else:
                try:
                    open_clip.load_checkpoint(self.model, str(path))
                except Exception as err:
                    raise FsadError(
                        f"cannot load CLIP weights {path} into {model_name}: "
                        f"{err.__class__.__name__}: {str(err).splitlines()[0]}"
                    ) from None
                self.weights_tag = pretrained_tag if weights in PRETRAINED_WEIGHTS else f"file:{path.name}"
        self.model.eval().requires_grad_(False)
        vis = self.model.visual
        self.image_size = vis.image_size[0] if isinstance(vis.image_size, (tuple, list)) else vis.image_size
        self.grid = self.image_size // (
            vis.patch_size[0] if isinstance(vis.patch_size, (tuple, list)) else vis.patch_size
        )
        n_blocks = len(vis.transformer.resblocks)
        if any(not 0 <= i < n_blocks for i in layers):
            raise FsadError(f"CLIP layers {layers} out of range for {model_name} ({n_blocks} blocks, 0-based)")
        self.layers = list(layers)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def num_patches(self) -> int:
        """P = grid² patch tokens per image."""
        return self.grid * self.grid

    @property
    def embed_dim(self) -> int:
        """D, the width of the class embeddings (the joint image-text space)."""
        return self.model.text_projection.shape[-1]

    @property
    def width(self) -> int:
        """W, the width of the patch tokens (the visual transformer's residual stream)."""
        return self.model.visual.transformer.width

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.mean.device, self.mean.dtype)  # float32 unless the module was cast
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            ).clamp(0, 1)
        out = self.model.visual.forward_intermediates((x - self.mean) / self.std, indices=self.layers, output_fmt="NLC")
        return out["image_features"], torch.stack(out["image_intermediates"], dim=1)

    @torch.no_grad()
    def text_features(self, category: str) -> torch.Tensor:
        """``(2, D)`` unit embeddings of the normal / anomalous prompt ensembles of ``category``."""
        if category not in self._text_cache:
            name = category.replace("_", " ")
            feats = []
            for states in (NORMAL_STATES, ANOMALY_STATES):
                texts = [t.format(s.format(name)) for s in states for t in TEMPLATES]
                tokens = self.tokenizer(texts).to(self.mean.device)
                e = F.normalize(self.model.encode_text(tokens), dim=-1).mean(dim=0)
                feats.append(F.normalize(e, dim=-1))
            self._text_cache[category] = torch.stack(feats)
        return self._text_cache[category]

    def text_score(self, cls: torch.Tensor, category: str) -> torch.Tensor:
        """Zero-shot probability ``(B,)`` that images with class embeddings ``cls`` ``(B, D)`` are anomalous
        (softmax of 100 · cosine to the two ensembles, anomalous column)."""
        logits = 100.0 * F.normalize(cls, dim=-1) @ self.text_features(category).T
        return logits.softmax(dim=-1)[:, 1]


def cached_candidates(model_name: str, tag: str, torch_hub: bool = True) -> list[Path]:
    """Files where open_clip's ``model_name`` / ``tag`` checkpoint may be cached, in lookup order:
    the URL's file name in torch hub's ``checkpoints`` folder (when ``torch_hub``) and in
    ``~/.cache/clip`` (open_clip's own download folder), then the Hugging Face cache entries
    of the tag's hub repository (only those present). Not checked for existence."""
    open_clip = import_open_clip()
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    out = []
    url = cfg.get("url") or ""
    if url:
        fname = url.rsplit("/", 1)[-1]
        if torch_hub:
            out.append(Path(torch.hub.get_dir()) / "checkpoints" / fname)
        out.append(Path("~/.cache/clip").expanduser() / fname)
    hub = (cfg.get("hf_hub") or "").strip("/")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                hit = try_to_load_from_cache(hub, fname)
                if isinstance(hit, str):
                    out.append(Path(hit))
        except Exception:  # no hub package / malformed cache: just not cached
            pass
    return out


def resolve_clip_weights(model_name: str, tag: str, weights: str) -> Path | None:
    """The local checkpoint file for ``weights`` (None = random init); never downloads.

    ``"none"``: random init; a path: that file; ``"auto"``: the tag's cached file (see
    :func:`cached_candidates`) or, with a warning, random init; ``"clip"``, ``"imagenet"``,
    ``"pretrained"``: the cached file, FsadError naming where to put it when there is none.
    """
    if weights == "none":
        return None
    if weights not in PRETRAINED_WEIGHTS:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FsadError(f"CLIP weights file {path} does not exist (expected an open_clip {model_name} checkpoint)")
        return path
    candidates = cached_candidates(model_name, tag)
    for p in candidates:
        if p.is_file():
            return p
    if weights == "auto":
        warnings.warn(f"CLIP weights {model_name}/{tag} not cached; using random init", stacklevel=2)
        return None
    where = str(candidates[0]) if candidates else f"an open_clip checkpoint for {model_name}"
    raise FsadError(
        f"CLIP weights {model_name} ({tag}) not found offline: put the file at {where} "
        f"(or pass --weights PATH, or --weights none)"
    )
