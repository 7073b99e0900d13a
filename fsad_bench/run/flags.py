"""Flags of degenerate cells: what makes a cell's numbers mean something other than they seem.

:func:`cell_flags` checks one cell's image scores ``(N,)`` and maps ``(N, S, S)`` and returns the
record fields ``flags`` (a sorted list of the names below; ``[]``: checked, nothing found) and
``chance_test`` (the permutation test's ``p``, ``n_permutations``, ``alpha``). Flags are reported,
never acted on: the metrics stay what :func:`fsad_bench.metrics.evaluate` computed, and tables mark
the flagged cells (:mod:`fsad_bench.report.flags_table`). Records written before flags existed have
no ``flags`` field: unchecked, not clean.

Names (image flags concern image metrics, map flags pixel metrics):

* ``nonfinite_scores`` / ``nonfinite_maps`` — a NaN or infinite value (the run layer refuses such
  predictions, so only records from elsewhere carry them);
* ``constant_scores`` — every image has the same score (image AUROC is 0.5 by ties alone);
* ``auroc_half_from_ties`` — image AUROC is exactly 0.5 and some (normal, anomalous) pairs tie;
* ``chance`` — not better than chance: the one-sided permutation test of image AUROC against
  shuffled labels (:func:`fsad_bench.metrics.auroc_permutation_p`) gives ``p >= alpha`` (0.05);
* ``constant_maps`` — every pixel of every map has the same value;
* ``identical_maps`` — the maps differ within an image but are the same for every image: pixel
  metrics then measure a fixed spatial prior (e.g. higher in the centre, where defects are), not detection.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fsad_bench.metrics import auroc_permutation_p, image_auroc, tied_pair_fraction

#: Flags about image scores (they concern image metrics) and about maps (pixel metrics).
IMAGE_FLAGS = ("nonfinite_scores", "constant_scores", "auroc_half_from_ties", "chance")
MAP_FLAGS = ("nonfinite_maps", "constant_maps", "identical_maps")
N_PERMUTATIONS = 1000
ALPHA = 0.05


def _same_everywhere(x: np.ndarray) -> bool:
    return bool(x.size == 0 or np.all(x == x.reshape(-1)[0]))


def _identical_across_images(maps: np.ndarray) -> bool:
    """Whether every map ``(S, S)`` of ``maps`` ``(N, S, S)`` equals the first (chunked: no ``(N, S, S)`` temporary)."""
    first = maps[0]
    return all(
        np.array_equal(maps[i : i + 64], np.broadcast_to(first, maps[i : i + 64].shape))
        for i in range(1, len(maps), 64)
    )


def cell_flags(
    labels: np.ndarray,
    scores: np.ndarray,
    maps: np.ndarray,
    seed: int,
    n_permutations: int = N_PERMUTATIONS,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Record fields ``flags`` and ``chance_test`` of one cell: ``labels`` / ``scores`` ``(N,)``,
    ``maps`` ``(N, S, S)``; ``seed`` (the cell's) seeds the permutations."""
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    maps = np.asarray(maps)
    flags: list[str] = []
    finite = bool(np.isfinite(scores).all())
    if not finite:
        flags.append("nonfinite_scores")
    if not np.isfinite(maps).all():
        flags.append("nonfinite_maps")
    elif len(maps) and _same_everywhere(maps):
        flags.append("constant_maps")
    elif len(maps) > 1 and _identical_across_images(maps):
        flags.append("identical_maps")
    p = 1.0
    if finite:
        if _same_everywhere(scores):
            flags.append("constant_scores")
        elif image_auroc(labels, scores) == 0.5 and tied_pair_fraction(labels, scores) > 0:
            flags.append("auroc_half_from_ties")
        p = auroc_permutation_p(labels, scores, n_permutations, seed % 2**63)
    if p >= alpha:
        flags.append("chance")
    return {"flags": sorted(flags), "chance_test": {"p": p, "n_permutations": n_permutations, "alpha": alpha}}
