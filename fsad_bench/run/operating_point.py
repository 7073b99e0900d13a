"""A label-free operating point: a threshold from the support set alone, and the test set at it.

Few-shot users deploy with k normal images and no labelled anomaly, so a threshold must come from
the support set. Each support image is scored by **leave-one-out**: the method adapted on the other
k − 1 images scores the one left out (for an ``individual`` method, whose adaptation is training, a
fresh model is trained on the k − 1 images with the cell's seed); the threshold is the highest of
these k scores (rule ``max``, :func:`fsad_bench.metrics.support_threshold`; any other rule can be
recomputed from the stored ``support_scores``). For **k = 1** there is nothing to leave out: the
fallback scores the support image with the model adapted on it (``scoring = "self (k=1)"``), which
is optimistic — a model scores its own support image low, so the threshold tends to be too low.

Record fields (:func:`operating_point_fields`): ``operating_point`` = ``{rule, threshold, scoring,
support_scores, fpr, recall, precision, f1, f1max}`` (test set, an image anomalous when its score is
strictly above the threshold; ``f1max`` is the oracle F1 at the best threshold, the record's
``image_f1max``) and ``operating_point_seconds`` (the k extra adaptations and predictions; never
part of ``adapt_seconds``).

Cost and default (:func:`wanted`): training-free, aggregated and cross-dataset methods that adapt by
statistics of the support set adapt cheaply, so it is computed unless the suite says
``operating_point = false``; an individual method trains k more models per cell (k + 1 trainings
instead of 1), and a method whose adaptation fine-tunes (``Adapter.adapt_trains``: ``diffnet+``,
``tdg+``) k more fine-tunings, so for those only with ``operating_point = true`` (or
``fsad-bench run --operating-point``). The global random states (torch, CUDA, numpy, random) are
restored afterwards and a shared adapter is re-adapted by the next cell anyway, so the cell's other
numbers, and every later cell's, are those of a run without it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from fsad_bench.errors import FsadError
from fsad_bench.metrics import at_threshold, support_threshold
from fsad_bench.run.devices import sync

RULE = "max"
SELF_SCORING = "self (k=1)"
LOO_SCORING = "leave-one-out"


def by_default(cls) -> bool:
    """Whether adapter class ``cls`` computes the operating point when the suite does not say: not when
    adapting it trains a network (``individual`` methods, and :attr:`~fsad_bench.adapter.Adapter.adapt_trains`)."""
    return cls.protocol != "individual" and not cls.adapt_trains


def wanted(cls, setting: bool | None) -> bool:
    """Whether a cell of adapter class ``cls`` computes the operating point: the suite's
    ``operating_point`` when set, else :func:`by_default`."""
    return by_default(cls) if setting is None else bool(setting)


@contextmanager
def kept_random_state() -> Iterator[None]:
    """Within: any use of the global generators; after: torch (CPU and every initialised CUDA device),
    numpy and ``random`` are back where they were."""
    cpu, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        np.random.set_state(np_state)
        random.setstate(py_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _score(adapter, images: torch.Tensor) -> np.ndarray:
    s, _ = adapter.predict(images.to(adapter.device))
    s = torch.as_tensor(s).detach().float().cpu().reshape(-1).double().numpy()  # float32, as test scores
    if s.shape != (len(images),) or not np.isfinite(s).all():
        raise FsadError(
            f"{adapter.name}.predict returned scores {s.tolist()} for {len(images)} support images; "
            f"expected {len(images)} finite values"
        )
    return s


def measure(
    adapter,
    support: torch.Tensor,
    seed: int,
    fresh: Callable[[torch.Tensor], Any] | None,
    labels: np.ndarray,
    scores: np.ndarray,
    f1max: float,
    device: str,
) -> dict[str, Any]:
    """Record fields ``operating_point`` and ``operating_point_seconds`` of one cell.

    ``adapter``: the cell's model, adapted on ``support`` ``(k, 3, S, S)``; ``fresh(images)``: for an
    individual method, a new model fitted on ``images`` (None: ``adapter`` is shared and re-adapted);
    every leave-one-out adaptation runs under ``torch.manual_seed(seed)``, like the cell's own.
    ``labels`` / ``scores`` ``(N,)`` of the test set, ``f1max`` the cell's ``image_f1max``."""

    def adapted_on(images: torch.Tensor):
        model = adapter if fresh is None else fresh(images)
        torch.manual_seed(seed)
        model.category = getattr(adapter, "category", None)
        model.adapt(images.to(model.device))
        return model

    sync(device)
    t0 = time.perf_counter()
    found, scoring = support_scores(support, adapter, adapted_on)
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "operating_point": operating_point_fields(labels, scores, found, scoring, f1max),
        "operating_point_seconds": seconds,
    }


def support_scores(support: torch.Tensor, adapter, adapted_on: Callable[[torch.Tensor], Any]) -> tuple[np.ndarray, str]:
    """Scores ``(k,)`` of the support images ``(k, 3, S, S)`` and how they were obtained.

    k ≥ 2: leave-one-out, ``adapted_on(images)`` returning a model adapted on ``images`` ``(k − 1, 3, S, S)``;
    k = 1: ``adapter`` (already adapted on the support) scores its own support image."""
    with kept_random_state():
        if len(support) == 1:
            return _score(adapter, support), SELF_SCORING
        out = np.empty(len(support), dtype=np.float64)
        for i in range(len(support)):
            model = adapted_on(torch.cat([support[:i], support[i + 1 :]]))
            out[i] = _score(model, support[i : i + 1])[0]
            del model
        return out, LOO_SCORING


def operating_point_fields(
    labels: np.ndarray, scores: np.ndarray, support: np.ndarray, scoring: str, f1max: float, rule: str = RULE
) -> dict[str, Any]:
    """The record's ``operating_point``: test ``labels`` / ``scores`` ``(N,)``, ``support`` scores ``(k,)``."""
    threshold = support_threshold(support, rule)
    return {
        "rule": rule,
        "threshold": threshold,
        "scoring": scoring,
        "support_scores": [float(v) for v in support],
        **at_threshold(labels, scores, threshold),
        "f1max": float(f1max),
    }
