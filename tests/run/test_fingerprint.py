"""The code fingerprint (part of every cell id and cached-model key) hashes the modules that compute
numbers, and only those: editing a number module makes a method's records stale, editing scheduling,
storage, reports or the CLI does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import fsad_bench
from fsad_bench import identity, registry
from fsad_bench.protocols import __file__ as protocols_file

PACKAGE = Path(fsad_bench.__file__).resolve().parent


def _fingerprint(monkeypatch, cls, edited: Path | None = None, line: bytes = b"EDITED = 1") -> str:
    """``code_fingerprint(cls)`` as if ``edited`` had one more ``line`` (the hasher's reads patched)."""
    original = identity._source
    target = edited.resolve() if edited else None
    monkeypatch.setattr(
        identity, "_source", lambda p: original(p) + (b"\n" + line + b"\n" if Path(p).resolve() == target else b"")
    )
    identity.code_fingerprint.cache_clear()
    try:
        return identity.code_fingerprint(cls)
    finally:
        identity.code_fingerprint.cache_clear()
        monkeypatch.setattr(identity, "_source", original)


NUMBERS = [
    "run/cell.py",
    "run/predict.py",
    "run/seeds.py",
    "run/model_cache.py",
    "metrics.py",
    "data/images.py",
    "data/torch_datasets.py",
    "data/sampler.py",
    "data/image_cache.py",
    "adapter.py",
]
NOT_NUMBERS = [
    "run/schedule.py",
    "run/plan.py",
    "run/paths.py",
    "run/workers.py",
    "run/devices.py",
    "run/peak_memory.py",
    "records/store.py",
    "records/tracking.py",
    "report/tables.py",
    "cli.py",
    "identity.py",
    "registry.py",
    "errors.py",
]


@pytest.mark.parametrize("method", ["gaussian", "random"])
@pytest.mark.parametrize("rel", NUMBERS)
def test_editing_a_number_module_changes_the_fingerprint(method, rel, monkeypatch):
    cls = registry.get(method)
    assert (PACKAGE / rel).is_file()
    assert _fingerprint(monkeypatch, cls, PACKAGE / rel) != _fingerprint(monkeypatch, cls)


def test_editing_the_adapter_or_the_protocols_changes_the_fingerprint(monkeypatch):
    cls = registry.get("gaussian")
    base = _fingerprint(monkeypatch, cls)
    assert _fingerprint(monkeypatch, cls, Path(sys.modules[cls.__module__].__file__)) != base
    assert _fingerprint(monkeypatch, cls, Path(protocols_file)) != base  # training_data: which images reach fit


@pytest.mark.parametrize("rel", NOT_NUMBERS)
def test_editing_scheduling_storage_reports_or_cli_keeps_the_fingerprint(rel, monkeypatch):
    cls = registry.get("gaussian")
    assert (PACKAGE / rel).is_file()
    assert _fingerprint(monkeypatch, cls, PACKAGE / rel) == _fingerprint(monkeypatch, cls)


def test_declared_module_lists_name_existing_modules():
    """NUMBER_MODULES and NOT_NUMBERS stay true to the code: every name is a module or package."""
    for name in (*identity.NUMBER_MODULES, *identity.NOT_NUMBERS):
        assert identity._module_file(name) is not None, name
    assert not [n for n in identity.NUMBER_MODULES if not identity.counts_for_numbers(n)]
    hashed = identity.fingerprinted_modules(registry.get("gaussian"))
    assert set(identity.NUMBER_MODULES) <= set(hashed)
    assert all(identity.counts_for_numbers(n) for n in hashed)


def test_fingerprint_does_not_depend_on_what_the_process_imported(tmp_path):
    """A process that imported nothing of the run layer hashes the same files as one that did.

    The child runs outside the checkout (``cwd=tmp_path``): with a regular install, ``python -c`` in the
    repository root would import the checkout's ``fsad_bench/``, which has no ``methods`` subpackage.
    """
    import fsad_bench.run.schedule  # noqa: F401  (this process: the whole run layer)

    identity.code_fingerprint.cache_clear()
    here = identity.code_fingerprint(registry.get("gaussian"))
    code = (
        "import sys; from fsad_bench import registry; from fsad_bench.identity import code_fingerprint; "
        "assert 'fsad_bench.run' not in sys.modules; print(code_fingerprint(registry.get('gaussian')))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == here


MODULE = b'''"""Module doc."""

import torch  # the backend


def scale(x):
    """Doubles ``x``.

    Shape kept."""
    # a comment line
    return 2 * x  # trailing


class Model:
    "one-line doc"

    width = 3
'''


@pytest.mark.parametrize(
    "edited",
    [
        MODULE.replace(b"# the backend", b"# the one backend"),
        MODULE.replace(b"Doubles ``x``.", b"Twice ``x`` (float, unit-free).\n\n    More."),
        MODULE.replace(b'"one-line doc"', b'"""Another doc."""'),
        MODULE.replace(b'"""Module doc."""\n', b""),
        MODULE.replace(b"    # a comment line\n", b"\n\n"),
        MODULE.replace(b"  # trailing", b"   "),
        MODULE + b"\n# the end\n\n",
    ],
)
def test_comments_docstrings_and_blank_lines_do_not_count(edited):
    assert identity.code_text(edited) == identity.code_text(MODULE)


@pytest.mark.parametrize(
    "edited",
    [
        MODULE.replace(b"2 * x", b"3 * x"),
        MODULE.replace(b"width = 3", b'width = 3\n    "not a docstring"'),
        MODULE.replace(b"return 2 * x", b'"# not a comment"\n    return 2 * x'),
        MODULE.replace(b"import torch", b"import numpy"),
        MODULE.replace(b"    width = 3", b"    width = 3\n    depth = 1"),
    ],
)
def test_every_other_edit_counts(edited):
    assert identity.code_text(edited) != identity.code_text(MODULE)


def test_a_source_that_does_not_parse_is_hashed_as_it_is():
    assert identity.code_text(b"def broken(:\n") == b"def broken(:\n"
    assert identity.code_text(b"\xff\xfe") == b"\xff\xfe"


def test_comment_only_edit_of_a_number_module_keeps_the_fingerprint(monkeypatch):
    cls, cell = registry.get("gaussian"), PACKAGE / "run/cell.py"
    assert _fingerprint(monkeypatch, cls, cell, b"# a note") == _fingerprint(monkeypatch, cls)
