"""InCTRL's training on labelled auxiliary data: the pool of (optionally cached) CLIP features,
CutPaste-like anomaly synthesis for categories without labelled anomalies, and the loop.

Every random choice (categories, queries, prompts, synthetic anomalies) is drawn from one
``torch.Generator`` owned by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from fsad_bench.errors import FsadError
from fsad_bench.methods.inctrl.torch_model import focal_loss

#: ``images (N, 3, S, S) -> (class embeddings (N, D), patch tokens (N, L, P, W))`` on the training device.
Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: A batch from :meth:`TrainingPool.sample`: query cls ``(B, D)``, query patches ``(B, L, P, W)``,
#: prompt cls ``(B, K, D)``, prompt patches ``(B, L, K·P, W)``, categories (B names), labels ``(B,)``.
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str], torch.Tensor]


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
    """A pseudo-anomaly of ``image`` ``(3, S, S)`` in [0, 1]: a random ``h × w`` rectangle (each side
    10-30 % of S) copied to a random place, its channels scaled by gains in [0.6, 1.4] (clamped to
    [0, 1]); the input is not modified."""
    s = image.shape[-1]
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=generator))  # noqa: E731
    h, w = r(max(1, s // 10), max(1, 3 * s // 10)), r(max(1, s // 10), max(1, 3 * s // 10))
    y0, x0, y1, x1 = r(0, s - h), r(0, s - w), r(0, s - h), r(0, s - w)
    out = image.clone()
    patch = image[:, y0 : y0 + h, x0 : x0 + w]
    gain = 0.6 + 0.8 * torch.rand(3, 1, 1, generator=generator)
    out[:, y1 : y1 + h, x1 : x1 + w] = (patch * gain).clamp(0, 1)
    return out


class TrainingPool:
    """Per-category normal / anomalous items of ``train`` (category -> Dataset of ``(image, label)`` or
    of plain images, all normal), sampled into balanced batches with ``generator``.

    ``encode`` computes CLIP features (see :data:`Encoder`). When no category needs synthesised
    anomalies and every image's features (``bytes_per_image``) fit in ``cache_mb`` MiB, they are
    encoded once here and reused; otherwise every batch is encoded afresh.
    """

    def __init__(
        self,
        train: Mapping[str, torch.utils.data.Dataset],
        encode: Encoder,
        generator: torch.Generator,
        bytes_per_image: int,
        cache_mb: float,
        device: torch.device | str = "cpu",
    ):
        self.encode, self.g, self.device = encode, generator, device
        self.cats = []
        for c, ds in train.items():
            normal, anomalous = _items(ds)
            if len(normal) < 1:
                continue
            self.cats.append((c, ds, normal, anomalous))
        if not self.cats:
            raise FsadError("inctrl.fit got no normal training images")
        self.synthesise = any(not a for _, _, _, a in self.cats)
        total = sum(len(ds) for _, ds, _, _ in self.cats)
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        if not self.synthesise and total * bytes_per_image <= cache_mb * 2**20:
            self.cache = {}
            for ci, (_, ds, _, _) in enumerate(self.cats):
                imgs = torch.stack([_image_of(ds, i) for i in range(len(ds))])
                cls, patches = encode(imgs)
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
        return self.encode(imgs)

    def sample(self, n_normal: int, n_anomalous: int, shots: int) -> Batch:
        """A balanced batch of ``n_normal`` then ``n_anomalous`` queries, each with ``shots`` normal prompts
        of its own category (see :data:`Batch`)."""
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
        dev = self.device
        return (
            torch.stack(q_cls).to(dev),
            torch.stack(q_patch).to(dev),
            torch.stack(p_cls).to(dev),
            torch.stack(p_patch).to(dev),
            cats,
            torch.tensor(labels, device=dev),
        )


def train_head(
    head: nn.Module,
    pool: TrainingPool,
    score: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: int,
    steps_per_epoch: int,
    batch_size: int,
    shots: int,
    lr: float,
    weight_decay: float,
    focal_gamma: float,
    as_logits: bool,
) -> None:
    """AdamW (betas 0.9, 0.999) on ``head`` for ``epochs × steps_per_epoch`` batches of ``batch_size``
    (half normal, half anomalous) from ``pool``; ``score(batch)`` returns the (final, image-residual)
    scores ``(B,)``; loss = focal loss of both. Leaves ``head`` in eval mode."""
    opt = torch.optim.AdamW(list(head.parameters()), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    head.train()
    n_norm = batch_size // 2
    n_anom = batch_size - n_norm
    for _ in range(epochs * steps_per_epoch):
        batch = pool.sample(n_norm, n_anom, shots)
        final, image_score = score(batch)
        y = batch[5]
        loss = focal_loss(final, y, focal_gamma, as_logits=as_logits) + focal_loss(
            image_score, y, focal_gamma, as_logits=as_logits
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
