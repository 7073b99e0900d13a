"""The ``regad`` / ``regad-l`` adapters: presets, declared options, fit / adapt / predict.

Training is :func:`~fsad_bench.methods.regad.training.train_registration`; the test pipeline
(22-view support augmentation, per-position Gaussian on the STN outputs warped back to the
image, Mahalanobis map, blur, max) lives here. Paper facts and deviations: ``README.md``.
"""

from __future__ import annotations

import torch

from fsad_bench.adapter import Adapter, Interval, OneOf, TrainSet
from fsad_bench.components.affine import N_PARAMS, affine_warp, compose_affine, invert_affine
from fsad_bench.components.augment import augment_support
from fsad_bench.components.maps import ScratchBuffer, concat_pyramid, pyramid_samples, smooth_maps
from fsad_bench.components.position_gaussian import PositionGaussian
from fsad_bench.errors import FsadError
from fsad_bench.methods.regad.torch_model import Predictor, RegistrationNet, SiameseEncoder, to_image_frame
from fsad_bench.methods.regad.training import train_registration

#: Test-pipeline option values of the official code (others are labelled in tables).
OFFICIAL_TEST = {"feature_frame": "image", "concat_upsample": "nearest", "blur_border": "symmetric"}

_POSITIVE = Interval(float, 0, None, closed="neither")


