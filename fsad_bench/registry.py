"""Method registry: built-in adapters plus third-party ones from the entry-point group
``fsad_bench.methods`` (``mymethod = "mypkg.module:MyAdapter"`` in their pyproject), and
prefixed families: ``anomalib:<Model>`` resolves through ``fsad_bench.methods.anomalib_models``
(listed when the ``anomalib`` extra is installed)."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from fsad_bench.adapter import Adapter
from fsad_bench.errors import FsadError

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


#: "prefix:" -> module with ``names() -> list[str]`` and ``get(suffix) -> Adapter subclass``.
PREFIXES: dict[str, str] = {"anomalib:": "fsad_bench.methods.anomalib_models"}


#: Adapters registered at run time with :func:`register` (notebooks, tests).
_REGISTERED: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Register an adapter class under ``cls.name`` for this process (usable as a decorator)."""
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


def available() -> list[str]:
    """Names of every registered method."""
    prefixed = {n for module in PREFIXES.values() for n in import_module(module).names()}
    return sorted(set(_targets()) | set(_REGISTERED) | prefixed)


def get(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``; FsadError for unknown names."""
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
