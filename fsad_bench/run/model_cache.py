"""Trained models of aggregated and cross-dataset methods: fitted once per (held-out category, train
seed) — and k, for an adapter whose fit depends on it (:meth:`~fsad_bench.adapter.Adapter.per_shot_fit`) —
and cached on disk under a key of everything that changes the fit (:func:`model_cache_path`),
loaded instead of refitted when present (:func:`fit_cached`), deleted for ``--force``
(:func:`forget_models`).

Each model file ``<key>.pt`` is written with its size and sha256 beside it (``<key>.pt.json``,
:func:`fsad_bench.identity.write_with_digest`) and checked before it is loaded (one read: ~0.1 s for
a 100 MB model). A truncated, damaged or unloadable file, or one without its record, gives one
warning line naming it (:class:`~fsad_bench.identity.CorruptFileWarning`), is deleted, and the
model is trained again."""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path

import torch

from fsad_bench import registry
from fsad_bench.data.dataset import Dataset
from fsad_bench.data.image_cache import ImageCache
from fsad_bench.identity import digest_path, digest_problem, discard_corrupt, write_with_digest
from fsad_bench.protocols import Suite, training_data
from fsad_bench.run.paths import cache_dir, image_cache_dir
from fsad_bench.run.plan import Plan, groups_of
from fsad_bench.run.predict import input_size, resize_filter
from fsad_bench.run.seeds import fit_seed


def model_cache_path(
    method: str,
    protocol: str,
    preset: str,
    suite: Suite,
    train_ds: Dataset,
    held_out: str,
    chash: str,
    train_seed: int = 0,
    shot: int | None = None,
) -> Path:
    """Where the fit of ``method`` for ``held_out`` and ``train_seed`` (and ``shot`` = k for a per-shot
    fit; None: one fit for every k) is cached. ``chash`` (the cell's config hash) covers hyper-parameters,
    code, weights, data identity, image size and seed, and the fit seed enters the key, so a cached model
    is reused only for the configuration, training seed and k that trained it. A swept variant's
    model lives under its base method (``chash``: the cell's ``fit_hash``, shared by variants that
    differ only in adapt-only options)."""
    method = registry.base_name(method)
    seed = fit_seed(suite, method, train_ds, held_out, train_seed)
    raw = f"{chash}|{train_ds.root.resolve()}|{','.join(train_ds.categories)}|fit{seed}"
    raw += "" if shot is None else f"|k{shot}"
    key = hashlib.sha256(raw.encode()).hexdigest()[:16]
    folder = train_ds.name if protocol == "aggregated" else f"cross-{train_ds.name}"
    per_k = "" if shot is None else f"-k{shot}"
    return (
        cache_dir()
        / "models"
        / method
        / folder
        / f"{held_out or 'all'}-{preset}-s{suite.seed}-t{train_seed}{per_k}-{key}.pt"
    )


def per_shot_fit(adapter, hparams: dict) -> bool:
    """Whether ``adapter`` (class or instance) fits once per k with these hyper-parameters
    (:meth:`~fsad_bench.adapter.Adapter.per_shot_fit`; False for adapters without it)."""
    check = getattr(adapter, "per_shot_fit", None)
    return bool(check(hparams)) if check is not None else False


def _load_model(path: Path, device) -> dict | None:
    """The checked content of the cached model ``path``, or None (then deleted, with one warning)."""
    why = digest_problem(path)
    if why is None:
        try:
            return torch.load(path, map_location=device, weights_only=False)
        except Exception as err:  # EOFError, PytorchStreamReader, unpickling: a damaged file, not a bug
            why = f"{err.__class__.__name__}: {err}".splitlines()[0]
    discard_corrupt(path, "cached model", why, "training again")
    return None


def fit_cached(
    adapter,
    suite: Suite,
    train_ds: Dataset,
    held_out: str,
    chash: str,
    train_seed: int = 0,
    image_cache: ImageCache | None = None,
    shot: int | None = None,
) -> float:
    """Fit ``adapter`` (or load the fit from the model cache); returns training seconds.

    ``aggregated``: trains on every category of ``train_ds`` but ``held_out``;
    ``cross-dataset``: on all of ``train_ds`` (another dataset), ``held_out`` is "".
    ``shot``: k of the cells the fit serves; used (key and ``adapter.fit_shot``) only when the adapter's
    :meth:`~fsad_bench.adapter.Adapter.per_shot_fit` is true. Torch is seeded with :func:`fit_seed`
    (the same for every k); the cache key is :func:`model_cache_path`. Training images are loaded at the
    adapter's :func:`input_size` with its :func:`resize_filter` through ``image_cache`` (default: the
    decoded-image cache of :func:`~fsad_bench.run.paths.image_cache_dir`)."""
    shot = shot if per_shot_fit(adapter, getattr(adapter, "hparams", {})) else None
    adapter.fit_shot = shot
    path = model_cache_path(
        adapter.name, adapter.protocol, adapter.preset_name, suite, train_ds, held_out, chash, train_seed, shot
    )
    if path.is_file():
        blob = _load_model(path, adapter.device)
        if blob is not None:
            adapter.load_state_dict(blob["state"])
            return float(blob["train_seconds"])
    torch.manual_seed(fit_seed(suite, adapter.name, train_ds, held_out, train_seed) % 2**63)
    train = training_data(
        adapter.protocol,
        train_ds,
        held_out,
        torch.empty(0),
        input_size(adapter, suite),
        image_cache or ImageCache(image_cache_dir()),
        resize_filter(adapter),
    )
    t0 = time.perf_counter()
    adapter.fit(train)
    seconds = time.perf_counter() - t0
    try:  # parallel workers may fit the same model: each writes its own temporary file
        write_with_digest(path, lambda tmp: torch.save({"state": adapter.state_dict(), "train_seconds": seconds}, tmp))
    except OSError as err:  # a full or read-only cache costs a refit next time, not the run
        warnings.warn(f"cannot cache the trained model at {path}: {err.strerror or err}", stacklevel=1)
    return seconds


def forget_models(planned: Plan) -> None:
    """Delete the cached trained models of the planned cells (``--force``: recompute means retrain too)."""
    suite = planned.suite
    for (m, c), group in groups_of(planned.cells).items():
        cls = planned.classes[m]
        if cls.protocol not in ("aggregated", "cross-dataset"):
            continue
        train_ds = planned.dataset if cls.protocol == "aggregated" else planned.train_dataset
        held_out = c if cls.protocol == "aggregated" else ""
        per_shot = per_shot_fit(cls, cls.resolve_hparams(suite.preset, suite.options.get(m, {})))
        for t in sorted({cell.train_seed for cell in group}):
            for shot in sorted({cell.k for cell in group}) if per_shot else [None]:
                path = model_cache_path(
                    m,
                    cls.protocol,
                    cls.resolve_preset(suite.preset),
                    suite,
                    train_ds,
                    held_out,
                    group[0].fit_config_hash,
                    t,
                    shot,
                )
                path.unlink(missing_ok=True)
                digest_path(path).unlink(missing_ok=True)
