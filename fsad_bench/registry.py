"""Method registry: built-in adapters plus third-party ones from the entry-point group
``fsad_bench.methods`` (``mymethod = "mypkg.module:MyAdapter"`` in their pyproject), and
prefixed families: ``anomalib:<Model>`` resolves through ``fsad_bench.methods.anomalib_models``
(listed when the ``anomalib`` extra is installed), and *variants*: ``<method>@<option>=<value>[,...]``
(e.g. ``diffnet+@finetune_epochs=48``, what a suite's ``[sweep.<method>]`` expands into) is the method
with those options fixed, a method of its own for every layer downstream (:func:`variant_name`).

Importing this module imports no torch: adapter classes (and :mod:`fsad_bench.adapter`) are imported
by :func:`get` / :func:`register`; :func:`available` and :func:`info` answer for the built-ins from
:data:`INFO`, a static copy of their class attributes that ``tests/test_startup.py`` keeps equal to
the classes (``fsad-bench methods`` and ``--help`` start without loading torch)."""

from __future__ import annotations

import json
import re
from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, NamedTuple

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
    "gaussian": MethodInfo(
        "training-free",
        ("cpu", "paper", "padim"),
        "PaDiM (Defard et al., ICPR 2020); RegAD's Table 5 row A (Huang et al., ECCV 2022)",
    ),
    "inctrl": MethodInfo(
        "cross-dataset",
        ("paper", "cpu"),
        "InCTRL (Zhu & Pang, CVPR 2024): generalist AD via in-context residual learning",
    ),
    "diffnet": MethodInfo("individual", ("paper", "cpu"), "DifferNet (Rudolph et al., WACV 2021)"),
    "diffnet+": MethodInfo(
        "aggregated",
        ("paper", "cpu"),
        "DiffNet+ baseline of RegAD (Huang et al., ECCV 2022), after DifferNet (Rudolph et al., WACV 2021)",
    ),
    "tdg": MethodInfo(
        "individual",
        ("paper", "cpu"),
        "Sheynin, Benaim, Wolf: A Hierarchical Transformation-Discriminating Generative Model for FSAD (ICCV 2021)",
    ),
    "tdg+": MethodInfo(
        "aggregated", ("paper", "cpu"), "TDG with aggregated training, as compared in RegAD (Huang et al., ECCV 2022)"
    ),
    "regad": MethodInfo("aggregated", ("paper", "cpu"), _REGAD),
    "regad-l": MethodInfo("individual", ("paper", "cpu"), _REGAD),
    "patchcore": MethodInfo("training-free", ("cpu", "paper"), "PatchCore (Roth et al., CVPR 2022)"),
    "anomalib:Padim": MethodInfo("training-free", ("cpu",), "anomalib PadimModel — PaDiM (Defard et al., ICPR 2020)"),
    "anomalib:Patchcore": MethodInfo(
        "training-free", ("cpu",), "anomalib PatchcoreModel — PatchCore (Roth et al., CVPR 2022)"
    ),
    "anomalib:WinClip": MethodInfo(
        "training-free", ("cpu",), "anomalib WinClipModel — WinCLIP+ (Jeong et al., CVPR 2023)"
    ),
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
    """The adapter class registered as ``name``; FsadError for unknown names. A variant name
    (``base@option=value,...``) gives a subclass of the base's class (:func:`variant_class`)."""
    if VARIANT_MARK in name and name not in _REGISTERED:
        base, options = split_variant(name)
        return variant_class(get(base), options, base)
    from fsad_bench.adapter import Adapter

    if name in _REGISTERED:
        return _REGISTERED[name]
    for prefix, module in PREFIXES.items():
        if name.startswith(prefix):
            return import_module(module).get(name[len(prefix) :])
    targets = _targets()
    if name not in targets:
        raise FsadError(f"unknown method {name!r} (registered: {', '.join(available())})")
    module, _, attr = targets[name].partition(":")
    cls = getattr(import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise FsadError(f"method {name!r} ({targets[name]}) is not an fsad_bench Adapter subclass")
    return cls


# -- variants: a method with some options fixed (what a suite's [sweep.<method>] expands into) ---------
#: separates a variant's base method from its options: ``diffnet+@finetune_epochs=48``
VARIANT_MARK = "@"
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VARIANTS: dict[tuple[type, str], type[Adapter]] = {}


def _value_text(value: Any) -> str:
    """An option value as written in a variant name: JSON without spaces (``48``, ``0.001``, ``true``,
    ``[0.8,0.8]``); a string as itself unless it would read back as something else or holds ``,``."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            if "," not in value and value.strip() == value:
                return value
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def variant_name(base: str, options: dict[str, Any]) -> str:
    """``base@key=value,key=value`` (keys in the given order): the name of ``base`` run with ``options``
    fixed. FsadError when a key is not an option name or a value does not read back the same."""
    if VARIANT_MARK in base:
        raise FsadError(f"cannot make a variant of the variant {base!r}: name its base method")
    if not options:
        return base
    for key in options:
        if not _KEY.fullmatch(str(key)):
            raise FsadError(f"variant of {base!r}: {key!r} is not an option name (letters, digits, _)")
    name = base + VARIANT_MARK + ",".join(f"{k}={_value_text(v)}" for k, v in options.items())
    back = split_variant(name)[1]
    if back != options or any(type(back[k]) is not type(v) for k, v in options.items()):
        raise FsadError(
            f"variant of {base!r}: the values {options!r} cannot be written in a method name "
            f"(numbers, true/false, strings and lists of them can)"
        )
    return name


def split_variant(name: str) -> tuple[str, dict[str, Any]]:
    """``("diffnet+", {"finetune_epochs": 48})`` for ``"diffnet+@finetune_epochs=48"``; ``(name, {})``
    for a plain method name. FsadError for a malformed variant name."""
    base, mark, text = name.partition(VARIANT_MARK)
    if not mark:
        return name, {}
    options: dict[str, Any] = {}
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(text):
        key = _KEY.match(text, pos)
        if key is None or text[key.end() : key.end() + 1] != "=":
            raise FsadError(f"malformed method variant {name!r} (expected {base}@option=value[,option=value...])")
        pos = key.end() + 1
        try:
            value, end = decoder.raw_decode(text, pos)
            if end < len(text) and text[end] != ",":
                raise ValueError
        except ValueError:  # a plain string runs to the next comma
            end = text.find(",", pos)
            end = len(text) if end < 0 else end
            value = text[pos:end]
        if key.group() in options:
            raise FsadError(f"method variant {name!r} sets {key.group()!r} twice")
        options[key.group()] = value
        pos = end + 1 if end < len(text) else end
        if end < len(text) and pos == len(text):
            raise FsadError(f"malformed method variant {name!r} (ends in a comma)")
    if not base or not options:
        raise FsadError(f"malformed method variant {name!r} (expected METHOD@option=value[,option=value...])")
    return base, options


def method_names(text: str) -> list[str]:
    """Comma-separated method names (the CLI's ``--methods``), a variant's own commas kept:
    ``"random,diffnet+@meta_epochs=3,finetune_epochs=48"`` is two methods."""
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        last = out[-1] if out else ""
        open_ = last.count("[") > last.count("]") or last.count("{") > last.count("}") or last.count('"') % 2
        if VARIANT_MARK in last and (open_ or (VARIANT_MARK not in piece and re.match(r"[A-Za-z_]\w*=", piece))):
            out[-1] = f"{last},{piece}"
        else:
            out.append(piece)
    return out


def base_name(name: str) -> str:
    """The method a variant name is based on (``diffnet+`` for ``diffnet+@finetune_epochs=48``); a plain name itself."""
    return name.partition(VARIANT_MARK)[0]


def variant_class(base: type[Adapter], options: dict[str, Any], base_method: str | None = None) -> type[Adapter]:
    """The subclass of ``base`` that runs with ``options`` fixed (checked by ``base.check_options``);
    ``base_method``: the registry name of ``base`` (default ``base.name``).

    ``name`` is the variant name, ``base_method`` / ``variant_options`` say what it varies; its
    ``hparams`` are the preset's values overridden by the suite's options and then by ``options``;
    its label is the base's name with one ``key=value`` tag per fixed option (also when the value is
    the preset's: the values of a sweep stay apart), e.g. ``diffnet+ [cpu, alexnet, finetune_epochs=48]``.
    Its module is the base's (the code fingerprint is the base's). One class per name and base."""
    base_method = base_method or base.name
    name = variant_name(base_method, options)
    key = (base, name)
    if key in _VARIANTS:
        return _VARIANTS[key]
    base.check_options(options, f"method {name!r}")
    fixed = dict(options)

    class Variant(base):  # type: ignore[misc, valid-type]
        variant_options = fixed

        @classmethod
        def resolve_hparams(cls, preset: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
            return super().resolve_hparams(preset, {**(options or {}), **fixed})

        def override_tags(self) -> list[str]:
            shown = [k for k in fixed if k != "arch"]  # the architecture has its own tag
            tags = [t for t in super().override_tags() if t.partition("=")[0] not in shown]
            return tags + [f"{k}={self.hparams[k]}" for k in shown]

        @property
        def label(self) -> str:
            return base_method + super().label[len(name) :]

    Variant.name, Variant.base_method = name, base_method
    Variant.__name__ = Variant.__qualname__ = f"{base.__name__}Variant"
    Variant.__module__ = base.__module__
    Variant.__doc__ = f"{base_method} with {', '.join(f'{k}={v!r}' for k, v in fixed.items())} fixed."
    _VARIANTS[key] = Variant
    return Variant
