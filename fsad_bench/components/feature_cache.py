"""Caching of frozen-backbone features shared by several cells.

Every cell of a (method, category) group scores the same test images, and a training-free
method adapts on images that other k / runs also draw; with a frozen backbone their
features never change. :class:`CachedBackbone` wraps such a backbone and keys each image's
outputs by (backbone tag, SHA-1 of the image's pixels) — the pixels stand for the file and
the transform that produced them — in memory (LRU, bounded in MiB) and, optionally, on disk
(one ``<key>.feat.pt`` file per image, written atomically with its size and sha256 beside it in
``<key>.feat.pt.json``), so repeated commands and other methods with the same backbone and
weights reuse them. Outputs are bit-identical to the backbone's. A disk file is checked before it
is loaded (one read of the file); a truncated, damaged or unloadable one gives one warning line
naming it (:class:`~fsad_bench.identity.CorruptFileWarning`), is deleted and recomputed.

Memory: the in-memory part never holds more than ``max_memory_mb`` of feature tensors
(:attr:`CachedBackbone.bytes`, least recently used evicted first), whatever the number of
test images; ``benchmarks/memory.py`` measures the process's peak against that bound.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from fsad_bench.identity import digest_problem, discard_corrupt, write_with_digest


class CachedBackbone:
    """Call like the backbone: ``images (B, 3, H, W) -> list of maps (B, C_i, H_i, W_i)``.

    ``tag`` must identify the backbone and its weights (e.g. ``"resnet18-<state hash>"``);
    ``disk`` is a folder for the persistent cache (None = memory only).
    """

    def __init__(self, backbone: nn.Module, tag: str, disk: str | Path | None = None, max_memory_mb: float = 1024):
        self.backbone, self.tag = backbone, tag
        self.disk = Path(disk) / tag if disk else None
        self.max_bytes = max_memory_mb * 2**20
        self.memory: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        #: False: nothing is read from the cache (features computed afresh; the run layer's cold timing)
        self.read_enabled = True

    def key(self, image: torch.Tensor) -> str:
        return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    def _get(self, key: str) -> list[torch.Tensor] | None:
        if not self.read_enabled:
            return None
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        if self.disk is not None:
            path = self._file(key)
            if path.is_file():
                why = digest_problem(path)
                if why is None:
                    try:
                        feats = torch.load(path, map_location="cpu", weights_only=True)
                    except Exception as err:  # EOFError, unpickling, ...: a damaged file, recomputed
                        why = f"{err.__class__.__name__}: {err}".splitlines()[0]
                if why is not None:
                    discard_corrupt(path, "cached features", why, "computing them again")
                    return None
                self._remember(key, feats)
                return feats
        return None

    def _file(self, key: str) -> Path:
        """The disk file of ``key`` (``.feat.pt``: files of the unchecked format, ``.pt``, are never read)."""
        return self.disk / key[:2] / f"{key}.feat.pt"

    def _remember(self, key: str, feats: list[torch.Tensor]) -> None:
        size = sum(f.numel() * f.element_size() for f in feats)
        if size > self.max_bytes:
            return
        if key in self.memory:  # the same image twice in one batch: count it once
            self.bytes -= sum(f.numel() * f.element_size() for f in self.memory.pop(key))
        self.memory[key] = feats
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.memory.popitem(last=False)
            self.bytes -= sum(f.numel() * f.element_size() for f in old)

    def _put(self, key: str, feats: list[torch.Tensor]) -> None:
        self._remember(key, feats)
        if self.disk is not None:
            write_with_digest(self._file(key), lambda tmp: torch.save(feats, tmp))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        keys = [self.key(im) for im in images]
        found = [self._get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            device = next(self.backbone.parameters()).device
            outs = self.backbone(images[missing].to(device))
            for j, i in enumerate(missing):
                # own storage of exactly this image's size (a view would pin the whole batch)
                found[i] = [o[j].cpu().clone() for o in outs]
                self._put(keys[i], found[i])
        device = images.device
        return [_stack_channels_last([f[level] for f in found]).to(device) for level in range(len(found[0]))]


def _stack_channels_last(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-image ``(C, H, W)`` maps -> ``(N, C, H, W)`` in the backbone's channels-last format
    (``torch.stack`` gives NCHW, which made every later per-position copy a strided gather, 4x slower)."""
    out = torch.empty(
        (len(maps), *maps[0].shape), dtype=maps[0].dtype, device=maps[0].device, memory_format=torch.channels_last
    )
    for i, m in enumerate(maps):
        out[i].copy_(m)
    return out