class RegAD(Adapter):
    """RegAD: STN-registered ResNet-18 features trained by SimSiam on pairs of normal images
    of the training categories; per-position Gaussian on the STN outputs warped back to the image."""

    name = "regad"
    protocol = "aggregated"
    paper = "Huang et al., Registration based Few-Shot Anomaly Detection, ECCV 2022"
    bookkeeping_options = frozenset({"infer_batch"})
    labelled_options = frozenset(OFFICIAL_TEST)
    _common = {
        "arch": "resnet18",
        "stn_mode": "rotation_scale",
        "train_shot": "k",
        "momentum": 0.9,
        "imagenet_norm": False,
        **OFFICIAL_TEST,
        "eps": 0.01,
        "sigma": 4.0,
        "infer_batch": 32,
    }
    presets = {
        # official train.py: SGD(0.9), lr 1e-4, 50 epochs, 32 queries/step, per-epoch cosine; one model per
        # shot (`--shot k`: k supports per query); images resized with PIL's ANTIALIAS (= LANCZOS)
        "paper": {
            **_common,
            "epochs": 50,
            "batch_size": 32,
            "lr": 1e-4,
            "lr_schedule": "epoch-cosine",
            "max_queries_per_category": None,
            "resize": "lanczos",
        },
        # 2-core budget (128 px): 10 epochs of <= 24 queries per category (calibrated on real data,
        # docs/budgets.md: within 1 point of 25 epochs on bottle and magnetic tile), 8 queries x 1 support
        # per step, one fit for every k, 10x the paper's lr (1e-2 hurt pixel AUROC), per-step cosine,
        # bilinear resize
        "cpu": {
            **_common,
            "train_shot": 1,
            "epochs": 10,
            "batch_size": 8,
            "lr": 1e-3,
            "lr_schedule": "step-cosine",
            "max_queries_per_category": 24,
            "resize": "bilinear",
        },
    }
    option_constraints = {
        "arch": [str],
        "stn_mode": [OneOf(*N_PARAMS)],
        # "k": one fit per shot with k supports per query (official); an integer: one fit shared by every k
        "train_shot": [OneOf("k"), Interval(int, 1)],
        "resize": [OneOf("lanczos", "bilinear")],
        "momentum": [Interval(float, 0, 1, closed="left")],
        "imagenet_norm": [bool],
        "feature_frame": [OneOf("image", "registered")],
        "concat_upsample": [OneOf("nearest", "bilinear")],
        "blur_border": [OneOf("symmetric", "reflect")],
        "eps": [_POSITIVE],
        "sigma": [Interval(float, 0, None)],
        "infer_batch": [Interval(int, 1)],
        "epochs": [Interval(int, 1)],
        "batch_size": [Interval(int, 1)],
        "lr": [_POSITIVE],
        "lr_schedule": [OneOf("epoch-cosine", "step-cosine")],
        "max_queries_per_category": [None, Interval(int, 1)],
    }

    def __init__(self, config=None):
        super().__init__(config)
        hp = self.hparams
        self.model = (
            RegistrationNet(
                hp["arch"], self.config.weights, self.config.image_size, hp["stn_mode"], hp["imagenet_norm"]
            )
            .to(self.device)
            .eval()
        )
        self.weights_tag = self.model.weights_tag
        channels = self.model.channels[-1]
        self.encoder = SiameseEncoder(channels).to(self.device).eval()
        self.predictor = Predictor(channels).to(self.device).eval()
        self.gaussian = PositionGaussian(eps=hp["eps"])
        self.scratch = ScratchBuffer()  # centred test samples of one band (score_pyramid), reused
        #: mean SimSiam loss of each epoch of the last fit (diagnostics)
        self.loss_history: list[float] = []

    @classmethod
    def per_shot_fit(cls, hparams) -> bool:
        """``train_shot = "k"`` (``paper``): one fit per k, as the official ``train.py --shot k``."""
        return hparams.get("train_shot") == "k"

    @property
    def resize_filter(self) -> str:
        """``paper``: ``"lanczos"`` (official ``Resize(224, Image.ANTIALIAS)``); ``cpu``: ``"bilinear"``."""
        return str(self.hparams.get("resize", "bilinear"))

    def train_shot(self, train: TrainSet) -> int:
        """Supports per training query: ``train_shot``, or for ``"k"`` the run layer's :attr:`fit_shot`."""
        shot = self.hparams["train_shot"]
        if shot != "k":
            return int(shot)
        if self.fit_shot is None:
            raise FsadError(
                f"{self.name}: train_shot = 'k' trains one model per shot, but fit() was not told "
                f"k (set adapter.fit_shot, as the run layer does, or set train_shot to an integer)"
            )
        return int(self.fit_shot)

    # -- training -------------------------------------------------------------------------
    def fit(self, train: TrainSet) -> None:
        """SimSiam registration training on ``train`` (category -> images ``(3, S, S)``) with
        :meth:`train_shot` supports per query."""
        hp = self.hparams
        self.loss_history = train_registration(
            self.model,
            self.encoder,
            self.predictor,
            train,
            epochs=hp["epochs"],
            batch_size=hp["batch_size"],
            shot=self.train_shot(train),
            lr=hp["lr"],
            momentum=hp["momentum"],
            lr_schedule=hp["lr_schedule"],
            max_queries=hp["max_queries_per_category"],
            generator=torch.Generator().manual_seed(self.config.seed),
            device=self.device,
        )

    # -- test time ------------------------------------------------------------------------
    @torch.no_grad()
    def _pyramids(self, images: torch.Tensor):
        """Per batch of ``infer_batch`` images: the three maps in the test frame (image frame or
        registered frame, see ``feature_frame``) and ``θ_1 θ_2 θ_3`` ``(B, 2, 3)`` (registered
        layer3 frame -> image). Yields ``(offset, maps, theta)``."""
        self.model.eval()
        bs = self.hparams["infer_batch"]
        for i in range(0, len(images), bs):
            maps, th = self.model(images[i : i + bs].to(self.device))
            if self.hparams["feature_frame"] == "image":  # official: each level back to the image first
                maps = to_image_frame(maps, th)
            yield i, maps, compose_affine(*th)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated maps ``(N, 448, S/4, S/4)`` and ``θ_1 θ_2 θ_3`` ``(N, 2, 3)``."""
        feats, thetas = [], []
        for _, maps, theta in self._pyramids(images):
            feats.append(concat_pyramid(maps, self.hparams["concat_upsample"]))
            thetas.append(theta)
        return torch.cat(feats), torch.cat(thetas)

    @torch.no_grad()
    def samples(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """:meth:`features` written once per batch straight into the position-major buffer
        ``(S/4 · S/4, N, 448)`` the Gaussian fits; returns (buffer, grid)."""
        buf, grid = None, None
        for i, maps, _ in self._pyramids(images):
            if buf is None:
                grid = tuple(maps[0].shape[-2:])
                shape = (grid[0] * grid[1], len(images), sum(m.shape[1] for m in maps))
                buf = torch.empty(shape, dtype=maps[0].dtype, device=maps[0].device)
            pyramid_samples(maps, self.hparams["concat_upsample"], out=buf, offset=i)
        return buf, grid

    def adapt(self, support: torch.Tensor) -> None:
        """Fit the per-position Gaussian on the 22 augmented views of each support image ``(K, 3, S, S)``."""
        g = torch.Generator().manual_seed(self.config.seed)
        self.gaussian.fit_samples(*self.samples(augment_support(support, generator=g)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(N,)`` = max of the maps ``(N, S, S)`` (blurred Mahalanobis distance, image frame)."""
        dists, thetas = [], []
        for _, maps, theta in self._pyramids(images):  # layout fused into the scoring, band by band
            dists.append(self.gaussian.score_pyramid(maps, self.hparams["concat_upsample"], self.scratch))
            thetas.append(theta)
        dist, theta = torch.cat(dists), torch.cat(thetas)  # (N, S/4, S/4), (N, 2, 3)
        if self.hparams["feature_frame"] == "registered":  # map to image coordinates: sample at (θ1θ2θ3)⁻¹ q
            dist = affine_warp(dist[:, None], invert_affine(theta))[:, 0]
        maps = smooth_maps(dist, images.shape[-1], self.hparams["sigma"], self.hparams["blur_border"]).cpu()
        return maps.flatten(1).max(dim=1).values, maps

    def label_tags(self) -> list[str]:
        """``key=value`` for every test-pipeline option set to a non-official value."""
        return [f"{k.split('_')[-1]}={self.hparams[k]}" for k, v in OFFICIAL_TEST.items() if self.hparams[k] != v]


class RegADL(RegAD):
    """RegAD trained on the target category's k support images only (individual protocol).

    ``paper``: RegAD's official training hyper-parameters applied to the support set (the
    official repository has no RegAD-L script); pairs are formed among the k support images,
    with k = 1 the support view is a randomly rotated / shifted copy of the query;
    ``train_shot = "k"``: k supports per query (the fit is per cell anyway).
    """

    name = "regad-l"
    protocol = "individual"
    presets = {
        "paper": dict(RegAD.presets["paper"]),
        # ≤ ~5 s fit + adapt at 128 px (k ≤ 4): 4 steps, each query with 1 support
        "cpu": {**RegAD.presets["cpu"], "epochs": 4, "max_queries_per_category": None},
    }

    def train_shot(self, train: TrainSet) -> int:
        """``"k"``: the number of support images trained on (the individual protocol's k)."""
        if self.hparams["train_shot"] == "k" and self.fit_shot is None:
            return max(1, sum(len(ds) for ds in train.values()))
        return super().train_shot(train)
