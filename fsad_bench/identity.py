"""Cheap identities of what changes a method's numbers: files, data folders, weights, code.

Used by :func:`fsad_bench.run.plan.config_hash` (record ids and the trained-model cache key), so
that a record or a cached model is reused only when its inputs are unchanged:

* :func:`file_sha256` — content hash of a file (weights), cached in ``<cache>/file_hashes.json``
  by (path, size, mtime): a 45 MB checkpoint is read once, then costs one ``stat``;
* :func:`tree_fingerprint` — a folder's identity from its file list, sizes and mtimes (no read);
* :func:`weights_fingerprint` — ``--weights`` resolved to file contents (``auto`` / ``imagenet``:
  every checkpoint in torch's hub cache; a path: that file);
* :func:`code_fingerprint` — the source of the modules that compute a method's numbers: the
  adapter's module and the run modules of :data:`NUMBER_MODULES` (fits and the model cache, seeds,
  streamed prediction), with every module they import from the adapter's package and from
  ``fsad_bench``, transitively (data reading and decoding, sampling, metrics, protocols, components).
  The walk neither hashes nor follows the modules of :data:`NOT_NUMBERS` (scheduling, planning,
  paths, devices and memory measurement, records, reports, the CLI). Editing a hashed file makes
  earlier records and cached models of that method stale; editing an excluded one does not.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path

HASH_CACHE_FILE = "file_hashes.json"

#: Run modules that compute numbers; hashed into every method's fingerprint with what they import.
NUMBER_MODULES = ("fsad_bench.run.cell", "fsad_bench.run.model_cache", "fsad_bench.run.predict",
                  "fsad_bench.run.seeds")

#: Modules (a package: with every module under it) that change no score, map or metric: never hashed,
#: and their imports not followed (the number modules import some of them, e.g. the record store).
#: Name -> why it is excluded. A module here that starts computing numbers must leave this list.
NOT_NUMBERS = {
    "fsad_bench.run.schedule": "order and place of the groups (local processes, Dask)",
    "fsad_bench.run.workers": "local worker processes that die with the run",
    "fsad_bench.run.plan": "cells and config hashes (a config_hash change changes cell ids by itself), "
                           "validation, opening the datasets (their content is in config_hash)",
    "fsad_bench.run.paths": "where the cache folders are",
    "fsad_bench.run.devices": "choosing the device, CUDA sync before a clock read, peak memory",
    "fsad_bench.run.peak_memory": "peak RSS measurement and the frozen garbage collector",
    "fsad_bench.run.progress": "status files at stage changes, the progress display's counts and ETA",
    "fsad_bench.records": "storing records and example maps, MLflow tracking",
    "fsad_bench.report": "tables, significance, published numbers, costs, plots, export",
    "fsad_bench.cli": "the command line",
}


def counts_for_numbers(name: str) -> bool:
    """False for a module of :data:`NOT_NUMBERS` (or under a package there)."""
    return not any(name == n or name.startswith(n + ".") for n in NOT_NUMBERS)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path, cache: Path | None = None) -> str:
    """sha256 of ``path``'s content; with ``cache`` (a folder) remembered by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    store = cache / HASH_CACHE_FILE if cache else None
    known: dict[str, str] = {}
    if store and store.is_file():
        try:
            known = json.loads(store.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
    if key in known:
        return known[key]
    digest = _sha256_file(path)
    if store:
        known = {k: v for k, v in known.items() if not k.startswith(f"{path}|")}
        known[key] = digest
        tmp = None
        try:  # a read-only cache only costs a re-hash next time
            store.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".file_hashes.", suffix=".tmp", dir=store.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(known, f)
            os.replace(tmp, store)
        except OSError:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
    return digest


def tree_fingerprint(folder: str | Path) -> str:
    """Identity of a folder from its resolved path and every file's relative path, size and mtime."""
    folder = Path(folder).resolve()
    h = hashlib.sha256(str(folder).encode())
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"\0{p.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def weights_fingerprint(weights: str, cache: Path | None = None) -> str:
    """``--weights`` as content: ``none``; a file's sha256; for ``auto`` / ``imagenet`` the name and
    sha256 of every checkpoint in torch's hub cache (what those settings may load)."""
    if weights == "none":
        return "none"
    path = Path(weights).expanduser()
    if path.is_file():
        return "file:" + file_sha256(path, cache)
    if weights in ("auto", "imagenet"):
        import torch

        ckpt = Path(torch.hub.get_dir()) / "checkpoints"
        files = sorted(p for p in ckpt.glob("*") if p.is_file()) if ckpt.is_dir() else []
        return f"{weights}:" + ",".join(f"{p.name}={file_sha256(p, cache)[:16]}" for p in files)
    return weights


def _find_spec(name: str):
    """The module spec of ``name`` without importing it or its parent packages (the finders of
    ``sys.meta_path`` asked directly, as the import system would), so that a fingerprint does not
    depend on what the process happened to import."""
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__spec__", None) is not None:
        return mod.__spec__
    parent, _, _ = name.rpartition(".")
    path = None
    if parent:
        pspec = _find_spec(parent)
        if pspec is None or not pspec.submodule_search_locations:
            return None
        path = list(pspec.submodule_search_locations)
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        try:
            spec = find(name, path) if find else None
        except (ImportError, AttributeError, ValueError):
            spec = None
        if spec is not None:
            return spec
    return None


def _module_file(name: str) -> Path | None:
    mod = sys.modules.get(name)
    origin = getattr(mod, "__file__", None) if mod else None
    if origin is None:
        spec = _find_spec(name)  # never import a module just to fingerprint it
        origin = spec.origin if spec else None
    return Path(origin) if origin and origin.endswith(".py") else None


def _imports(name: str, path: Path, tree: ast.AST, roots: set[str]) -> list[str]:
    """Absolute names of the modules (and submodules of packages) imported by module ``name``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.append(base)
            base_file = _module_file(base) if base.split(".")[0] in roots else None
            if base_file is not None and base_file.name == "__init__.py":  # `from pkg import submodule`
                out += [f"{base}.{a.name}" for a in node.names]
    return out


def _source(path: Path) -> bytes:
    """What the fingerprint hashes of one module (a seam for tests)."""
    return path.read_bytes()


def _hashed_modules(module: str, file: str) -> dict[str, str]:
    """Module name -> sha256 of its source, for every module :func:`code_fingerprint` hashes."""
    roots = {module.split(".")[0], "fsad_bench"}
    todo: list[tuple[str, Path | None]] = [(module, Path(file)), *((n, None) for n in NUMBER_MODULES)]
    seen: dict[str, str] = {}
    while todo:
        name, path = todo.pop()
        if name in seen:
            continue
        path = path or _module_file(name)
        if path is None or not path.is_file():
            seen[name] = ""
            continue
        source = _source(path)
        seen[name] = hashlib.sha256(source).hexdigest()
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        todo += [(n, None) for n in _imports(name, path, tree, roots)
                 if n.split(".")[0] in roots and n not in seen and counts_for_numbers(n)]
    return {n: h for n, h in seen.items() if h}


@functools.lru_cache(maxsize=None)
def _code_fingerprint(module: str, file: str) -> str:
    files = sorted(_hashed_modules(module, file).items())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def _class_file(cls: type) -> str | None:
    try:
        file = inspect.getsourcefile(cls)
    except TypeError:
        file = None
    return str(Path(file).resolve()) if file else None


def fingerprinted_modules(cls: type) -> list[str]:
    """Names of the modules whose source :func:`code_fingerprint` hashes for ``cls`` (sorted)."""
    file = _class_file(cls)
    return sorted(_hashed_modules(cls.__module__, file)) if file else []


def code_fingerprint(cls: type) -> str:
    """Hash of the source of ``cls``'s module and of the modules its numbers depend on (see module doc)."""
    file = _class_file(cls)
    if not file:
        return "unknown-source"
    return _code_fingerprint(cls.__module__, file)


code_fingerprint.cache_clear = _code_fingerprint.cache_clear  # type: ignore[attr-defined]
