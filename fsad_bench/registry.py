"""Method registry: built-in adapters plus third-party ones from the entry-point group
``fsad_bench.methods`` (``mymethod = "mypkg.module:MyAdapter"`` in their pyproject), and
prefixed families: ``anomalib:<Model>`` resolves through ``fsad_bench.methods.anomalib_models``
(listed when the ``anomalib`` extra is installed).

Importing this module imports no torch: adapter classes (and :mod:`fsad_bench.adapter`) are imported
by :func:`get` / :func:`register`; :func:`available` and :func:`info` answer for the built-ins from
:data:`INFO`, a static copy of their class attributes that ``tests/test_startup.py`` keeps equal to
the classes (``fsad-bench methods`` and ``--help`` start without loading torch)."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, NamedTuple

from fsad_bench.errors import FsadError

if TYPE_CHECKING:
    from fsad_bench.adapter import Adapter

ENTRY_POINT_GROUP = "fsad_bench.methods"

#: name -> "module:Class" (modules under fsad_bench.methods, imported on first use).
BUILTIN: dict[str, str] = {
    "random": "fsad_bench.methods.random_scorer:RandomScorer",
    "gaussian": "fsad_bench.methods.gaussian:GaussianAdapter",
    "inctrl": "fsad_bench.methods.inctrl.adapter:InCTRL",
    "diffnet": "fsad_bench.methods.diffnet.adapter:DiffNet",
    "diffnet+": "fsad_bench.methods.diffnet.adapter:DiffNetPlus",
    "tdg": "fsad_bench.methods.tdg.adapter:TDG",
    "tdg+": "fsad_bench.methods.tdg.adapter:TDGPlus",
    "regad": "fsad_bench.methods.regad.adapter:RegAD",
    "regad-l": "fsad_bench.methods.regad.adapter:RegADL",
    "patchcore": "fsad_bench.methods.patchcore:PatchCore",
}


class MethodInfo(NamedTuple):
    """What ``fsad-bench methods`` lists: the class attributes ``protocol``, ``presets`` (names) and ``paper``."""

    protocol: str
    presets: tuple[str, ...]
    paper: str


_REGAD = "Huang et al., Registration based Few-Shot Anomaly Detection, ECCV 2022"
#: The built-in and prefixed classes' attributes, without importing them (a test keeps them equal).
INFO: dict[str, MethodInfo] = {
    "random": MethodInfo("training-free", ("cpu",), "chance level"),
    "gaussian": MethodInfo("training-free", ("cpu", "paper", "padim"),
                           "PaDiM (Defard et al., ICPR 2020); RegAD's Table 5 row A (Huang et al., ECCV 2022)"),
    "inctrl": MethodInfo("cross-dataset", ("paper", "cpu"),
                         "InCTRL (Zhu & Pang, CVPR 2024): generalist AD via in-context residual learning"),
    "diffnet": MethodInfo("individual", ("paper", "cpu"), "DifferNet (Rudolph et al., WACV 2021)"),
    "diffnet+": MethodInfo("aggregated", ("paper", "cpu"), "DiffNet+ baseline of RegAD (Huang et al., ECCV 2022), "
                           "after DifferNet (Rudolph et al., WACV 2021)"),
    "tdg": MethodInfo("individual", ("paper", "cpu"), "Sheynin, Benaim, Wolf: A Hierarchical "
                      "Transformation-Discriminating Generative Model for FSAD (ICCV 2021)"),
    "tdg+": MethodInfo("aggregated", ("paper", "cpu"),
                       "TDG with aggregated training, as compared in RegAD (Huang et al., ECCV 2022)"),
    "regad": MethodInfo("aggregated", ("paper", "cpu"), _REGAD),
    "regad-l": MethodInfo("individual", ("paper", "cpu"), _REGAD),
    "patchcore": MethodInfo("training-free", ("cpu", "paper"), "PatchCore (Roth et al., CVPR 2022)"),
    "anomalib:Padim": MethodInfo("training-free", ("cpu",), "anomalib PadimModel — PaDiM (Defard et al., ICPR 2020)"),
    "anomalib:Patchcore": MethodInfo("training-free", ("cpu",),
                                     "anomalib PatchcoreModel — PatchCore (Roth et al., CVPR 2022)"),
    "anomalib:WinClip": MethodInfo("training-free", ("cpu",),
                                   "anomalib WinClipModel — WinCLIP+ (Jeong et al., CVPR 2023)"),
}


#: "prefix:" -> module with ``names() -> list[str]`` and ``get(suffix) -> Adapter subclass``.
PREFIXES: dict[str, str] = {"anomalib:": "fsad_bench.methods.anomalib_models"}
#: "prefix:" -> (the models its module wraps, the package they need): listed when that package is
#: installed, without importing the module (a test keeps the models equal to the module's ``MODELS``).
PREFIXED: dict[str, tuple[tuple[str, ...], str]] = {"anomalib:": (("Padim", "Patchcore", "WinClip"), "anomalib")}


#: Adapters registered at run time with :func:`register` (notebooks, tests).
_REGISTERED: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Register an adapter class under ``cls.name`` for this process (usable as a decorator)."""
    from fsad_bench.adapter import Adapter

    if not (isinstance(cls, type) and issubclass(cls, Adapter) and cls.name):
        raise TypeError("register() takes an Adapter subclass with a non-empty `name`")
    _REGISTERED[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def _targets() -> dict[str, str]:
    targets = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        targets.setdefault(ep.name, ep.value)
    return targets


def _installed(package: str) -> bool:
    """Whether ``package`` is importable and installed (what ``anomalib_models.anomalib_version`` checks)."""
    try:
        from importlib.metadata import version
        from importlib.util import find_spec

        return find_spec(package) is not None and bool(version(package))
    except Exception:  # noqa: BLE001 (not installed, or blocked: sys.modules[package] = None)
        return False


def available() -> list[str]:
    """Names of every registered method."""
    prefixed = {prefix + m for prefix, (models, package) in PREFIXED.items() if _installed(package) for m in models}
    return sorted(set(_targets()) | set(_REGISTERED) | prefixed)


def info(name: str) -> MethodInfo:
    """Protocol, preset names and paper of ``name``: from :data:`INFO` for a built-in (no import), else
    from its class (:func:`get`)."""
    if name in INFO and name not in _REGISTERED and (name in BUILTIN or any(name.startswith(p) for p in PREFIXES)):
        return INFO[name]
    cls = get(name)
    return MethodInfo(cls.protocol, tuple(cls.presets), cls.paper)


def get(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``; FsadError for unknown names."""
    from fsad_bench.adapter import Adapter

    if name in _REGISTERED:
        return _REGISTERED[name]
    for prefix, module in PREFIXES.items():
        if name.startswith(prefix):
            return import_module(module).get(name[len(prefix):])
    targets = _targets()
    if name not in targets:
        raise FsadError(f"unknown method {name!r} (registered: {', '.join(available())})")
    module, _, attr = targets[name].partition(":")
    cls = getattr(import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise FsadError(f"method {name!r} ({targets[name]}) is not an fsad_bench Adapter subclass")
    return cls
