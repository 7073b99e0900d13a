"""Cheap identities of what changes a method's numbers: files, data folders, weights, code.

Used by :func:`fsad_bench.run.plan.config_hash` (record ids and the trained-model cache key), so
that a record or a cached model is reused only when its inputs are unchanged:

* :func:`file_sha256` — content hash of a file (weights), cached in ``<cache>/file_hashes.json``
  by (path, size, mtime): a 45 MB checkpoint is read once, then costs one ``stat``;
* :func:`tree_fingerprint` — a folder's identity from its file list, sizes and mtimes (no read),
  symbolic links followed (files and folders, cycles cut) and their targets included;
* :func:`sampled_sha256` / :func:`content_sha256` — a file's content identity without a cache:
  its size and first and last 64 KiB (cheap), or all of it (exact);
* :func:`module_fingerprint` — the source of some modules and what they import from ``fsad_bench``
  (the decoded-image cache keys on its decoding code's);
* :func:`write_with_digest` / :func:`digest_problem` / :func:`discard_corrupt` — cached files (trained
  models, features) written with their size and sha256 in a sidecar ``<file>.json``, checked before
  they are loaded, deleted with one :class:`CorruptFileWarning` line when they fail;
* :func:`weights_fingerprint` — ``--weights`` resolved to file contents (``auto`` / ``imagenet``:
  every checkpoint in torch's hub cache; a path: that file);
* :func:`code_fingerprint` — the source of the modules that compute a method's numbers: the
  adapter's module and the run modules of :data:`NUMBER_MODULES` (fits and the model cache, seeds,
  streamed prediction), with every module they import from the adapter's package and from
  ``fsad_bench``, transitively (data reading and decoding, sampling, metrics, protocols, components).
  The walk neither hashes nor follows the modules of :data:`NOT_NUMBERS` (scheduling, planning,
  paths, devices and memory measurement, records, reports, the CLI). Editing the code of a hashed file
  makes earlier records and cached models of that method stale; editing an excluded one, or only the
  comments, docstrings or blank lines of a hashed one (:func:`code_text`), does not.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import io
import json
import os
import stat
import sys
import tempfile
import tokenize
import warnings
from collections.abc import Callable
from pathlib import Path

HASH_CACHE_FILE = "file_hashes.json"

#: Run modules that compute numbers; hashed into every method's fingerprint with what they import.
NUMBER_MODULES = ("fsad_bench.run.cell", "fsad_bench.run.model_cache", "fsad_bench.run.predict", "fsad_bench.run.seeds")

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
    "fsad_bench.registry": "names -> adapter classes (each class's own code is hashed)",
    "fsad_bench.budgets": "what budget sweeps measured of the cpu presets: label tags only",
    "fsad_bench.errors": "the one-line user error",
    "fsad_bench.data.support_lists": "the SHA-256 check of a support list's files (refuses, never changes which "
    "files are used: the list's text is in config_hash), writing lists",
    "fsad_bench.identity": "content identities and checked cache files: what an input is, never a number "
    "(a change in how config_hash identifies inputs changes cell ids by itself)",
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
    """Identity of a folder from its resolved path and every file's relative path, size and mtime.

    Symbolic links are followed, to files and to folders (a folder met again below itself, a link
    cycle, is not re-entered); each link adds its relative path, its text and its resolved target,
    so that retargeting a link to identical-looking files changes the identity too. A tree without
    links has the identity it always had (the same bytes hashed in the same order)."""
    folder = Path(folder).resolve()
    h = hashlib.sha256(str(folder).encode())
    for *_, line in sorted(_tree_lines(folder)):
        h.update(line.encode())
    return h.hexdigest()


def _tree_lines(folder: Path) -> list[tuple[Path, int, str]]:
    """(relative path, kind, hashed text) of every file and link under ``folder``, links followed."""
    lines: list[tuple[Path, int, str]] = []

    def walk(directory: Path, rel: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:  # unreadable folder: skipped, as rglob did
            return
        for entry in entries:
            path, r = Path(entry.path), rel / entry.name
            if entry.is_symlink():
                try:
                    text = os.readlink(path)
                except OSError:
                    text = "?"
                lines.append((r, 1, f"\0{r}|->{text}|{os.path.realpath(path)}"))
            try:
                st = path.stat()  # follows links
            except OSError:  # a dangling link: its line above says where it pointed
                continue
            if stat.S_ISDIR(st.st_mode):
                here = (st.st_dev, st.st_ino)
                if here in ancestors:  # a link cycle: recorded (line above), not walked again
                    continue
                walk(path, r, ancestors | {here})
            elif stat.S_ISREG(st.st_mode):
                lines.append((r, 0, f"\0{r}|{st.st_size}|{st.st_mtime_ns}"))

    st = folder.stat() if folder.is_dir() else None
    if st is not None:
        walk(folder, Path(), frozenset({(st.st_dev, st.st_ino)}))
    return lines


#: Bytes read from each end of a file by :func:`sampled_sha256`.
SAMPLE_BYTES = 1 << 16


def sampled_sha256(path: str | Path, block: int = SAMPLE_BYTES) -> str:
    """sha256 of a file's size, first ``block`` and last ``block`` bytes (the whole file when it is at
    most ``2 * block`` bytes): two reads whatever the size. It sees every change to a PNG's pixels
    (the zlib Adler-32 and the chunk CRC sit at the end) but not a same-size edit in the middle of a
    larger uncompressed or JPEG file: :func:`content_sha256` is exact."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(f"{size}|".encode())
        if size <= 2 * block:
            h.update(f.read())
        else:
            h.update(f.read(block))
            f.seek(size - block)
            h.update(f.read(block))
    return h.hexdigest()


