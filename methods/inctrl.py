"""``inctrl``: in-context residual learning on a frozen CLIP (Zhu & Pang, CVPR 2024).

A generalist detector: trained once on an auxiliary dataset (normal *and* anomalous images
with labels), then applied to the categories of other datasets with k normal images as
prompts and no further training (protocol ``cross-dataset``). For a query image and its
prompts, all through one frozen CLIP:

* multi-layer patch residuals: for the patch tokens of ViT blocks 7, 9 and 11 (1-based;
  raw residual stream, no final LayerNorm / projection), every query patch gets
  ``0.5 * (1 - max cosine similarity)`` to all prompt patches of the same block; the
  three maps are averaged -> ``(B, P)``; its maximum is the patch-level score;
* image-level residual: ``mean_k adapter(prompt class embedding) - adapter(query class
  embedding)`` (projected CLIP image embeddings, adapter = 640 -> 160 -> 640 bias-free MLP
  with ReLUs), scored by an MLP head (640 -> 128 -> 64 -> 1, ReLU + BatchNorm, sigmoid);
* text prior: softmax(100 · cos(image, [normal, anomalous] prompt-ensemble embeddings))
  of the anomalous class, with WinCLIP-style state × template ensembles;
* holistic head: the patch residual map plus the image score plus the text score
  (broadcast over patches) -> MLP (P -> 128 -> 64 -> 1) -> sigmoid; final image score =
  (holistic score + max patch residual) / 2.

Facts from the official code (github.com/mala-lab/InCTRL):
``engine_IC.py``: backbone ``ViT-B-16-plus-240`` (open_clip, LAION-400M ``laion400m_e32``
checkpoint), 240 px bicubic resize + centre crop, CLIP mean/std; AdamW lr 1e-3,
betas (0.9, 0.999) (default weight decay), 10 epochs; loss = binary focal loss (α 1, γ 2)
on the final score + the same on the image-residual score. ``main.py``: 100 steps per
epoch, shot 2 while training, image size 240. ``open_clip/config/defaults.py``: batch 16.
``datasets/new_utlis.py``: every batch is half normal, half anomalous.
``datasets/preprocess/gen_train_json.py``: training normals = train/good + test/good,
anomalies = every test/<defect> image of the auxiliary dataset. ``IC_dataset_new.py``: the
prompts of a training query are random normal images of the same category.
``open_clip/model.py``: InCTRL head sizes above, out layers [7, 9, 11], 0.5 factor of the
patch residual, text ensembles, ``final = (holistic + max patch residual) / 2``; visual
and text towers frozen. ``binary_focal_loss.py`` applies BCE-*with-logits* to the
sigmoid outputs; we reproduce that in ``loss_on="as_logits"`` (paper preset) and offer
``"probability"`` (plain focal loss on the probabilities).

Batch pairing (a caveat for the published numbers): the official training forward
(``open_clip/model.py``, ``InCTRL.forward``, the ``normal_list is None`` branch used by
``engine_IC.train_epoch`` at ``TRAIN.BATCH_SIZE = 16``) stacks the out-layer patch tokens as
``(layers, batch, tokens, C)`` and reshapes them with ``reshape(b, 3, 225, -1)`` (prompts:
``reshape(b, 3, 225 * shot, -1)``, prompt class tokens ``reshape(b, shot, -1)`` of a
shot-major stack) without a ``permute``: row ``i`` of the result holds the blocks ``3i … 3i+2``
of the flattened (layer, image) order, i.e. layer ``⌊(3i+j)/16⌋`` of image ``(3i+j) mod 16``,
so during training most queries are compared with *other* images' tokens and prompts
(often of another category) and the loss of query ``i`` is computed on features of
queries ``3i … 3i+2``. At test time (``TEST.BATCH_SIZE = 1``) the reshape is harmless. Ours
pairs every query with its own prompts in training and test (``patch_residuals`` on
``(B, L, P, C)`` queries and per-query ``(B, L, k·P, C)`` prompts, layers kept apart by an
explicit ``permute``); the official mixing is not reproduced, so a head we train sees
different (correctly paired) residuals than the published checkpoint did.

Not in the official code: anomaly maps (we return the patch residual map, upsampled
bilinearly), anomaly synthesis (CutPaste-like, only used when a training category has no
labelled anomalies, e.g. under the aggregated protocol), the ``tiny`` CLIP for tests.

Presets: ``paper`` is the official configuration (needs the CLIP checkpoint; a GPU);
``cpu`` keeps the architecture family but uses ViT-B-32 at 224 px and 2 × 50 steps so a
cross-dataset fit on the demo data takes minutes on 2 cores. ``clip_model="tiny"`` builds
a 4-block, width-64 CLIP (random init only) for tests and smoke runs.

Weights (``config.weights``): ``"none"`` random init; a path to an open_clip checkpoint;
``"auto"`` the pretrained tag's file when it is in a local cache (torch hub checkpoints,
``~/.cache/clip`` or the Hugging Face cache), otherwise random init (labelled
``random-init``); anything else ("clip", "imagenet", ...) requires the cached file.
Nothing is ever downloaded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fsad_bench.adapter import Adapter
from fsad_bench.errors import FsadError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The tiny CLIP for tests: 64 px, 16 px patches (4 × 4 grid), 4 vision / 2 text blocks.
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# Prompt ensembles of the text prior (the official code uses WinCLIP's state × template lists).
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw",
                 "{} without defect", "{} without damage")
ANOMALY_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
    "a close-up photo of the {}.", "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of a {}.", "a dark photo of the {}.", "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of the {}.", "a photo of a {}.", "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.", "a photo of a {} for visual inspection.",
    "a photo of the {} for visual inspection.", "a photo of a {} for anomaly detection.",
    "a photo of the {} for anomaly detection.",
)


def _open_clip():
    """Import open_clip lazily (optional dependency); never let it reach the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import open_clip
    except ImportError:
        raise FsadError("inctrl needs open_clip: pip install 'fsad-bench[inctrl]' (or: pip install open-clip-torch)") from None
    return open_clip


