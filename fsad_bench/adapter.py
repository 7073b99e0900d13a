"""The method adapter API: every FSAD method is one subclass of :class:`Adapter`.

Life of an adapter in a benchmark cell (see :mod:`fsad_bench.run`)::

    a = Method(config)
    a.fit(train)           # protocol-dependent training; may be a no-op
    a.adapt(support)       # (K, 3, S, S) in [0, 1] -> the category's normal model
    scores, maps = a.predict(images)   # (N,), (N, S, S); higher = more anomalous

``train`` is a mapping ``category -> torch Dataset`` of ``(3, S, S)`` images in [0, 1]:

* ``aggregated`` protocol: every category of the dataset except the held-out target
  (its train/good images); one fit is shared by all k and runs of that target;
* ``individual`` protocol: ``{target: support images}`` only, one fit per cell;
* ``training-free`` methods never train (``fit`` is not called);
* ``cross-dataset``: every category of the suite's *training dataset* (another dataset), as
  labelled images ``(image, label)`` (:class:`~fsad_bench.data.torch_datasets.LabelledImages`: train/good and
  test/good are 0, test/<defect> are 1); one fit is shared by every target category, k and run.

A trained state is cached by the run layer through :meth:`state_dict` / :meth:`load_state_dict`
(default: the ``nn.Module`` attributes of the adapter), keyed by (method, dataset,
held-out category, preset, seed, config), and by k when :meth:`Adapter.per_shot_fit` says the fit
depends on it (the run layer then fits once per k and sets :attr:`Adapter.fit_shot` before ``fit``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fsad_bench.errors import FsadError

PROTOCOLS = ("aggregated", "individual", "training-free", "cross-dataset")
TrainSet = Mapping[str, torch.utils.data.Dataset]


# -- declared option constraints (like scikit-learn's ``_parameter_constraints``) -----------------
@dataclass(frozen=True)
class Interval:
    """Numbers of ``kind`` (``int`` or ``float``; an int is a valid float, a bool never is) between
    ``low`` and ``high`` (None: unbounded); ``closed`` says which ends belong: both, left, right, neither."""

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int,) if self.kind is int else (int, float)):
            return False
        lo_ok = self.low is None or (value >= self.low if self.closed in ("both", "left") else value > self.low)
        hi_ok = self.high is None or (value <= self.high if self.closed in ("both", "right") else value < self.high)
        return lo_ok and hi_ok

    def __str__(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            left, right = (
                ("[" if self.closed in ("both", "left") else "("),
                ("]" if self.closed in ("both", "right") else ")"),
            )
            return f"{what} in {left}{self.low}, {self.high}{right}"
        if self.low is not None:
            return f"{what} {'>=' if self.closed in ('both', 'left') else '>'} {self.low}"
        if self.high is not None:
            return f"{what} {'<=' if self.closed in ('both', 'right') else '<'} {self.high}"
        return what


class OneOf:
    """One of the listed values (compared with ``==``; ``True`` never matches ``1``)."""

    def __init__(self, *values: Any):
        self.values = values

    def accepts(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def __str__(self) -> str:
        return "one of " + ", ".join(map(repr, self.values))


class ListOf:
    """A list (or tuple) of ``min_len`` to ``max_len`` items (None: no upper bound), each accepted by
    ``item`` (a type or a constraint)."""

    def __init__(self, item: Any, min_len: int = 1, max_len: int | None = None):
        self.item, self.min_len, self.max_len = item, min_len, max_len

    def accepts(self, value: Any) -> bool:
        return (
            isinstance(value, (list, tuple))
            and self.min_len <= len(value) <= (len(value) if self.max_len is None else self.max_len)
            and all(accepts(self.item, v) for v in value)
        )

    def __str__(self) -> str:
        if self.max_len is None:
            count = f"at least {self.min_len}"
        elif self.max_len == self.min_len:
            count = f"exactly {self.min_len}"
        else:
            count = f"{self.min_len} to {self.max_len}"
        return f"a list of {describe(self.item)} ({count})"


def accepts(constraint: Any, value: Any) -> bool:
    """Whether ``value`` satisfies one constraint: ``None`` (the value None), a type (``bool``,
    ``str``, ...; a bool is never an int or float), or an object with ``accepts``."""
    if constraint is None:
        return value is None
    if isinstance(constraint, type):
        if constraint in (int, float) and isinstance(value, bool):
            return False
        return isinstance(value, (int, float) if constraint is float else constraint)
    return constraint.accepts(value)


def describe(constraint: Any) -> str:
    if constraint is None:
        return "None"
    if isinstance(constraint, type):
        return {bool: "true or false", str: "a string", int: "an integer", float: "a number"}.get(
            constraint, constraint.__name__
        )
    return str(constraint)


@dataclass
class AdapterConfig:
    """What every adapter receives.

    ``preset`` names an entry of the adapter's ``presets``; ``options`` override single
    preset values (from the suite's ``[options.<method>]`` table); ``seed`` decides every
    initialisation and augmentation of the adapter; ``feature_cache`` is where frozen-backbone
    features may be cached on disk (see :mod:`fsad_bench.components.feature_cache`).
    """

    device: str = "cpu"
    weights: str = "auto"
    preset: str = "cpu"
    seed: int = 0
    image_size: int = 224
    options: dict[str, Any] = field(default_factory=dict)
    #: Folder for the on-disk feature cache of frozen backbones (None: memory only).
    feature_cache: str | None = None


class Adapter(ABC):
    """Base class of method adapters (scikit-learn-like: configure, fit, adapt, predict)."""

    #: Registry name, e.g. ``"regad"``.
    name: ClassVar[str] = ""
    #: One of :data:`PROTOCOLS`.
    protocol: ClassVar[str] = "training-free"
    #: Named hyper-parameter sets; ``"cpu"`` must exist (fits a 2-core machine).
    presets: ClassVar[dict[str, dict[str, Any]]] = {"cpu": {}}
    #: Paper reference, shown by ``fsad-bench methods``.
    paper: ClassVar[str] = ""
    #: Option names accepted besides the presets' keys, with their allowed value types
    #: (e.g. ``{"raw_input": (bool,)}``); the adapter reads them with ``hparams.get(name, default)``.
    extra_options: ClassVar[dict[str, tuple[type, ...]]] = {}
    #: Declared constraints of option values, checked when a suite is planned (before any work):
    #: option -> list of constraints, any of which accepts a valid value: a type (``bool``, ``str``),
    #: ``None``, :class:`Interval`, :class:`OneOf`, :class:`ListOf`. Options without an entry get the
    #: type check of :meth:`option_types`. Every preset value must satisfy them (contract test).
    option_constraints: ClassVar[dict[str, list[Any]]] = {}

    def __init__(self, config: AdapterConfig | None = None):
        self.config = config or AdapterConfig()
        self.preset_name = self.resolve_preset(self.config.preset)
        self.hparams: dict[str, Any] = self.resolve_hparams(self.config.preset, self.config.options)
        self.check_hparams(self.hparams)
        self.device = torch.device(self.config.device)
        #: Backbone weights actually used ("imagenet", "random-init", "file:x.pth"); set by subclasses.
        self.weights_tag = "n/a"
        #: Name of the category being evaluated; the run layer sets it before ``adapt`` (text priors use it).
        self.category: str | None = None
        #: k of the shared fit when :meth:`per_shot_fit` is true (the run layer sets it before ``fit``).
        self.fit_shot: int | None = None

    # -- presets and options --------------------------------------------------------------
    @classmethod
    def resolve_preset(cls, preset: str) -> str:
        """The preset this adapter runs for the suite's ``preset``: that one when the adapter has it,
        else ``"cpu"`` (methods with a single configuration, e.g. ``gaussian``, run it for every preset)."""
        return preset if preset in cls.presets else "cpu"

    @classmethod
    def resolve_hparams(cls, preset: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Preset values overridden by ``options`` (what the adapter's ``hparams`` will be)."""
        return {**cls.presets[cls.resolve_preset(preset)], **(options or {})}

    @classmethod
    def option_types(cls) -> dict[str, tuple[type, ...]]:
        """Every option name with the value types it accepts: the types the presets use for that key
        (an int is accepted where a float is, a list where a tuple is; a key that is None in every
        preset accepts anything), plus :attr:`extra_options`."""
        seen: dict[str, set[type]] = {}
        for values in cls.presets.values():
            for key, value in values.items():
                seen.setdefault(key, set()).add(type(value))
        out: dict[str, tuple[type, ...]] = {}
        for key, types in seen.items():
            if types == {type(None)}:
                out[key] = (object,)
                continue
            if float in types:
                types.add(int)
            if tuple in types or list in types:
                types |= {tuple, list}
            out[key] = tuple(sorted(types, key=lambda t: t.__name__))
        out.update(cls.extra_options)
        for key in cls.option_constraints:
            out.setdefault(key, (object,))
        return out

    @classmethod
    def check_options(cls, options: dict[str, Any], source: str = "suite") -> None:
        """FsadError (one line, listing what is valid) for an unknown option name or a value of the wrong type."""
        types = cls.option_types()
        for key, value in options.items():
            if key not in types and key not in cls.option_constraints:
                raise FsadError(
                    f"{source}: unknown option {key!r} for method {cls.name!r} "
                    f"(valid: {', '.join(sorted(types)) or 'none'})"
                )
            declared = cls.option_constraints.get(key)
            if declared is not None:
                if not any(accepts(c, value) for c in declared):
                    raise FsadError(
                        f"{source}: option {key!r} of method {cls.name!r} must be "
                        f"{' or '.join(map(describe, declared))}, got {value!r}"
                    )
                continue
            allowed = types[key]
            ok = any(isinstance(value, t) and not (isinstance(value, bool) and t in (int, float)) for t in allowed)
            if not ok:
                names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise FsadError(
                    f"{source}: option {key!r} of method {cls.name!r} must be {names}, "
                    f"got {value!r} ({type(value).__name__})"
                )

    @classmethod  # noqa: B027  (optional, as fit)
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        """FsadError (one line) when resolved hyper-parameters ``hparams`` (preset + options) are
        individually valid but do not work together, e.g. an image size too small for the number of
        scales. Planning calls it for every method of a suite before any work (sweep variants with
        their values), ``__init__`` again. Default: nothing to check."""

    # -- the three stages -------------------------------------------------------------
    def fit(self, train: TrainSet) -> None:  # noqa: B027  (optional: training-free methods keep the default)
        """Train on ``train`` (see module docstring). Default: nothing to train."""

    @abstractmethod
    def adapt(self, support: torch.Tensor) -> None:
        """Build the normal model from support images ``(K, 3, S, S)`` in [0, 1]."""

    @abstractmethod
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score images ``(N, 3, S, S)`` -> image scores ``(N,)``, anomaly maps ``(N, S, S)``."""

    # -- caching of trained state -----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Trained state to cache after ``fit`` (default: every ``nn.Module`` attribute)."""
        return {k: v.state_dict() for k, v in vars(self).items() if isinstance(v, nn.Module)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            getattr(self, k).load_state_dict(v)

    @classmethod
    def per_shot_fit(cls, hparams: dict[str, Any]) -> bool:
        """Whether a shared fit (aggregated / cross-dataset) with these resolved hyper-parameters depends
        on k: the run layer then fits (and caches) once per (held-out category, train seed, k) instead of
        once per (held-out category, train seed), with :attr:`fit_shot` = k. Default: False."""
        return False

    # -- input resolution -------------------------------------------------------------
    @property
    def resize_filter(self) -> str:
        """Filter with which the run layer resizes this adapter's images from the original files: a key of
        :data:`fsad_bench.data.images.RESIZE_FILTERS` (default ``"bilinear"``, antialiased)."""
        return "bilinear"

    @property
    def input_size(self) -> int | None:
        """Side (px) at which the run layer should load this adapter's images from the original
        files; None = the suite's ``image_size``. ``predict`` then returns maps at that size and
        the run layer resizes them to the suite's ``image_size`` (masks stay at that size)."""
        return None

    #: options that change adaptation or scoring only, never :meth:`fit` (e.g. fine-tuning epochs on
    #: the support set): swept variants that differ only in them share one trained model (the run
    #: layer's fit key leaves them out, :func:`fsad_bench.run.plan.config_hash` with ``fit_only``)
    adapt_only_options: ClassVar[frozenset[str]] = frozenset()
    #: whether :meth:`adapt` trains (fine-tunes a network on the support set) instead of computing
    #: statistics of it: the label-free operating point's leave-one-out then costs k more trainings a
    #: cell, so it is computed only when the suite asks (as for ``individual`` methods, whose :meth:`fit`
    #: on the support set is training); :func:`fsad_bench.run.operating_point.wanted`
    adapt_trains: ClassVar[bool] = False

    # -- labels -----------------------------------------------------------------------
    #: options that cannot change a number (batch sizes, chunking): never labelled
    bookkeeping_options: ClassVar[frozenset[str]] = frozenset()
    #: options whose non-official values :meth:`label_tags` names itself (in its own words)
    labelled_options: ClassVar[frozenset[str]] = frozenset()

    def label_tags(self) -> list[str]:
        """Extra label tags, one per option set to a non-official value (default: none)."""
        return []

    def override_tags(self) -> list[str]:
        """``key=value`` for every option whose value differs from the preset's (a suite's
        ``[options.<method>]``), except ``arch`` (its own tag), :attr:`bookkeeping_options` and
        :attr:`labelled_options`: no row of a changed configuration can carry the preset's label."""
        preset = self.presets[self.preset_name]
        skip = {"arch"} | self.bookkeeping_options | self.labelled_options
        return [
            f"{k}={v}"
            for k, v in self.hparams.items()
            if k not in skip and (k not in preset or _as_list(preset[k]) != _as_list(v))
        ]

    @property
    def label(self) -> str:
        """Column label in tables: name plus preset (when there are several; a preset whose values
        equal the ``paper`` preset's is called ``paper``), backbone architecture and weights kind
        (``imagenet`` | ``random-init`` | ``file``) for methods with an ``arch`` hyper-parameter,
        e.g. ``gaussian [paper, mobilenet_v2, file]``; other methods show their weights tag unless
        it is ``imagenet`` / ``n/a``; then one tag per option set to a non-official value
        (:meth:`label_tags`) and one per option overridden in the suite (:meth:`override_tags`)."""
        tags = []
        if len(self.presets) > 1:
            same_as_paper = self.presets[self.preset_name] == self.presets.get("paper")
            tags.append("paper" if same_as_paper else self.preset_name)
        arch = self.hparams.get("arch")
        if arch:
            tags.append(str(arch))
            if self.weights_tag != "n/a":
                tags.append(self.weights_tag.split(":", 1)[0])
        elif self.weights_tag not in ("imagenet", "n/a"):
            tags.append(self.weights_tag)
        tags += self.label_tags() + self.override_tags()
        return f"{self.name} [{', '.join(tags)}]" if tags else self.name

    def describe(self) -> dict[str, Any]:
        """Everything that changes the numbers (goes into the config hash)."""
        return {
            "method": self.name,
            "protocol": self.protocol,
            "preset": self.preset_name,
            "hparams": self.hparams,
            "weights": self.config.weights,
            "image_size": self.config.image_size,
            "seed": self.config.seed,
        }


def _as_list(value: Any) -> Any:
    """Tuples as lists (a TOML option gives a list where a preset has a tuple)."""
    return list(value) if isinstance(value, tuple) else value
