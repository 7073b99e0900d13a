"""DifferNet's training: features of random views (fresh or from a pre-extracted pool) and the
flow's NLL training loop (official ``train.py``)."""

from __future__ import annotations

import numpy as np
import torch
from FrEIA.framework import SequenceINN
from torch.utils.data import DataLoader, Dataset

from fsad_bench.methods.diffnet.torch_model import AlexNetMultiScale, DifferNetViews, nll_per_sample


@torch.no_grad()
def view_features(
    extractor: AlexNetMultiScale,
    views: DifferNetViews,
    images: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Features of one random view per image: ``(B, 3, S, S)`` -> ``(B, n_feat)``."""
    return extractor(views(images.to(device), generator))


@torch.no_grad()
def feature_pool(
    extractor: AlexNetMultiScale,
    views: DifferNetViews,
    data: Dataset,
    n_views: int,
    view_chunk: int,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Features of ``n_views`` random views of every image of ``data``: ``(N, n_views, n_feat)``,
    extracted ``view_chunk`` views at a time."""
    pool = []
    per_batch = max(1, view_chunk // n_views)
    for batch in DataLoader(data, batch_size=per_batch, shuffle=False):
        repeated = batch.repeat_interleave(n_views, dim=0)
        pool.append(view_features(extractor, views, repeated, generator, device).view(batch.shape[0], n_views, -1))
    return torch.cat(pool)


#: Adam's multi-tensor implementation: the same element-wise ops in the same order as the per-tensor loop,
#: bit-identical on CPU (test ``test_foreach_adam_is_bit_identical``), fewer Python-level ops per step
ADAM_FOREACH = True


def train_flow(
    flow: SequenceINN,
    extractor: AlexNetMultiScale,
    views: DifferNetViews,
    data: Dataset,
    *,
    epochs: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    n_transforms: int,
    batch_size: int,
    pool_views: int,
    view_chunk: int,
    generator: torch.Generator,
    device: torch.device,
) -> list[float]:
    """Train ``flow`` by DifferNet's NLL on augmented views of ``data`` (``(3, S, S)`` images in [0, 1]);
    returns the mean loss of each epoch and leaves ``flow`` in eval mode.

    Adam(``lr``, ``betas``, ``eps``, ``weight_decay``); each epoch shuffles ``data`` into batches of
    ``batch_size`` images, ``n_transforms`` views each. ``pool_views`` > 0: the views come from a pool
    of that many views per image extracted once (:func:`feature_pool`; each epoch draws
    ``n_transforms`` distinct pooled views per image); 0: fresh views every epoch.
    """
    params = [p for p in flow.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(
        params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=ADAM_FOREACH
    )
    n_t, bs = n_transforms, batch_size
    pool = feature_pool(extractor, views, data, pool_views, view_chunk, generator, device) if pool_views > 0 else None
    flow.train()
    history = []
    for _ in range(epochs):
        losses = []
        if pool is not None:  # draw n_transforms distinct pooled views per image
            order = torch.randperm(pool.shape[0], generator=generator)
            batches = []
            for i in range(0, len(order), bs):
                idx = order[i : i + bs]
                pick = torch.rand(len(idx), pool.shape[1], generator=generator).argsort(dim=1)[:, :n_t]
                batches.append(pool[idx[:, None], pick].flatten(0, 1))
        else:
            batches = (
                view_features(extractor, views, b.repeat_interleave(n_t, dim=0), generator, device)
                for b in DataLoader(data, batch_size=bs, shuffle=True, generator=generator)
            )
        for feats in batches:
            optimizer.zero_grad()
            loss = nll_per_sample(*flow(feats.to(device))).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
    flow.eval()
    return history
