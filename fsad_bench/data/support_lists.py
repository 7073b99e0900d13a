"""Support-list files (``--support-lists``): the SHA-256 check of the files they name, writing them, and the
lists a finished run used.

The format :class:`fsad_bench.data.sampler.SupportSampler` reads, keys category, then k, then run::

    {"bottle": {"2": {"0": ["000.png", "017.png"], "1": [...]}},
     "_sha256": {"bottle": {"000.png": "9f86d0…", "017.png": "…"}},
     "_source": {...}}

File names are those of the category's normal training images (``<category>/train/good`` in the MVTec
layout). Keys starting with ``_`` are not categories: ``_sha256`` holds the SHA-256 (hex, of the whole
file) of every named file, so that a list can be checked against anyone's copy of the data; ``_source``
says where the list came from (``fsad-bench supports import`` / ``export``). A list without ``_sha256``
is read as before, unchecked.

The check refuses (one-line :class:`FsadError`), it never changes which files are used: the list's text
is part of every cell's configuration hash already (``run.plan.config_hash``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fsad_bench.errors import FsadError
from fsad_bench.identity import content_sha256

#: Key of the per-file SHA-256 table: ``{category: {file name: hex digest}}``.
HASHES = "_sha256"
#: Key of the provenance block (free-form, never read back by the sampler).
SOURCE = "_source"


def is_category_key(key: str) -> bool:
    """False for the reserved keys (``_sha256``, ``_source``, anything starting with ``_``)."""
    return not key.startswith("_")


def check_hashes(
    lists: Mapping[str, Any],
    lists_path: Path | None,
    category: str,
    paths: Iterable[Path],
    verified: dict[Path, str] | None = None,
) -> None:
    """FsadError (one line) when a file of ``paths`` has another SHA-256 than ``lists[HASHES][category]`` says.

    Files the table does not name are not checked; no table: nothing is checked. ``verified`` memoises the
    digests already computed (path -> hex), so each file is read once per sampler."""
    table = lists.get(HASHES)
    if not isinstance(table, Mapping):
        if table is not None:
            raise FsadError(f"support-set list {lists_path}: {HASHES!r} must map category -> file name -> sha256 hex")
        return
    expected = table.get(category) or {}
    if not isinstance(expected, Mapping):
        raise FsadError(f"support-set list {lists_path}: {HASHES}[{category!r}] must map file name -> sha256 hex")
    for p in paths:
        want = expected.get(p.name)
        if want is None:
            continue
        if verified is None or p not in verified:
            try:
                got = content_sha256(p)
            except OSError as err:
                raise FsadError(f"support-set list {lists_path}: cannot read {p}: {err.strerror or err}") from None
            if verified is not None:
                verified[p] = got
        else:
            got = verified[p]
        if got != str(want).lower():
            raise FsadError(
                f"support-set list {lists_path}: {category}/{p.name} has sha256 {got[:12]}… but the list "
                f"says {str(want)[:12]}… ({p} is another file than the one the list was made from)"
            )


def lists_json(
    supports: Mapping[str, Mapping[int, Mapping[int, list[str]]]],
    train_files: Mapping[str, Mapping[str, Path]],
    source: Mapping[str, Any] | None = None,
) -> str:
    """The JSON text of a support list: ``supports[category][k][run]`` = file names, their SHA-256 computed
    from ``train_files[category][name]`` (the file on disk). Keys sorted numerically; FsadError when a named
    file is not among ``train_files``."""
    out: dict[str, Any] = {}
    hashes: dict[str, dict[str, str]] = {}
    for cat in sorted(supports):
        out[cat] = {}
        for k in sorted(supports[cat], key=int):
            out[cat][str(k)] = {
                str(r): list(names) for r, names in sorted(supports[cat][k].items(), key=lambda x: int(x[0]))
            }
            for names in supports[cat][k].values():
                for n in names:
                    if n not in train_files.get(cat, {}):
                        raise FsadError(
                            f"{cat}/{n} is not a normal training image of the data root "
                            f"(have {len(train_files.get(cat, {}))} in {cat})"
                        )
                    if n not in hashes.setdefault(cat, {}):
                        hashes[cat][n] = content_sha256(train_files[cat][n])
    out[HASHES] = {c: dict(sorted(h.items())) for c, h in sorted(hashes.items())}
    if source:
        out[SOURCE] = dict(source)
    return json.dumps(out, indent=1) + "\n"


def lists_from_records(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[int, dict[int, list[str]]]]:
    """``{category: {k: {run: names}}}`` from result records (fields ``category``, ``k``, ``run``, ``support``).

    Every method of a run draws the same support set (the sampler ignores the method), so the records of
    one (category, k, run) must agree: FsadError naming the cell when they do not (records of two support
    lists or samplers mixed in one folder), or when a record has no ``support`` field."""
    out: dict[str, dict[int, dict[int, list[str]]]] = {}
    seen: dict[tuple[str, int, int], tuple[list[str], str]] = {}
    for r in records:
        names = r.get("support")
        key = (str(r["category"]), int(r["k"]), int(r["run"]))
        who = f"{r.get('method', '?')} {key[0]} k={key[1]} run {key[2]}"
        if not isinstance(names, (list, tuple)) or not names:
            raise FsadError(f"record of {who} has no 'support' file names (written by an older fsad-bench?)")
        names = [str(n) for n in names]
        if key in seen and seen[key][0] != names:
            raise FsadError(
                f"records disagree on the support set of {key[0]} k={key[1]} run {key[2]}: "
                f"{seen[key][1]} used {seen[key][0]}, {who.split()[0]} used {names}"
            )
        seen.setdefault(key, (names, who.split()[0]))
        out.setdefault(key[0], {}).setdefault(key[1], {})[key[2]] = names
    return out
