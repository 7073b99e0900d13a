"""InCTRL's trainable parts and scores, in plain torch (CLIP features in, scores out; see README.md).

* :func:`patch_residuals`: nearest-prompt residual of every query patch, per layer;
* :class:`ResidualAdapter`, :class:`ScoreHead`, :class:`InCTRLHead`: the trained head
  (image-level residual adapter, image-residual and holistic score MLPs);
* :func:`inctrl_scores`: patch residuals + head -> final and image-residual scores;
* :func:`focal_loss`: the binary focal loss of the training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        super().__init__(
            nn.Linear(dim_in, 128),
            nn.ReLU(),
            nn.BatchNorm1d(128),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.BatchNorm1d(64),
            nn.Linear(64, 1),
            nn.Sigmoid(),
        )


class ResidualAdapter(nn.Sequential):
    """Bias-free bottleneck ``(…, D) -> (…, D)``: D -> D/4 -> D with ReLUs (image-level residual)."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(),
        )


class InCTRLHead(nn.Module):
    """The trainable part of InCTRL (CLIP stays frozen); ``embed_dim`` = D, ``num_patches`` = P.

    Inputs per query: patch residuals ``(B, P)`` (layer-averaged), query class embedding
    ``(B, D)``, prompt class embeddings ``(B, K, D)`` or ``(K, D)``, text score ``(B,)``.
    """

    def __init__(self, embed_dim: int, num_patches: int):
        super().__init__()
        self.adapter = ResidualAdapter(embed_dim)
        self.image_head = ScoreHead(embed_dim)
        self.holistic_head = ScoreHead(num_patches)

    def forward(
        self, patch_map: torch.Tensor, query_cls: torch.Tensor, prompt_cls: torch.Tensor, text_score: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (final score ``(B,)``, image-residual score ``(B,)``), both in [0, 1]."""
        prompt_mean = self.adapter(prompt_cls).mean(dim=-2)  # (B, D) or (D,)
        residual = prompt_mean - self.adapter(query_cls)
        image_score = self.image_head(residual)  # (B, 1)
        holistic = self.holistic_head(patch_map + image_score + text_score[:, None])[:, 0]
        final = 0.5 * (holistic + patch_map.max(dim=1).values)
        return final, image_score[:, 0]


def inctrl_scores(
    head: InCTRLHead,
    q_cls: torch.Tensor,
    q_patches: torch.Tensor,
    p_cls: torch.Tensor,
    p_patches: torch.Tensor,
    text_score: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of queries against their prompts: ``q_cls`` ``(B, D)``, ``q_patches`` ``(B, L, P, W)``;
    prompts shared (``p_cls`` ``(K, D)``, ``p_patches`` ``(L, K·P, W)``) or per query (``(B, K, D)``,
    ``(B, L, K·P, W)``); ``text_score`` ``(B,)``. Returns (final, image-residual) scores ``(B,)``."""
    patch_map = patch_residuals(q_patches, p_patches).mean(dim=1)  # (B, P)
    return head(patch_map, q_cls, p_cls, text_score)


def focal_loss(
    scores: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, alpha: float = 1.0, as_logits: bool = True
) -> torch.Tensor:
    """Binary focal loss of ``scores`` ``(B,)`` against ``labels`` ``(B,)`` (1 = anomalous), mean over the
    batch. ``as_logits`` treats ``scores`` as logits, as the official code does with its sigmoid outputs;
    otherwise they are probabilities."""
    if as_logits:
        bce = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")
    else:
        bce = F.binary_cross_entropy(scores.clamp(1e-6, 1 - 1e-6), labels, reduction="none")
    pt = torch.exp(-bce)
    return (alpha * (1 - pt) ** gamma * bce).mean()
