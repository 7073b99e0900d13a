"""Seeded k-shot support sets, identical for every method (paired comparison).

The support set of a cell is decided by (dataset, category, k, run, seed) alone: no
method, protocol or process state enters the choice. Published fixed support sets can
be used instead through a JSON file::

    {"bottle": {"2": {"0": ["000.png", "017.png"], "1": [...]}, "4": {...}}}

(file names relative to ``<category>/train/good``; keys are k, then run). A list may carry the
SHA-256 of every file it names (``"_sha256"``, see :mod:`fsad_bench.data.support_lists`): then each
file is checked before it is used, and a copy of the data that differs is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from fsad_bench.data.dataset import CategorySplit
from fsad_bench.data.support_lists import check_hashes
from fsad_bench.errors import FsadError
from fsad_bench.seeding import stable_seed


def support_indices(dataset: str, category: str, k: int, run: int, n_available: int, seed: int = 0) -> list[int]:
    """Indices of the k support images among ``n_available`` sorted normal training images."""
    if k < 1:
        raise FsadError(f"k must be >= 1, got {k}")
    if k > n_available:
        raise FsadError(f"k={k} is larger than the {n_available} normal training images of {dataset}/{category}")
    rng = np.random.default_rng(stable_seed("support", dataset, category, k, run, seed))
    return sorted(int(i) for i in rng.choice(n_available, size=k, replace=False))


class SupportSampler:
    """Chooses support sets: seeded by default, or read from an explicit JSON list."""

    def __init__(self, seed: int = 0, lists: str | Path | None = None):
        self.seed = seed
        self.lists_path = Path(lists) if lists else None
        self.lists: dict | None = None
        self._verified: dict[Path, str] = {}  # sha256 of the files checked so far
        if self.lists_path is not None:
            try:
                self.lists = json.loads(self.lists_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise FsadError(f"cannot read support-set list {self.lists_path}: {err}") from None
            if not isinstance(self.lists, dict):
                raise FsadError(
                    f"support-set list {self.lists_path} must be a JSON object: category -> k -> run -> file names"
                )

    def support(self, split: CategorySplit, k: int, run: int) -> list[Path]:
        """Paths of the k support images of ``split`` for run ``run``."""
        if self.lists is None:
            idx = support_indices(split.dataset, split.name, k, run, len(split.train), self.seed)
            return [split.train[i] for i in idx]
        try:
            names = self.lists[split.name][str(k)][str(run)]
        except KeyError:
            raise FsadError(
                f"support-set list {self.lists_path} has no entry [{split.name!r}][{str(k)!r}][{str(run)!r}]"
            ) from None
        by_name = {p.name: p for p in split.train}
        paths = []
        for n in names:
            if n not in by_name:
                raise FsadError(f"support-set list {self.lists_path}: {n!r} is not in {split.root / 'train' / 'good'}")
            paths.append(by_name[n])
        if len(paths) != k:
            raise FsadError(f"support-set list {self.lists_path}: {split.name}/k={k}/run={run} has {len(paths)} files")
        check_hashes(self.lists, self.lists_path, split.name, paths, self._verified)
        return paths


def subsample_test(split: CategorySplit, n: int | None, seed: int = 0) -> CategorySplit:
    """``split`` with at most ``n`` of its test images (None or ``n >= len(split.test)``: ``split`` itself).

    Stratified by (label, defect type): each stratum keeps its share of ``n`` (largest remainders,
    at least one image per stratum while ``n`` allows), chosen by a generator seeded by (dataset,
    category, n, seed) alone, so every method and every cell sees the same images; the kept images stay
    in their original order. For calibration sweeps whose test sets cost more than their comparison
    needs; a record's ``n_test`` says how many images scored it."""
    if n is None or n >= len(split.test):
        return split
    if n < 2:
        raise FsadError(f"test_subset must be at least 2 (one normal, one anomalous image), got {n}")
    strata: dict[tuple[int, str], list[int]] = {}
    for i, s in enumerate(split.test):
        strata.setdefault((s.label, s.defect), []).append(i)
    keys = sorted(strata)
    total = len(split.test)
    exact = {key: n * len(strata[key]) / total for key in keys}
    take = {key: min(len(strata[key]), max(1, int(exact[key]))) for key in keys}
    while sum(take.values()) > n:  # more strata than n: drop the smallest shares first
        key = min((k for k in keys if take[k] > 0), key=lambda k: (exact[k], k))
        take[key] -= 1
    by_remainder = sorted(keys, key=lambda k: (-(exact[k] - int(exact[k])), k))
    while sum(take.values()) < n:
        for key in by_remainder:
            if sum(take.values()) < n and take[key] < len(strata[key]):
                take[key] += 1
    rng = np.random.default_rng(stable_seed("test-subset", split.dataset, split.name, n, seed))
    kept = sorted(int(i) for key in keys for i in rng.permutation(strata[key])[: take[key]])
    return dataclasses.replace(split, test=[split.test[i] for i in kept])