def content_sha256(path: str | Path) -> str:
    """sha256 of a file's whole content, read now (no cache: see :func:`file_sha256` for one)."""
    return _sha256_file(Path(path))


class CorruptFileWarning(UserWarning):
    """A cached file failed its size / sha256 check or could not be loaded: deleted and recomputed."""


def digest_path(path: Path) -> Path:
    """The sidecar of a cached file: ``<file>.json`` with its ``size`` (bytes) and ``sha256``."""
    return path.with_name(path.name + ".json")


def write_with_digest(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(temporary path)`` with its size and sha256 in :func:`digest_path`;
    both replaced atomically, the sidecar first (a file never appears without a sidecar; two writers
    racing may leave a file and another's sidecar, which fails the check: a recomputation, never a
    wrong load). OSError when the folder is not writable (nothing partial is left)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    side = digest_path(path)
    side_tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        side_tmp.write_text(json.dumps({"size": tmp.stat().st_size, "sha256": _sha256_file(tmp)}))
        os.replace(side_tmp, side)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)


def digest_problem(path: Path) -> str | None:
    """None when ``path`` has the size and sha256 its sidecar says; else what is wrong, in words.
    Cost: one read of the file (sha256: ~1 ms per MB)."""
    try:
        info = json.loads(digest_path(path).read_text())
        expected_size, expected_sha = int(info["size"]), str(info["sha256"])
    except FileNotFoundError:
        return f"no size/sha256 record {digest_path(path).name} beside it"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable size/sha256 record {digest_path(path).name}"
    try:
        size = path.stat().st_size
        if size != expected_size:
            return f"{size} bytes, {expected_size} written (truncated or overwritten)"
        if _sha256_file(path) != expected_sha:
            return "content differs from the sha256 written (damaged)"
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    return None


def discard_corrupt(path: Path, what: str, why: str, action: str) -> None:
    """One warning line naming ``path`` and why it is unusable; the file and its sidecar deleted."""
    warnings.warn_explicit(f"{what} {path} is unusable ({why}): deleted, {action}", CorruptFileWarning, "fsad-bench", 0)
    for p in (path, digest_path(path)):
        try:
            p.unlink(missing_ok=True)
        except OSError:  # a read-only cache: the next run checks (and warns) again
            pass


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
    """One module's source as the fingerprint reads it (a seam for tests); :func:`code_text` of it is hashed."""
    return path.read_bytes()


_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def code_text(source: bytes) -> bytes:
    """``source`` without what cannot change a number: comments, docstrings, blank lines and trailing
    spaces (a source that does not parse is returned unchanged). Editing a comment or a docstring then
    leaves every fingerprint, record and cached model valid; any other edit, layout within a line included,
    changes it. Pure text surgery at the tokens' positions, so the result is the same on every Python."""
    try:
        text = source.decode("utf-8")
        tree = ast.parse(text)
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, ValueError, tokenize.TokenError):  # UnicodeDecodeError is a ValueError
        return source
    docstrings = {
        (node.body[0].lineno, node.body[0].col_offset)
        for node in ast.walk(tree)
        if isinstance(node, _DOCSTRING_OWNERS)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
        and isinstance(node.body[0].value.value, str)
    }
    lines = io.StringIO(text).readlines()  # the lines tokenize numbers (split at "\n" only)
    cuts = [
        (t.start, t.end)
        for t in tokens
        if t.type == tokenize.COMMENT or (t.type == tokenize.STRING and t.start in docstrings)
    ]
    for (r0, c0), (r1, c1) in reversed(cuts):  # later cuts first: earlier positions stay valid
        if r0 == r1:
            lines[r0 - 1] = lines[r0 - 1][:c0] + lines[r0 - 1][c1:]
        else:
            lines[r0 - 1 : r1] = [lines[r0 - 1][:c0], *[""] * (r1 - r0 - 1), lines[r1 - 1][c1:]]
    return "\n".join(line.rstrip() for line in lines if line.strip()).encode()


def _hashed_modules(module: str, file: str) -> dict[str, str]:
    """Module name -> sha256 of its source, for every module :func:`code_fingerprint` hashes."""
    return _walk_sources(
        [(module, Path(file)), *((n, None) for n in NUMBER_MODULES)], {module.split(".")[0], "fsad_bench"}
    )


def _walk_sources(todo: list[tuple[str, Path | None]], roots: set[str]) -> dict[str, str]:
    """Module name -> sha256 of its source for the modules of ``todo`` and, transitively, what they
    import from the packages ``roots`` (the modules of :data:`NOT_NUMBERS` neither hashed nor followed)."""
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
        seen[name] = hashlib.sha256(code_text(source)).hexdigest()
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        todo += [
            (n, None)
            for n in _imports(name, path, tree, roots)
            if n.split(".")[0] in roots and n not in seen and counts_for_numbers(n)
        ]
    return {n: h for n, h in seen.items() if h}


@functools.cache
def _code_fingerprint(module: str, file: str) -> str:
    files = sorted(_hashed_modules(module, file).items())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


@functools.cache
def module_fingerprint(*modules: str) -> str:
    """Hash of the source of ``modules`` and of every module they import from ``fsad_bench``,
    transitively (found without importing them; remembered per process: ``cache_clear()`` after
    editing a source in a test)."""
    files = sorted(_walk_sources([(m, None) for m in modules], {"fsad_bench"}).items())
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
