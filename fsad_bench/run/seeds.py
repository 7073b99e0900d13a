"""Every seed a run derives from the suite's one seed: a shared adapter's ``config.seed``
(:func:`adapter_seed`), torch's seed for one aggregated / cross-dataset fit (:func:`fit_seed`, also
part of the model cache key) and for one cell (:func:`cell_seed`: adaptation, prediction and an
individual method's fit). Training-seed 0 leaves every derivation as it was before training seeds.

A swept variant (``diffnet+@finetune_epochs=48``, :mod:`fsad_bench.registry`) draws the seeds of its base
method (:func:`seed_name`): every value of a sweep starts from the same initialisation and sees the same
augmentations, so the values are compared pairwise, the way an ablation should be."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsad_bench.seeding import stable_seed

if TYPE_CHECKING:
    from fsad_bench.data.dataset import Dataset
    from fsad_bench.protocols import Suite


def adapter_seed(suite_seed: int, train_seed: int) -> int:
    """``config.seed`` of a shared (aggregated / cross-dataset / training-free) adapter: the
    suite seed for train seed 0 (the numbers of a single-seed suite stay as they were), a
    derived one for every other train seed."""
    return suite_seed if train_seed == 0 else stable_seed("train", suite_seed, train_seed) % 2**31


def seed_name(method: str) -> str:
    """The name seeds are derived from: a variant's base method (``diffnet+`` for ``diffnet+@finetune_epochs=48``)."""
    return method.partition("@")[0]


def _with_train_seed(parts: tuple, train_seed: int) -> tuple:
    return (*parts, f"t{train_seed}") if train_seed else parts


def fit_seed(suite: Suite, method: str, train_ds: Dataset, held_out: str, train_seed: int) -> int:
    """Seed of one aggregated / cross-dataset fit: (suite seed, train seed, method, dataset, held-out)."""
    return stable_seed("fit", *_with_train_seed((suite.seed, seed_name(method), train_ds.name, held_out), train_seed))


def cell_seed(suite_seed: int, method: str, category: str, k: int, run: int, train_seed: int) -> int:
    """Torch seed of one cell (suite seed, method, category, k, run, train seed): its adaptation and
    predictions, and an individual method's fit and ``config.seed``."""
    return stable_seed("cell", *_with_train_seed((suite_seed, seed_name(method), category, k, run), train_seed)) % 2**31