# -- data for the cross-dataset protocol (see fsad_bench.protocols.training_data) ---------

def _items(ds: torch.utils.data.Dataset) -> tuple[list[int], list[int]]:
    """Indices of normal and anomalous items of a train dataset (plain image datasets: all normal)."""
    labels = getattr(ds, "labels", None)
    if labels is None:
        return list(range(len(ds))), []
    return [i for i, v in enumerate(labels) if v == 0], [i for i, v in enumerate(labels) if v == 1]


def _image_of(ds: torch.utils.data.Dataset, i: int) -> torch.Tensor:
    item = ds[i]
    return item[0] if isinstance(item, (tuple, list)) else item


def cutpaste(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A pseudo-anomaly ``(3, S, S)``: a random rectangle (10-30 % of the side) copied elsewhere."""
    s = image.shape[-1]
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=generator))  # noqa: E731
    h, w = r(max(1, s // 10), max(1, 3 * s // 10)), r(max(1, s // 10), max(1, 3 * s // 10))
    y0, x0, y1, x1 = r(0, s - h), r(0, s - w), r(0, s - h), r(0, s - w)
    out = image.clone()
    patch = image[:, y0 : y0 + h, x0 : x0 + w]
    gain = 0.6 + 0.8 * torch.rand(3, 1, 1, generator=generator)
    out[:, y1 : y1 + h, x1 : x1 + w] = (patch * gain).clamp(0, 1)
    return out


# -- the model --------------------------------------------------------------------------

def patch_residuals(query: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Nearest-prompt residual of every query patch, per layer.

    ``query`` ``(B, L, P, C)``: patch tokens of L layers; ``prompts`` ``(L, M, C)`` (shared by
    the batch) or ``(B, L, M, C)`` (one prompt set per query), M = k · P prompt patches.
    Returns ``(B, L, P)`` = ``0.5 * (1 - max_m cos(query patch, prompt patch m))`` in [0, 1].
    """
    q = F.normalize(query, dim=-1)
    p = F.normalize(prompts, dim=-1)
    sim = torch.einsum("blpc,lmc->blpm", q, p) if p.dim() == 3 else torch.einsum("blpc,blmc->blpm", q, p)
    return 0.5 * (1.0 - sim.max(dim=-1).values)


class ScoreHead(nn.Sequential):
    """MLP ``(B, D) -> (B, 1)`` in (0, 1): D -> 128 -> 64 -> 1, ReLU then BatchNorm, sigmoid."""

    def __init__(self, dim_in: int):
        super().__init__(nn.Linear(dim_in, 128), nn.ReLU(), nn.BatchNorm1d(128),
                         nn.Linear(128, 64), nn.ReLU(), nn.BatchNorm1d(64),
                         nn.Linear(64, 1), nn.Sigmoid())


class ResidualAdapter(nn.Sequential):
    """Bias-free bottleneck ``(…, D) -> (…, D)``: D -> D/4 -> D with ReLUs (image-level residual)."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
                         nn.Linear(dim // reduction, dim, bias=False), nn.ReLU())


class InCTRLHead(nn.Module):
    """The trainable part of InCTRL (CLIP stays frozen).

    Inputs per query: patch residuals ``(B, P)`` (layer-averaged), query class embedding
    ``(B, D)``, prompt class embeddings ``(B, K, D)`` or ``(K, D)``, text score ``(B,)``.
    """

    def __init__(self, embed_dim: int, num_patches: int):
        super().__init__()
        self.adapter = ResidualAdapter(embed_dim)
        self.image_head = ScoreHead(embed_dim)
        self.holistic_head = ScoreHead(num_patches)

    def forward(self, patch_map: torch.Tensor, query_cls: torch.Tensor, prompt_cls: torch.Tensor,
                text_score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (final score ``(B,)``, image-residual score ``(B,)``), both in [0, 1]."""
        prompt_mean = self.adapter(prompt_cls).mean(dim=-2)  # (B, D) or (D,)
        residual = prompt_mean - self.adapter(query_cls)
        image_score = self.image_head(residual)  # (B, 1)
        holistic = self.holistic_head(patch_map + image_score + text_score[:, None])[:, 0]
        final = 0.5 * (holistic + patch_map.max(dim=1).values)
        return final, image_score[:, 0]


def focal_loss(scores: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, alpha: float = 1.0,
               as_logits: bool = True) -> torch.Tensor:
    """Binary focal loss, mean over the batch. ``as_logits`` treats ``scores`` as logits, as the
    official code does with its sigmoid outputs; otherwise they are probabilities."""
    if as_logits:
        bce = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")
    else:
        bce = F.binary_cross_entropy(scores.clamp(1e-6, 1 - 1e-6), labels, reduction="none")
    pt = torch.exp(-bce)
    return (alpha * (1 - pt) ** gamma * bce).mean()


class FrozenCLIP(nn.Module):
    """An open_clip CLIP used as a fixed feature extractor.

    ``forward(images)`` takes ``(B, 3, S, S)`` in [0, 1] (any S; resized bicubic to the
    model's size) and returns class embeddings ``(B, D)`` (pooled + projected) and patch
    tokens ``(B, L, P, W)`` of the requested blocks (0-based), without final norm.
    """

    def __init__(self, model_name: str, weights: str, pretrained_tag: str, layers: list[int]):
        super().__init__()
        open_clip = _open_clip()
        self.model_name = model_name
        if model_name == "tiny":
            if weights not in ("none", "auto"):
                raise FsadError("clip_model 'tiny' exists only with random init: use --weights none")
            self.model = open_clip.model.CLIP(**TINY_CLIP)
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=TINY_CLIP["text_cfg"]["context_length"])
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
                    raise FsadError(f"cannot load CLIP weights {path} into {model_name}: "
                                    f"{err.__class__.__name__}: {str(err).splitlines()[0]}") from None
                explicit = weights not in ("auto", "clip", "imagenet", "pretrained")
                self.weights_tag = f"file:{path.name}" if explicit else pretrained_tag
        self.model.eval().requires_grad_(False)
        vis = self.model.visual
        self.image_size = vis.image_size[0] if isinstance(vis.image_size, (tuple, list)) else vis.image_size
        self.grid = self.image_size // (vis.patch_size[0] if isinstance(vis.patch_size, (tuple, list)) else vis.patch_size)
        n_blocks = len(vis.transformer.resblocks)
        if any(not 0 <= i < n_blocks for i in layers):
            raise FsadError(f"inctrl layers {layers} out of range for {model_name} ({n_blocks} blocks, 0-based)")
        self.layers = list(layers)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def embed_dim(self) -> int:
        return self.model.text_projection.shape[-1]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.mean.device, torch.float32)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=True).clamp(0, 1)
        out = self.model.visual.forward_intermediates((x - self.mean) / self.std, indices=self.layers,
                                                      output_fmt="NLC")
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
        """Zero-shot probability ``(B,)`` that images with class embeddings ``cls`` are anomalous."""
        logits = 100.0 * F.normalize(cls, dim=-1) @ self.text_features(category).T
        return logits.softmax(dim=-1)[:, 1]


