"""``patchcore``: PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection",
CVPR 2022) on the k support images — a training-free memory-bank reference.

Facts (paper Sec. 3; checked against anomalib 2.7's ``PatchcoreModel``, code read, not copied):

* locally aware patch features: each tap map of a frozen ImageNet backbone is averaged over a
  ``p × p`` neighbourhood (p = 3, stride 1, zero padding counted: ``AvgPool2d(3, 1, 1)``), the
  deeper taps are upsampled (bilinear) to the first tap's grid and concatenated — WRN-50
  ``layer2`` + ``layer3`` by default (512 + 1024 = 1536 channels, a 28 × 28 grid at 224 px);
* memory bank M: every patch of every (optionally augmented) support image;
* greedy coreset subsampling (k-center greedy, on features randomly projected to 128
  dimensions, seeded start point) keeps ``coreset_ratio`` of M. The paper subsamples
  full training sets to 1–25 %; at few-shot sizes the bank is small, so the default ratio
  1.0 keeps every patch (no subsampling);
* patch score s(m) = distance of a test patch to its nearest neighbour in M — exact, in
  torch, chunked over queries (the neighbour is found with the ``‖x‖² + ‖y‖² − 2 x·y``
  matrix product, then its distance is recomputed from the difference vector);
  ``knn = "faiss"`` uses an exact faiss ``IndexFlatL2`` instead (faiss is optional);
* image score (paper Eq. 7): with m* the test patch of largest s, s* its score and m^* its
  nearest bank patch, ``s = (1 − exp‖m* − m^*‖ / Σ_{m ∈ N_b(m^*)} exp‖m* − m‖) · s*`` where
  N_b are the b nearest bank patches of m^* (b = ``num_neighbors`` = 9 as in anomalib;
  ``num_neighbors = 1`` gives the plain maximum, as the official code's default does);
* map: patch scores upsampled to the image (``upsample``: ``bilinear`` — the official code;
  ``nearest`` — anomalib's) and smoothed by a Gaussian of σ = 4 px (:mod:`fsad_bench.components.maps`).

Options (every preset value can be overridden): ``arch`` (a torchvision CNN that
``FeatureExtractor`` can tap; taps: module names from ``taps`` or :data:`PATCHCORE_TAPS`), ``patch_size``, ``coreset_ratio``, ``coreset_dim``,
``num_neighbors``, ``augment`` (RegAD's 22 support views, default off: the paper has no
augmentation), ``upsample``, ``sigma``, ``knn`` (``torch`` | ``faiss``), ``batch_size``,
``chunk`` (query patches per distance block).
Presets: ``paper`` = ``cpu`` (WRN-50 layer2+3, p = 3, b = 9, σ = 4); the paper's 256 → 224
resize / centre crop is the suite's ``image_size`` here.
Option values are declared in ``PatchCore.option_constraints`` and checked when a suite is planned.
Deviations: none in the scoring. The backbone is :class:`fsad_bench.components.backbone.FeatureExtractor`
(:func:`build_backbone`: PatchCore's default taps, torch's default memory layout), so taps are module
names of the torchvision model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsad_bench.adapter import Adapter, Interval, ListOf, OneOf
from fsad_bench.components.augment import augment_support
from fsad_bench.components.backbone import FeatureExtractor, state_hash
from fsad_bench.components.feature_cache import CachedBackbone
from fsad_bench.components.maps import concat_pyramid, gaussian_blur
from fsad_bench.errors import FsadError

#: PatchCore's default taps per architecture (mid-level: stride 8 and 16).
PATCHCORE_TAPS: dict[str, list[str]] = {
    "wide_resnet50_2": ["layer2", "layer3"],
    "resnet18": ["layer2", "layer3"],
    "resnet50": ["layer2", "layer3"],
    "mobilenet_v2": ["features.6", "features.13"],
    "alexnet": ["features.5", "features.12"],
}


def build_backbone(arch: str, weights: str, taps: list[str] | None = None) -> FeatureExtractor:
    """Frozen feature extractor for PatchCore: images ``(B, 3, H, W)`` in [0, 1] -> the tap maps
    ``(B, C_i, H_i, W_i)`` (ImageNet normalisation inside; default taps :data:`PATCHCORE_TAPS`),
    in torch's default memory layout (channels-last convolutions differ in the last bits)."""
    if taps is None:
        if arch not in PATCHCORE_TAPS:
            raise FsadError(
                f"patchcore: no default taps for arch {arch!r}; pass the taps option "
                f"(known: {', '.join(PATCHCORE_TAPS)})"
            )
        taps = PATCHCORE_TAPS[arch]
    return FeatureExtractor(arch, weights, taps, channels_last=False)


