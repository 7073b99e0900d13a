"""RegAD's training: query / support batches and the SimSiam registration loop (official ``train.py``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from fsad_bench.components.affine import affine_warp, random_small_affine
from fsad_bench.methods.regad.torch_model import Predictor, RegistrationNet, SiameseEncoder, simsiam_loss


@dataclass(frozen=True)
class TrainBatch:
    """One optimisation step: ``queries`` (B indices) of ``category``, ``supports`` (B lists of K indices)."""

    category: str
    queries: list[int]
    supports: list[list[int]]


def training_batches(
    sizes: Mapping[str, int], batch_size: int, shot: int, generator: torch.Generator, max_queries: int | None = None
) -> list[TrainBatch]:
    """One epoch of RegAD training steps over categories with ``sizes[c]`` images each.

    Every image (or the first ``max_queries`` of a random permutation) is a query once; the
    queries of a category are chunked into batches of ``batch_size``; each query gets ``shot``
    supports drawn uniformly, with replacement, among the *other* images of its category (the
    query itself when the category has a single image). The batch order is shuffled.
    """
    batches = []
    for cat in sorted(sizes):
        n = sizes[cat]
        order = torch.randperm(n, generator=generator).tolist()[: max_queries or n]
        for s in range(0, len(order), batch_size):
            queries = order[s : s + batch_size]
            supports = []
            for q in queries:
                if n == 1:
                    supports.append([q] * shot)
                    continue
                draw = torch.randint(0, n - 1, (shot,), generator=generator).tolist()
                supports.append([d + (d >= q) for d in draw])  # skip the query's own index
            batches.append(TrainBatch(cat, queries, supports))
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


class ImageCache:
    """Memoises ``train[category][i]`` (``(3, S, S)`` images) up to ``budget_mb`` MiB, then reads lazily."""

    def __init__(self, train: Mapping[str, Dataset], budget_mb: float = 2048):
        self.train, self.budget, self.used, self.cache = train, budget_mb * 2**20, 0, {}

    def get(self, category: str, indices: list[int]) -> torch.Tensor:
        """Images ``indices`` of ``category`` as ``(len(indices), 3, S, S)``."""
        out = []
        for i in indices:
            img = self.cache.get((category, i))
            if img is None:
                img = torch.as_tensor(self.train[category][i])
                img = img if img.is_floating_point() else img.float()  # float64 stays float64 (parity runs)
                if self.used + img.nbytes <= self.budget:
                    self.cache[(category, i)] = img
                    self.used += img.nbytes
            out.append(img)
        return torch.stack(out)


def cosine_lr(lr: float, schedule: str, epoch: int, epochs: int, step: int, total: int) -> float:
    """Learning rate of a step: ``"epoch-cosine"`` (official ``adjust_learning_rate``, ``epoch`` = 1..E:
    ``lr·½(1 + cos(π epoch / epochs))``) or ``"step-cosine"`` (``lr·½(1 + cos(π step / total))``, step from 0)."""
    if schedule == "epoch-cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return lr * 0.5 * (1 + math.cos(math.pi * step / total))


def train_registration(
    model: RegistrationNet,
    encoder: SiameseEncoder,
    predictor: Predictor,
    train: Mapping[str, Dataset],
    *,
    epochs: int,
    batch_size: int,
    shot: int,
    lr: float,
    momentum: float,
    lr_schedule: str,
    max_queries: int | None,
    generator: torch.Generator,
    device: torch.device,
) -> list[float]:
    """SimSiam registration training of ``model``, ``encoder`` and ``predictor`` (all parameters, in
    train mode; left in eval mode) on ``train`` (category -> ``(3, S, S)`` images in [0, 1]).

    Per step: ``batch_size`` queries of one category, ``shot`` supports each
    (:func:`training_batches`; a category of one image registers a randomly moved copy of it);
    the encoder sees the registered last map of the query and the mean of its supports' maps.
    SGD with ``momentum``, learning rate by :func:`cosine_lr`. ``generator`` draws every batch
    plan (all epochs first) and then the random moves. Returns the mean loss of each epoch.
    """
    sizes = {c: len(ds) for c, ds in train.items() if len(ds) > 0}
    images = ImageCache(train)
    modules: tuple[nn.Module, ...] = (model, encoder, predictor)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    plans = [training_batches(sizes, batch_size, shot, generator, max_queries) for _ in range(epochs)]
    total, step = sum(len(p) for p in plans), 0
    for m in modules:
        m.train()
    history = []
    for epoch, batches in enumerate(plans, start=1):
        losses = []
        for batch in batches:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr, lr_schedule, epoch, epochs, step, total)
            query = images.get(batch.category, batch.queries).to(device)
            flat = [i for s in batch.supports for i in s]
            support = images.get(batch.category, flat).to(device)
            if sizes[batch.category] == 1:  # a lone image: register a randomly moved copy of it
                support = affine_warp(support, random_small_affine(len(flat), generator).to(support))
            b = query.shape[0]
            zq = encoder(model(query)[0][-1])
            feat_s = model(support)[0][-1]
            feat_s = feat_s.view(b, shot, *feat_s.shape[1:]).mean(dim=1)
            zs = encoder(feat_s)
            loss = simsiam_loss(predictor(zq), zq, predictor(zs), zs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        history.append(sum(losses) / max(len(losses), 1))
    for m in modules:
        m.eval()
    return history
