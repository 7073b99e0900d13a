"""The ``diffnet`` / ``diffnet+`` adapters: presets, declared options, fit / adapt / predict.

``diffnet`` trains DifferNet's flow from scratch on the support set (individual protocol);
``diffnet+`` pre-trains it on the other categories and fine-tunes a copy on the support set
(aggregated). Paper facts and deviations: ``README.md``.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from torch.utils.data import ConcatDataset, Dataset

from fsad_bench.adapter import Adapter, Interval, ListOf, OneOf, TrainSet
from fsad_bench.data.torch_datasets import TensorImages
from fsad_bench.errors import FsadError
from fsad_bench.methods.diffnet.torch_model import (
    ALEXNET_MIN_SIZE,
    AlexNetMultiScale,
    DifferNetViews,
    build_flow,
    official_grad_maps,
    score_views,
    view_scores,
)
from fsad_bench.methods.diffnet.training import train_flow

_POSITIVE = Interval(float, 0, None, closed="neither")
_JITTER = Interval(float, 0, 1)
#: View and map options of the official code (``paper``); the ``cpu`` preset keeps the cheaper
#: alternatives (bilinear differentiable rotation, views shared by every image, one pass for scores
#: and maps); a ``paper`` run with another value is labelled ``key=value``.
OFFICIAL_VIEWS = {"rotate_filter": "nearest", "test_views": "per-image", "grad_map": "official"}
CHEAP_VIEWS = {"rotate_filter": "bilinear", "test_views": "shared", "grad_map": "summed"}


class DiffNet(Adapter):
    """DifferNet trained from scratch on the support set (individual protocol)."""

    name = "diffnet"
    protocol = "individual"
    paper = "DifferNet (Rudolph et al., WACV 2021)"
    bookkeeping_options = frozenset({"view_chunk"})
    presets: dict[str, dict[str, Any]] = {
        "paper": {
            "arch": "alexnet",
            "img_size": 448,
            "n_scales": 3,
            "n_coupling_blocks": 8,
            "fc_internal": 2048,
            "clamp_alpha": 3.0,
            "dropout": 0.0,
            "lr": 2e-4,
            "betas": (0.8, 0.8),
            "eps": 1e-4,
            "weight_decay": 1e-5,
            "meta_epochs": 24,
            "sub_epochs": 8,
            "batch_size": 24,
            "n_transforms": 4,
            "n_transforms_test": 64,
            "rotation": 180.0,
            "brightness": 0.0,
            "contrast": 0.0,
            "saturation": 0.0,
            "feature_pool": 0,
            "grad_sigma": 3.0,
            "view_chunk": 64,
            **OFFICIAL_VIEWS,
        },
        "cpu": {
            "arch": "alexnet",
            "img_size": 128,
            "n_scales": 2,
            "n_coupling_blocks": 4,
            "fc_internal": 256,
            "clamp_alpha": 3.0,
            "dropout": 0.0,
            "lr": 1e-3,
            "betas": (0.8, 0.8),
            "eps": 1e-4,
            "weight_decay": 1e-5,
            "meta_epochs": 24,  # the paper's: calibrated on real data (docs/budgets.md; 4 and 16 fell 1-15 points below)
            "sub_epochs": 8,
            "batch_size": 24,
            "n_transforms": 4,
            "n_transforms_test": 8,
            "rotation": 180.0,
            "brightness": 0.0,
            "contrast": 0.0,
            "saturation": 0.0,
            "feature_pool": 16,
            "grad_sigma": 3.0,
            "view_chunk": 64,
            **CHEAP_VIEWS,
        },
    }
    option_constraints = {
        "arch": [str],
        "img_size": [Interval(int, 1)],
        "n_scales": [Interval(int, 1)],
        "n_coupling_blocks": [Interval(int, 1)],
        "fc_internal": [Interval(int, 1)],
        "clamp_alpha": [_POSITIVE],
        "dropout": [Interval(float, 0, 1, closed="left")],
        "lr": [_POSITIVE],
        "betas": [ListOf(Interval(float, 0, 1, closed="left"), min_len=2, max_len=2)],
        "eps": [_POSITIVE],
        "weight_decay": [Interval(float, 0, None)],
        "meta_epochs": [Interval(int, 1)],
        "sub_epochs": [Interval(int, 1)],
        "batch_size": [Interval(int, 1)],
        "n_transforms": [Interval(int, 1)],
        "n_transforms_test": [Interval(int, 1)],
        "rotation": [Interval(float, 0, 180)],
        "brightness": [_JITTER],
        "contrast": [_JITTER],
        "saturation": [_JITTER],
        "feature_pool": [Interval(int, 0)],
        "grad_sigma": [Interval(float, 0, None)],
        "view_chunk": [Interval(int, 1)],
        # "nearest": PIL nearest on the 8-bit image (official, train and test views); "bilinear": grid_sample
        "rotate_filter": [OneOf("nearest", "bilinear")],
        # test views: "per-image" random angles (official) or "shared" by every image
        "test_views": [OneOf("per-image", "shared")],
        # "official": gradient of the mean loss w.r.t. the normalised fixed-angle views, rotated back (scipy
        # cubic spline), blurred (scipy, reflect); "summed": gradient of the summed NLL w.r.t. the image
        "grad_map": [OneOf("official", "summed")],
    }

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        """AlexNet needs its smallest scale, ``img_size // 2**(n_scales - 1)`` px, to be at least 63 px."""
        hp = hparams
        if hp["arch"] == "alexnet" and hp["img_size"] // 2 ** (hp["n_scales"] - 1) < ALEXNET_MIN_SIZE:
            raise FsadError(
                f"{cls.name}: img_size {hp['img_size']} with {hp['n_scales']} scales gives a smallest "
                f"scale below AlexNet's minimum input of {ALEXNET_MIN_SIZE} px "
                f"(valid: img_size // 2**(n_scales - 1) >= {ALEXNET_MIN_SIZE})"
            )

    def __init__(self, config=None):
        super().__init__(config)
        hp = self.hparams
        self.extractor = AlexNetMultiScale(self.config.weights, hp["n_scales"], hp["arch"]).to(self.device)
        self.weights_tag = self.extractor.weights_tag
        self.flow = self.new_flow()
        self.views = DifferNetViews(
            hp["img_size"], hp["rotation"], hp["brightness"], hp["contrast"], hp["saturation"], hp["rotate_filter"]
        )
        self._trained = False

    @property
    def input_size(self) -> int:
        """Images are wanted at ``img_size`` px (DifferNet resizes the original photo to it)."""
        return int(self.hparams["img_size"])

    def new_flow(self) -> SequenceINN:
        """A freshly initialised flow (subnet weights from torch's global RNG)."""
        hp = self.hparams
        return build_flow(
            self.extractor.n_feat, hp["n_coupling_blocks"], hp["fc_internal"], hp["clamp_alpha"], hp["dropout"]
        ).to(self.device)

    # -- training -------------------------------------------------------------------------
    def train_flow(self, flow: SequenceINN, data: Dataset, epochs: int, generator: torch.Generator) -> list[float]:
        """:func:`~fsad_bench.methods.diffnet.training.train_flow` with this adapter's options."""
        hp = self.hparams
        return train_flow(
            flow,
            self.extractor,
            self.views,
            data,
            epochs=epochs,
            lr=hp["lr"],
            betas=tuple(hp["betas"]),
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
            n_transforms=hp["n_transforms"],
            batch_size=hp["batch_size"],
            pool_views=hp["feature_pool"],
            view_chunk=hp["view_chunk"],
            generator=generator,
            device=self.device,
        )

    @property
    def epochs(self) -> int:
        return self.hparams["meta_epochs"] * self.hparams["sub_epochs"]

    def _generator(self, tag: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1000 + tag)

    def fit(self, train: TrainSet) -> None:
        """Train a fresh flow on the images of ``train`` (individual protocol: the support set)."""
        if self._trained:  # fit again = from scratch again
            torch.manual_seed(self.config.seed)
            self.flow = self.new_flow()
        self.loss_history = self.train_flow(
            self.flow, ConcatDataset(list(train.values())), self.epochs, self._generator(1)
        )
        self._trained = True

    def adapt(self, support: torch.Tensor) -> None:
        """Nothing left to do after ``fit``; trains on ``support`` when ``fit`` was skipped."""
        if not self._trained:
            self.fit({"support": TensorImages(support.cpu())})

    # -- scoring --------------------------------------------------------------------------
    @property
    def scoring_flow(self) -> SequenceINN:
        return self.flow

    def test_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n_transforms_test`` random views of the scores: ``test_views = "shared"``: angles ``(T,)`` and
        factors ``(T, 3)`` drawn once from ``seed`` for every image; ``"per-image"`` (official: each image its
        own random transforms): ``(N, T)`` and ``(N, T, 3)``, image i's from a generator seeded by (``seed``,
        the image's pixels), so a score depends neither on the batch nor on the order of the images."""
        n_views = self.hparams["n_transforms_test"]
        if self.hparams["test_views"] == "shared":
            return self.views.sample(n_views, self._generator(2))
        draws = []
        for image in images:
            digest = hashlib.sha256(image.detach().cpu().contiguous().numpy().tobytes()).digest()
            seed = (self.config.seed * 1000 + 2) ^ int.from_bytes(digest[:7], "little")
            draws.append(self.views.sample(n_views, torch.Generator().manual_seed(seed)))
        return torch.stack([a for a, _ in draws]), torch.stack([f for _, f in draws])

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(N,)`` = mean z² over ``n_transforms_test`` random views (:meth:`test_views`); maps
        ``(N, S, S)``: ``grad_map = "official"``: :func:`~fsad_bench.methods.diffnet.torch_model.official_grad_maps`
        (T fixed rotations, a second pass); ``"summed"``: squared mean |∂ΣNLL/∂image| over channels and the
        score views, each Gaussian-smoothed (one pass)."""
        hp = self.hparams
        flow = self.scoring_flow.eval()
        n_views = hp["n_transforms_test"]
        angles, factors = self.test_views(images)
        shared = angles.dim() == 1
        size = images.shape[-1]
        sigma = hp["grad_sigma"] * size / hp["img_size"]
        per_chunk = max(1, hp["view_chunk"] // n_views)
        scores, maps = [], []
        for i in range(0, len(images), per_chunk):
            x = images[i : i + per_chunk].to(self.device)
            a, f = (angles, factors) if shared else (angles[i : i + per_chunk], factors[i : i + per_chunk])
            if hp["grad_map"] == "summed":
                s, m = score_views(flow, self.extractor, self.views, x, a, f, sigma)
            else:
                s = view_scores(flow, self.extractor, self.views, x, a, f)
                m = official_grad_maps(flow, self.extractor, self.views, x, n_views, hp["grad_sigma"])
                if m.shape[-1] != size:  # maps at the view size (img_size) -> the given images' size
                    m = F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            scores.append(s.cpu())
            maps.append(m.cpu())
        return torch.cat(scores), torch.cat(maps)

    def state_dict(self) -> dict[str, Any]:
        """Only the flow is trained (the AlexNet is frozen)."""
        return {"flow": self.flow.state_dict()}


class DiffNetPlus(DiffNet):
    """DifferNet pre-trained on all other categories, fine-tuned on the support set (aggregated)."""

    name = "diffnet+"
    protocol = "aggregated"
    paper = "DiffNet+ baseline of RegAD (Huang et al., ECCV 2022), after DifferNet (Rudolph et al., WACV 2021)"
    presets = {
        "paper": {**DiffNet.presets["paper"], "finetune_epochs": 192},
        "cpu": {**DiffNet.presets["cpu"], "meta_epochs": 3, "sub_epochs": 8, "feature_pool": 8, "finetune_epochs": 48},
    }
    option_constraints = {**DiffNet.option_constraints, "finetune_epochs": [Interval(int, 0)]}
    adapt_only_options = frozenset({"finetune_epochs"})
    adapt_trains = True  # finetune_epochs of the flow on the support set

    def __init__(self, config=None):
        super().__init__(config)
        self.adapted: SequenceINN | None = None

    def fit(self, train: TrainSet) -> None:
        """Pre-train the flow on the normal images of every category in ``train``."""
        super().fit(train)

    def adapt(self, support: torch.Tensor) -> None:
        """Fine-tune a copy of the pre-trained flow on ``support`` ``(K, 3, S, S)``; the
        pre-trained flow itself is never changed, so every adaptation starts from it."""
        self.adapted = copy.deepcopy(self.flow)
        self.loss_history = self.train_flow(
            self.adapted, TensorImages(support.cpu()), self.hparams["finetune_epochs"], self._generator(3)
        )

    @property
    def scoring_flow(self) -> SequenceINN:
        return self.adapted if self.adapted is not None else self.flow