def _cached_candidates(model_name: str, tag: str) -> list[Path]:
    open_clip = _open_clip()
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    out = []
    url = cfg.get("url") or ""
    if url:
        fname = url.rsplit("/", 1)[-1]
        out += [Path(torch.hub.get_dir()) / "checkpoints" / fname, Path("~/.cache/clip").expanduser() / fname]
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
    """The local checkpoint file for ``weights`` (None = random init); never downloads."""
    if weights == "none":
        return None
    if weights not in ("auto", "clip", "imagenet", "pretrained"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FsadError(f"CLIP weights file {path} does not exist (expected an open_clip {model_name} checkpoint)")
        return path
    candidates = _cached_candidates(model_name, tag)
    for p in candidates:
        if p.is_file():
            return p
    if weights == "auto":
        warnings.warn(f"CLIP weights {model_name}/{tag} not cached; inctrl uses random init")
        return None
    where = str(candidates[0]) if candidates else f"an open_clip checkpoint for {model_name}"
    raise FsadError(f"CLIP weights {model_name} ({tag}) not found offline: put the file at {where} "
                    f"(or pass --weights PATH, or --weights none)")


class InCTRL(Adapter):
    """InCTRL: residuals between a query and k normal prompts, scored by a head trained on another dataset."""

    name = "inctrl"
    protocol = "cross-dataset"
    paper = "InCTRL (Zhu & Pang, CVPR 2024): generalist AD via in-context residual learning"
    bookkeeping_options = frozenset({"feature_cache_mb", "encode_batch"})
    presets = {
        "paper": {"clip_model": "ViT-B-16-plus-240", "pretrained": "laion400m_e32", "layers": [6, 8, 10],
                  "epochs": 10, "steps_per_epoch": 100, "batch_size": 16, "train_shots": 2, "lr": 1e-3,
                  "weight_decay": 0.01, "focal_gamma": 2.0, "loss_on": "as_logits", "feature_cache_mb": 4096,
                  "encode_batch": 32},
        "cpu": {"clip_model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "layers": [6, 8, 10],
                "epochs": 2, "steps_per_epoch": 50, "batch_size": 16, "train_shots": 2, "lr": 1e-3,
                "weight_decay": 0.01, "focal_gamma": 2.0, "loss_on": "as_logits", "feature_cache_mb": 1024,
                "encode_batch": 16},
    }

    def __init__(self, config=None):
        super().__init__(config)
        torch.manual_seed(self.config.seed)
        h = self.hparams
        if h["loss_on"] not in ("as_logits", "probability"):
            raise FsadError(f"inctrl loss_on must be 'as_logits' or 'probability', got {h['loss_on']!r}")
        layers = h.get("layers")
        if h["clip_model"] == "tiny" and layers == self.presets[self.preset_name]["layers"]:
            layers = [1, 2, 3]  # the tiny CLIP has 4 blocks
        self.clip = FrozenCLIP(h["clip_model"], self.config.weights, h["pretrained"], layers).to(self.device)
        self.weights_tag = self.clip.weights_tag
        self.head = InCTRLHead(self.clip.embed_dim, self.clip.num_patches).to(self.device)
        #: Category name for the text prior; the engine sets it before ``adapt`` (default "object").
        self.category: str | None = None
        self._prompt_cls: torch.Tensor | None = None
        self._prompt_patches: torch.Tensor | None = None

    # -- features ------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class embeddings ``(N, D)`` and patch tokens ``(N, L, P, W)`` in batches."""
        bs = self.hparams["encode_batch"]
        cls, patches = [], []
        for i in range(0, len(images), bs):
            c, p = self.clip(images[i : i + bs].to(self.device))
            cls.append(c)
            patches.append(p)
        return torch.cat(cls), torch.cat(patches)

    # -- training ------------------------------------------------------------------------
    def fit(self, train: Mapping[str, torch.utils.data.Dataset]) -> None:
        """Train adapter + heads on labelled auxiliary data (see module docstring).

        ``train``: category -> Dataset of ``(image, label)`` (:class:`fsad_bench.data.torch_datasets.LabelledImages`) or of
        plain images (all normal; anomalies are then synthesised with :func:`cutpaste`).
        """
        h = self.hparams
        g = torch.Generator().manual_seed(self.config.seed)
        pools = TrainingPool(self, train, g)
        params = list(self.head.parameters())
        opt = torch.optim.AdamW(params, lr=h["lr"], betas=(0.9, 0.999), weight_decay=h["weight_decay"])
        self.head.train()
        n_norm = h["batch_size"] // 2
        n_anom = h["batch_size"] - n_norm
        for _ in range(h["epochs"] * h["steps_per_epoch"]):
            batch = pools.sample(n_norm, n_anom, h["train_shots"])
            final, image_score = self._forward(*batch[:5])
            y = batch[5]
            as_logits = h["loss_on"] == "as_logits"
            loss = (focal_loss(final, y, h["focal_gamma"], as_logits=as_logits)
                    + focal_loss(image_score, y, h["focal_gamma"], as_logits=as_logits))
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.head.eval()

    def _forward(self, q_cls, q_patches, p_cls, p_patches, categories):
        """Scores of queries against prompts; prompts shared ``(K, D)``/``(L, K·P, W)`` or per query."""
        patch_map = patch_residuals(q_patches, p_patches).mean(dim=1)  # (B, P)
        text = torch.cat([self.clip.text_score(q_cls[i : i + 1], c) for i, c in enumerate(categories)])
        return self.head(patch_map, q_cls, p_cls, text)

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
        category = self.category or "object"
        final, _ = self._forward(q_cls, q_patches, self._prompt_cls, self._prompt_patches, [category] * len(images))
        residual = patch_residuals(q_patches, self._prompt_patches).mean(dim=1)
        g = self.clip.grid
        maps = F.interpolate(residual.view(-1, 1, g, g), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return final.cpu(), maps[:, 0].cpu()

    def state_dict(self):  # CLIP is frozen and rebuilt from its weights: only the head is trained
        return {"head": self.head.state_dict()}


class TrainingPool:
    """Per-category normal / anomalous items with (optionally cached) CLIP features, for batches."""

    def __init__(self, owner: InCTRL, train: Mapping[str, torch.utils.data.Dataset], generator: torch.Generator):
        self.owner, self.g = owner, generator
        self.cats = []
        for c, ds in train.items():
            normal, anomalous = _items(ds)
            if len(normal) < 1:
                continue
            self.cats.append((c, ds, normal, anomalous))
        if not self.cats:
            raise FsadError("inctrl.fit got no normal training images")
        self.synthesise = any(not a for _, _, _, a in self.cats)
        clip = owner.clip
        per_image = 4 * (clip.embed_dim + len(clip.layers) * clip.num_patches * clip.model.visual.transformer.width)
        total = sum(len(ds) for _, ds, _, _ in self.cats)
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        if not self.synthesise and total * per_image <= owner.hparams["feature_cache_mb"] * 2**20:
            self.cache = {}
            for ci, (_, ds, _, _) in enumerate(self.cats):
                imgs = torch.stack([_image_of(ds, i) for i in range(len(ds))])
                cls, patches = owner.encode(imgs)
                for i in range(len(ds)):
                    self.cache[(ci, i)] = (cls[i], patches[i])

    def _randint(self, n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=self.g))

    def _features(self, ci: int, idx: list[int], fake: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            pairs = [self.cache[(ci, i)] for i in idx]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        ds = self.cats[ci][1]
        imgs = torch.stack([cutpaste(_image_of(ds, i), self.g) if f else _image_of(ds, i) for i, f in zip(idx, fake)])
        return self.owner.encode(imgs)

    def sample(self, n_normal: int, n_anomalous: int, shots: int):
        """A balanced batch: query features, per-query prompt features, categories, labels ``(B,)``."""
        q_cls, q_patch, p_cls, p_patch, cats, labels = [], [], [], [], [], []
        for label, n in ((0, n_normal), (1, n_anomalous)):
            for _ in range(n):
                ci = self._randint(len(self.cats))
                c, _, normal, anomalous = self.cats[ci]
                if label == 1 and anomalous:
                    qi, fake = anomalous[self._randint(len(anomalous))], False
                else:
                    qi, fake = normal[self._randint(len(normal))], label == 1
                prompts = [normal[self._randint(len(normal))] for _ in range(shots)]
                cls, patches = self._features(ci, [qi] + prompts, [fake] + [False] * shots)
                q_cls.append(cls[0])
                q_patch.append(patches[0])
                p_cls.append(cls[1:])
                p_patch.append(patches[1:].permute(1, 0, 2, 3).reshape(patches.shape[1], -1, patches.shape[-1]))
                cats.append(c)
                labels.append(float(label))
        dev = self.owner.device
        return (torch.stack(q_cls).to(dev), torch.stack(q_patch).to(dev), torch.stack(p_cls).to(dev),
                torch.stack(p_patch).to(dev), cats, torch.tensor(labels, device=dev))


__all__ = ["InCTRL", "patch_residuals", "cutpaste", "TINY_CLIP"]
