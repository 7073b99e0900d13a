"""``FrozenCLIP("tiny", model_cfg=...)`` (used by benchmarks/parity/inctrl.py) and its dtype."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("open_clip")

from fsad_bench.components.clip import TINY_CLIP, FrozenCLIP

SMALL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_model_cfg_builds_that_shape():
    clip = FrozenCLIP("tiny", "none", "", [0, 2], model_cfg=SMALL)
    assert (clip.image_size, clip.grid, clip.embed_dim, clip.width) == (32, 4, 32, 32)
    cls, patches = clip(torch.rand(2, 3, 32, 32))
    assert cls.shape == (2, 32) and patches.shape == (2, 2, 16, 32) and cls.dtype == torch.float32
    default = FrozenCLIP("tiny", "none", "", [0])
    assert default.image_size == TINY_CLIP["vision_cfg"]["image_size"]


def test_cast_module_keeps_its_dtype():
    torch.manual_seed(0)
    clip = FrozenCLIP("tiny", "none", "", [1], model_cfg=SMALL)
    x = torch.rand(1, 3, 32, 32)
    c32, _ = clip(x)
    c64, _ = clip.to(torch.float64)(x)
    assert c64.dtype == torch.float64
    assert torch.allclose(c32.double(), c64, atol=1e-5)