def greedy_coreset(
    features: torch.Tensor, n: int, dim: int = 128, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of ``n`` rows of ``features`` ``(M, C)`` chosen by k-center greedy (each step adds
    the row farthest from the chosen set), on a Gaussian random projection to ``dim``
    dimensions; the start row is drawn with ``generator``. Returns a LongTensor ``(n,)``."""
    m = features.shape[0]
    if n >= m:
        return torch.arange(m)
    x = features
    if dim and features.shape[1] > dim:
        proj = torch.randn(features.shape[1], dim, generator=generator).to(features) / dim**0.5
        x = features @ proj
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = int(torch.randint(m, (1,), generator=generator))
    dist = (x - x[chosen[0]]).square().sum(1)
    for i in range(1, n):
        chosen[i] = int(torch.argmax(dist))
        dist = torch.minimum(dist, (x - x[chosen[i]]).square().sum(1))
    return chosen


def nearest(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest rows of ``bank`` ``(M, C)`` for ``queries`` ``(Q, C)``: distances and
    indices ``(Q, k)``, ascending. Chunked over queries (``chunk × M`` floats at a time).
    Both sides are centred on the bank's mean first (distances are unchanged, the
    ``‖x‖² + ‖y‖² − 2 x·y`` cancellation is smaller), and the returned distances are
    recomputed from the difference vectors."""
    centre = bank.mean(0)
    centred = bank - centre
    bank_sq = centred.square().sum(1)
    dists, idxs = [], []
    for s in range(0, len(queries), chunk):
        q = queries[s : s + chunk]
        qc = q - centre
        d2 = torch.addmm(bank_sq[None, :], qc, centred.T, alpha=-2.0) + qc.square().sum(1, keepdim=True)
        idx = torch.topk(d2, k, dim=1, largest=False).indices
        exact = (q[:, None, :] - bank[idx]).norm(dim=2)  # recomputed: no cancellation error
        exact, order = exact.sort(dim=1)
        dists.append(exact)
        idxs.append(idx.gather(1, order))
    return torch.cat(dists), torch.cat(idxs)


def reweighted_score(
    patch_scores: torch.Tensor, nn_index: torch.Tensor, embedding: torch.Tensor, bank: torch.Tensor, b: int
) -> torch.Tensor:
    """Paper Eq. 7 per image: ``patch_scores`` / ``nn_index`` ``(B, P)``, ``embedding``
    ``(B, P, C)`` -> image scores ``(B,)``; ``b = 1``: the maximum patch score."""
    if b <= 1:
        return patch_scores.amax(1)
    rows = torch.arange(len(patch_scores))
    star = patch_scores.argmax(1)  # m^test,*
    s_star = patch_scores[rows, star]  # s*
    m_test = embedding[rows, star]  # (B, C)
    m_hat = bank[nn_index[rows, star]]  # m^* (B, C)
    _, support = nearest(m_hat, bank, k=min(b, len(bank)))  # N_b(m^*), m^* itself first
    d = (m_test[:, None, :] - bank[support]).norm(dim=2)  # (B, b)
    weight = 1 - torch.softmax(d, dim=1)[:, 0]
    return weight * s_star


class PatchCore(Adapter):
    """PatchCore memory bank on the support patches (see the module docstring)."""

    name = "patchcore"
    protocol = "training-free"
    paper = "PatchCore (Roth et al., CVPR 2022)"
    bookkeeping_options = frozenset({"batch_size", "chunk"})
    presets = {
        "cpu": {
            "arch": "wide_resnet50_2",
            "taps": None,
            "patch_size": 3,
            "coreset_ratio": 1.0,
            "coreset_dim": 128,
            "num_neighbors": 9,
            "augment": False,
            "upsample": "bilinear",
            "sigma": 4.0,
            "knn": "torch",
            "batch_size": 16,
            "chunk": 4096,
        },
    }
    presets["paper"] = dict(presets["cpu"])
    option_constraints = {
        "arch": [str],  # a torchvision classifier (checked when built)
        "taps": [None, ListOf(str)],  # module names, in forward order; None: PATCHCORE_TAPS[arch]
        "patch_size": [Interval(int, 1)],
        "coreset_ratio": [Interval(float, 0, 1, closed="right")],
        "coreset_dim": [Interval(int, 0)],  # 0: no random projection
        "num_neighbors": [Interval(int, 1)],
        "augment": [bool],
        "upsample": [OneOf("bilinear", "nearest")],
        "sigma": [Interval(float, 0)],  # 0: no smoothing
        "knn": [OneOf("torch", "faiss")],
        "batch_size": [Interval(int, 1)],
        "chunk": [Interval(int, 1)],
    }

    def __init__(self, config=None):
        super().__init__(config)
        h = self.hparams
        self.backbone = build_backbone(h["arch"], self.config.weights, h["taps"]).to(self.device)
        self.weights_tag = self.backbone.weights_tag
        self.cached = CachedBackbone(
            self.backbone,
            f"patchcore-{h['arch']}-{'+'.join(self.backbone.taps)}-{state_hash(self.backbone)}",
            disk=self.config.feature_cache,
        )
        self.pool = nn.AvgPool2d(h["patch_size"], 1, h["patch_size"] // 2)
        self.bank: torch.Tensor | None = None
        self._faiss = None

    @torch.no_grad()
    def embed(self, images: torch.Tensor, cache: bool = False) -> torch.Tensor:
        """Locally aware patch features ``(N, C, h, w)`` of images ``(N, 3, S, S)``."""
        bs = self.hparams["batch_size"]
        net = self.cached if cache else self.backbone
        out = []
        for i in range(0, len(images), bs):
            taps = net(images[i : i + bs].to(self.device))
            out.append(concat_pyramid([self.pool(t.float()) for t in taps]))
        return torch.cat(out)

    @torch.no_grad()
    def adapt(self, support: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(self.config.seed)
        if self.hparams["augment"]:
            support = augment_support(support, generator=g)
        emb = self.embed(support)
        bank = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).contiguous()
        n = max(1, int(len(bank) * float(self.hparams["coreset_ratio"])))
        if n < len(bank):
            bank = bank[greedy_coreset(bank, n, self.hparams["coreset_dim"], g).to(bank.device)]
        self.bank = bank
        self._faiss = None
        if self.hparams["knn"] == "faiss":
            try:
                import faiss
            except ImportError:
                raise FsadError("patchcore knn = 'faiss' needs faiss: pip install faiss-cpu") from None
            self._faiss = faiss.IndexFlatL2(bank.shape[1])
            self._faiss.add(bank.cpu().numpy())

    def _nearest(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._faiss is not None:
            d2, idx = self._faiss.search(q.cpu().numpy(), 1)
            return torch.from_numpy(d2).clamp_min(0).sqrt().to(q), torch.from_numpy(idx).to(q.device)
        return nearest(q, self.bank, 1, self.hparams["chunk"])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bank is None:
            raise RuntimeError("PatchCore.adapt must be called first")
        emb = self.embed(images, cache=True)
        b, c, h, w = emb.shape
        flat = emb.permute(0, 2, 3, 1).reshape(b, h * w, c)
        dist, idx = self._nearest(flat.reshape(-1, c))
        patch = dist[:, 0].reshape(b, h * w)
        scores = reweighted_score(patch, idx[:, 0].reshape(b, h * w), flat, self.bank, self.hparams["num_neighbors"])
        size = images.shape[-1]
        mode = self.hparams["upsample"]
        up = F.interpolate(
            patch.reshape(b, 1, h, w),
            size=(size, size),
            mode=mode,
            **({"align_corners": False} if mode == "bilinear" else {}),
        )
        maps = gaussian_blur(up, self.hparams["sigma"])[:, 0] if self.hparams["sigma"] > 0 else up[:, 0]
        return scores.cpu(), maps.cpu()

    def state_dict(self):  # nothing is trained
        return {}
