"""Method registry: built-in adapters plus third-party ones from the entry-point group
``fsad_bench.methods`` (``mymethod = "mypkg.module:MyAdapter"`` in their pyproject)."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from .adapter import Adapter
from .errors import FsadError

ENTRY_POINT_GROUP = "fsad_bench.methods"

#: name -> "module:Class" (modules under fsad_bench.methods, imported on first use).
BUILTIN: dict[str, str] = {
    "random": "fsad_bench.methods.random_scorer:RandomScorer",
    "gaussian": "fsad_bench.methods.gaussian:GaussianAdapter",
}


def _targets() -> dict[str, str]:
    targets = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        targets.setdefault(ep.name, ep.value)
    return targets


def available() -> list[str]:
    """Names of every registered method."""
    return sorted(_targets())


def get(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``; FsadError for unknown names."""
    targets = _targets()
    if name not in targets:
        raise FsadError(f"unknown method {name!r} (registered: {', '.join(sorted(targets))})")
    module, _, attr = targets[name].partition(":")
    cls = getattr(import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise FsadError(f"method {name!r} ({targets[name]}) is not an fsad_bench Adapter subclass")
    return cls
