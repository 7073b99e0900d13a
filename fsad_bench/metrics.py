"""Detection and localisation metrics: AUROC, AUPR (average precision), F1-max, AUPRO.

:func:`evaluate` computes every metric of a cell at once (the run layer calls it once per cell).
AUROC, the precision-recall curve and average precision come from scikit-learn. F1-max is the
best F1 over all thresholds of the precision-recall curve (the number WinCLIP, PromptAD and
anomalib's ``F1Max`` report); AUPR is scikit-learn's ``average_precision_score`` (step-wise
sum ``Σ (R_n - R_{n-1}) P_n``, no interpolation). AUPRO follows the MVTec AD definition (Bergmann et al.):
for every threshold, the per-region overlap (PRO) is the mean over connected ground-truth
regions of the fraction of the region's pixels above the threshold; the false-positive rate
is the fraction of defect-free pixels above it. The PRO curve is integrated over
FPR in [0, ``max_fpr``] and divided by ``max_fpr`` so a perfect map scores 1.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import label as connected_components
from sklearn.metrics import precision_recall_curve, roc_auc_score


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of image scores ``(N,)`` against labels ``(N,)`` (1 = anomalous), in [0, 1]."""
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores, dtype=np.float64)))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over all pixels of maps ``(N, H, W)`` against binary masks ``(N, H, W)``;
    NaN when the masks hold no defect pixel."""
    y = np.asarray(masks).reshape(-1) > 0.5
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(maps, dtype=np.float64).reshape(-1)))


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``max_fpr`` (in [0, 1]); NaN without defects.

    ``masks`` and ``maps`` are ``(N, H, W)``. Regions are 8-connected components of each mask.
    Exact: every distinct score is a threshold (computed by sorting once).
    """
    masks = np.asarray(masks) > 0.5
    maps = np.asarray(maps, dtype=np.float64)
    region = np.zeros(masks.shape, dtype=np.int64)  # 0 = normal pixel, r > 0 = region id
    n_regions = 0
    for i in range(masks.shape[0]):
        lab, n = connected_components(masks[i], structure=np.ones((3, 3)))
        region[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += n
    if n_regions == 0:
        return float("nan")
    region = region.reshape(-1)
    scores = maps.reshape(-1)
    sizes = np.bincount(region, minlength=n_regions + 1).astype(np.float64)
    n_normal = sizes[0]
    if n_normal == 0:
        return float("nan")
    # Contribution of each pixel when it crosses the threshold.
    pro_step = np.where(region > 0, 1.0 / (n_regions * sizes[region]), 0.0)
    fpr_step = np.where(region == 0, 1.0 / n_normal, 0.0)
    order = np.argsort(-scores, kind="stable")
    s_sorted = scores[order]
    pro = np.cumsum(pro_step[order])
    fpr = np.cumsum(fpr_step[order])
    last_of_tie = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # threshold = each distinct score
    pro = np.r_[0.0, pro[last_of_tie]]
    fpr = np.r_[0.0, fpr[last_of_tie]]
    # Integrate up to max_fpr, interpolating the curve at the cut.
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    if x[-1] < max_fpr and keep.sum() < len(fpr):
        j = keep.sum()  # first point beyond the cut
        t = (max_fpr - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x = np.r_[x, max_fpr]
        y = np.r_[y, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    return float(np.trapezoid(y, x) / max_fpr)


def _pr_summary(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """``(average precision, F1-max)`` of scores ``s`` against binary ``y`` from one
    precision-recall curve (one sort); AP equals ``sklearn.metrics.average_precision_score``."""
    precision, recall, _ = precision_recall_curve(y, s)
    ap = -float(np.sum(np.diff(recall) * precision[:-1]))
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return ap, float(f1.max())


def image_aupr(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of image scores ``(N,)`` against labels ``(N,)`` (1 = anomalous), in [0, 1]."""
    return _pr_summary(np.asarray(labels) > 0, np.asarray(scores, dtype=np.float64))[0]


def image_f1max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds of image scores ``(N,)`` against labels ``(N,)``, in [0, 1]."""
    return _pr_summary(np.asarray(labels) > 0, np.asarray(scores, dtype=np.float64))[1]


def _pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    y = np.asarray(masks).reshape(-1) > 0.5
    if y.all() or not y.any():
        return None
    return y, np.asarray(maps, dtype=np.float64).reshape(-1)


def pixel_aupr(masks: np.ndarray, maps: np.ndarray) -> float:
    """Average precision over all pixels of maps ``(N, H, W)`` against masks; NaN without defects."""
    px = _pixels(masks, maps)
    return float("nan") if px is None else _pr_summary(*px)[0]


def pixel_f1max(masks: np.ndarray, maps: np.ndarray) -> float:
    """Best F1 over all thresholds, all pixels of maps ``(N, H, W)`` against masks; NaN without defects."""
    px = _pixels(masks, maps)
    return float("nan") if px is None else _pr_summary(*px)[1]


#: Every metric :func:`evaluate` knows, in table order (values in [0, 1]).
METRICS: tuple[str, ...] = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_aupr",
    "image_f1max",
    "pixel_aupr",
    "pixel_f1max",
)


def evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    metrics: list[str] | tuple[str, ...] | None = None,
) -> dict[str, float]:
    """The metrics of one cell: labels / scores ``(N,)``, masks / maps ``(N, H, W)`` ->
    ``{name: value in [0, 1]}`` for ``metrics`` (default: all of :data:`METRICS`). Pixel
    metrics are NaN when the masks hold no defect pixel. The image and pixel precision-recall
    curves are each computed once (AUPR and F1-max share them)."""
    wanted = list(METRICS if metrics is None else metrics)
    unknown = [m for m in wanted if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown} (known: {', '.join(METRICS)})")
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    out: dict[str, float] = {}
    if "image_auroc" in wanted:
        out["image_auroc"] = image_auroc(labels, scores)
    if {"image_aupr", "image_f1max"} & set(wanted):
        out["image_aupr"], out["image_f1max"] = _pr_summary(labels > 0, scores)
    if "pixel_auroc" in wanted:
        out["pixel_auroc"] = pixel_auroc(masks, maps)
    if "aupro" in wanted:
        out["aupro"] = aupro(masks, maps)
    if {"pixel_aupr", "pixel_f1max"} & set(wanted):
        px = _pixels(masks, maps)
        out["pixel_aupr"], out["pixel_f1max"] = (float("nan"),) * 2 if px is None else _pr_summary(*px)
    return {m: out[m] for m in wanted}


# -- checks of degenerate cells, the label-free operating point, per-defect AUROC -------------------
# None of these change :func:`evaluate`; the run layer stores their results beside its metrics.


def auroc_permutation_p(labels: np.ndarray, scores: np.ndarray, n_permutations: int = 1000, seed: int = 0) -> float:
    """One-sided permutation p-value of image AUROC against shuffled labels, in (0, 1].

    ``labels`` / ``scores`` are ``(N,)``. ``p = (1 + #{permutations with AUROC >= observed}) /
    (n_permutations + 1)``: a perfectly separating score gives ``≈ 1 / (n_permutations + 1)``,
    constant scores give exactly 1 (every permutation ties the observed AUROC). Exact and vectorised:
    AUROC is a monotone function of the anomalous images' rank sum (average ranks for ties, doubled to
    integers), so the ``(n_permutations, N)`` shuffled label matrix times the ranks gives every permuted
    AUROC in one product. ``seed`` seeds numpy's generator (the run layer passes the cell's seed)."""
    from scipy.stats import rankdata

    y = (np.asarray(labels).reshape(-1) > 0).astype(np.float64)
    ranks2 = 2 * rankdata(np.asarray(scores, dtype=np.float64).reshape(-1))  # integers (ties: x.5 doubled)
    observed = float(y @ ranks2)
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.broadcast_to(y, (n_permutations, len(y))), axis=1)
    hits = int(np.count_nonzero(shuffled @ ranks2 >= observed))
    return (1 + hits) / (n_permutations + 1)


def tied_pair_fraction(labels: np.ndarray, scores: np.ndarray) -> float:
    """Fraction of (normal, anomalous) image pairs whose scores ``(N,)`` are equal, in [0, 1]
    (AUROC counts each such pair as one half)."""
    y = np.asarray(labels).reshape(-1) > 0
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    values, inverse = np.unique(s, return_inverse=True)
    n_bad = np.bincount(inverse, weights=y, minlength=len(values))
    n_good = np.bincount(inverse, weights=~y, minlength=len(values))
    pairs = y.sum() * (~y).sum()
    return float((n_bad * n_good).sum() / pairs) if pairs else 0.0


def support_threshold(support_scores: np.ndarray, rule: str = "max") -> float:
    """A threshold from the scores ``(k,)`` of normal support images alone (no labelled anomaly).

    ``rule``: ``"max"`` (the highest support score), or ``"q<p>"`` with ``0 <= p <= 1`` (e.g. ``"q0.9"``:
    numpy's linear-interpolation quantile of the support scores). An image is called anomalous when its
    score is strictly above the threshold. ValueError for another rule."""
    s = np.asarray(support_scores, dtype=np.float64).reshape(-1)
    if rule == "max":
        return float(s.max())
    if rule.startswith("q"):
        try:
            q = float(rule[1:])
        except ValueError:
            q = -1.0
        if 0 <= q <= 1:
            return float(np.quantile(s, q))
    raise ValueError(f"unknown threshold rule {rule!r} (known: max, q<p> with 0 <= p <= 1, e.g. q0.9)")


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Detection at a fixed threshold: images with score ``> threshold`` are called anomalous.

    ``labels`` / ``scores`` are ``(N,)``. Returns ``fpr`` (normal images called anomalous / normal
    images), ``recall`` (anomalous images called anomalous / anomalous images), ``precision`` (1 when
    nothing is called anomalous) and ``f1 = 2 TP / (2 TP + FP + FN)`` (0 without true positives), in [0, 1]."""
    y = np.asarray(labels).reshape(-1) > 0
    called = np.asarray(scores, dtype=np.float64).reshape(-1) > threshold
    tp, fp = int(np.sum(called & y)), int(np.sum(called & ~y))
    fn = int(np.sum(~called & y))
    n_good = int(np.sum(~y))
    return {
        "fpr": fp / n_good if n_good else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
    }


def per_defect_auroc(labels: np.ndarray, scores: np.ndarray, defects: list[str]) -> dict[str, float]:
    """Image AUROC per defect type: defect -> AUROC of that defect's anomalous images against every
    normal image (``labels`` / ``scores`` / ``defects`` of length N; defect names of anomalous images,
    e.g. MVTec's ``test/<defect>`` folders), sorted by name; {} without normal images."""
    y = np.asarray(labels).reshape(-1) > 0
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    good = ~y
    if not good.any():
        return {}
    out: dict[str, float] = {}
    for d in sorted({defects[i] for i in np.flatnonzero(y)}):
        bad = y & (np.asarray(defects) == d)
        keep = good | bad
        out[d] = image_auroc(bad[keep].astype(int), s[keep])
    return out
