"""InCTRL beside the official code (mala-lab/InCTRL): a small randomly initialised CLIP with identical
weights on both sides, identical inputs, one stage table.

    python benchmarks/parity/inctrl.py --official /work/official/InCTRL [--k 2] [--queries 3]

The official ``open_clip.model.InCTRL`` hard-codes ViT-B-16-plus-240's shape (240 px, 16 px patches:
225 patch tokens; class embedding 640; taps after blocks 7, 9, 11 counted from 1; attention weights of
block 12), so the smallest model it runs has that shape with narrow blocks: :data:`PARITY_CLIP` (12
vision blocks of width 64, 2 text blocks of width 64, embedding 640). It is built from the official
checkout's bundled ``open_clip`` fork (random init, seeded); its visual tower and text tower are copied
into our :class:`~fsad_bench.components.clip.FrozenCLIP` (``clip_model = "tiny"`` with
``model_cfg = PARITY_CLIP``, installed ``open_clip``) with the identity key map below, and its head
(``adapter``, ``diff_head_ref``, ``diff_head``) into our ``InCTRLHead`` through :data:`HEAD_KEY_MAP`.
Queries are scored one at a time (``TEST.BATCH_SIZE = 1``, as the official test; see
``docs/fidelity.md`` for batches > 1). Rows (float32 and float64; max absolute and relative difference):

* ``class embedding`` / ``patch tokens, block b``: the visual tower's pooled + projected class token and
  the tokens of blocks 7, 9, 11 (official ``encode_image``) against ``FrozenCLIP.forward``;
* ``text score``: the zero-shot prior (softmax of 100 · cosine to the two prompt ensembles);
* ``residual map``: the layer-averaged nearest-prompt patch residual ``(B, 225)``;
* ``image-residual score``, ``final score``: the official ``InCTRL.forward`` outputs against ours
  (``InCTRL.predict`` and ``inctrl_scores``).

Shims (the official code is imported from ``--official``, never edited):

1. The fork is imported as ``open_clip`` from the checkout, then renamed to ``inctrl_official_open_clip``
   in ``sys.modules`` so the installed ``open_clip`` (ours) imports afterwards.
2. Missing modules used only by training / logging utilities, not by the model: ``fvcore``
   (``fvcore.nn.activation_count``, ``fvcore.nn.flop_count``), ``iopath``
   (``iopath.common.file_io.PathManagerFactory``), ``simplejson`` (= ``json``) are stubbed when absent
   (``fvcore`` 0.1.5.post20221221, ``iopath`` and ``simplejson`` are on PyPI; not installed, not needed).
3. Without CUDA: ``torch.Tensor.cuda`` -> identity, ``Tensor.to('cuda')`` -> no move (the fork's
   ``VisionTransformer_Mul.forward`` calls ``.to('cuda')`` on its attention map).
4. A ``TorchFunctionMode`` records the tensors ``torch.stack`` returns inside ``InCTRL.forward``: the
   residual map is the last ``(B, 225)`` stack, the text score the first ``(B,)`` stack.
5. ``args`` of ``InCTRL(args, ...)`` is unused by the model: ``None``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import types
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from fsad_bench.adapter import AdapterConfig
from fsad_bench.components.clip import CLIP_MEAN, CLIP_STD, FrozenCLIP
from fsad_bench.methods.inctrl.adapter import InCTRL
from fsad_bench.methods.inctrl.torch_model import InCTRLHead, patch_residuals

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_dtype_table  # noqa: E402

#: ViT-B-16-plus-240's shape (what the official head hard-codes) with narrow blocks
PARITY_CLIP = {
    "embed_dim": 640,
    "vision_cfg": {"image_size": 240, "layers": 12, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
#: official InCTRL head key prefix -> ours (``bn1`` of ``TransformerBasicHead`` is never used)
HEAD_KEY_MAP = [
    ("adapter.fc.", "adapter."),
    ("diff_head_ref.projection1.", "image_head.0."),
    ("diff_head_ref.bn2.", "image_head.2."),
    ("diff_head_ref.projection2.", "image_head.3."),
    ("diff_head_ref.bn3.", "image_head.5."),
    ("diff_head_ref.projection3.", "image_head.6."),
    ("diff_head.projection1.", "holistic_head.0."),
    ("diff_head.bn2.", "holistic_head.2."),
    ("diff_head.projection2.", "holistic_head.3."),
    ("diff_head.bn3.", "holistic_head.5."),
    ("diff_head.projection3.", "holistic_head.6."),
]
LAYERS = [6, 8, 10]  # ours, 0-based = the official out_layers [7, 9, 11] counted from 1


def diff(a, b) -> tuple[float, float]:
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    d = (a - b).abs().max().item()
    return d, d / max(a.abs().max().item(), b.abs().max().item(), 1e-30)


def _stub(name: str, **attrs) -> None:
    try:
        __import__(name)
    except ImportError:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod


def import_official(path: str):
    """The official ``open_clip`` fork as a module object, under another name in ``sys.modules``."""
    _stub("fvcore"), _stub("fvcore.nn")
    _stub("fvcore.nn.activation_count", activation_count=None)
    _stub("fvcore.nn.flop_count", flop_count=None)
    _stub("iopath"), _stub("iopath.common")
    _stub("iopath.common.file_io", PathManagerFactory=types.SimpleNamespace(get=lambda key=None: None))
    _stub("simplejson", **{k: getattr(json, k) for k in ("dump", "dumps", "load", "loads")})
    assert not any(n == "open_clip" or n.startswith("open_clip.") for n in sys.modules), "open_clip imported early"
    sys.path.insert(0, path)
    try:
        import open_clip as official
        import open_clip.model
    finally:
        sys.path.remove(path)
    for name in [n for n in sys.modules if n == "open_clip" or n.startswith("open_clip.")]:
        sys.modules["inctrl_official_" + name] = sys.modules.pop(name)
    return official


@contextlib.contextmanager
def cuda_shim():
    if torch.cuda.is_available():
        yield
        return
    cuda, to = torch.Tensor.cuda, torch.Tensor.to

    def to_cpu(self, *a, **kw):
        if a and (a[0] == "cuda" or isinstance(a[0], torch.device) and a[0].type == "cuda"):
            a = a[1:]
        return to(self, *a, **kw) if a or kw else self

    torch.Tensor.cuda, torch.Tensor.to = (lambda self, *a, **k: self), to_cpu
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = cuda, to


class RecordStacks(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.out: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is torch.stack:
            self.out.append(result.detach().clone())
        return result


def run(official, dtype: torch.dtype, k: int, n_queries: int, seed: int, category: str):
    torch.set_default_dtype(dtype)
    torch.manual_seed(seed)
    cfg = PARITY_CLIP
    off = official.model.InCTRL(None, cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], False, cast_dtype=None)
    with torch.no_grad():  # random head weights, BN statistics away from (0, 1)
        for m in off.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1), m.bias.normal_(0, 0.1)
    off.eval()
    ours = InCTRL(
        AdapterConfig(preset="paper", weights="none", image_size=240, options={"clip_model": "tiny", "layers": LAYERS})
    )
    ours.clip = FrozenCLIP("tiny", "none", "", LAYERS, model_cfg=cfg)
    ours.head = InCTRLHead(ours.clip.embed_dim, ours.clip.num_patches)
    state = {k_: v for k_, v in off.state_dict().items() if not k_.startswith(("adapter.", "diff_head"))}
    missing, unexpected = ours.clip.model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"logit_scale"}, (missing, unexpected)
    head = {}
    for key, value in off.state_dict().items():
        for a, b in HEAD_KEY_MAP:
            if key.startswith(a):
                head[b + key[len(a) :]] = value
    ours.head.load_state_dict(head)
    ours.clip.to(dtype), ours.head.to(dtype).eval()
    ours.category = category

    g = torch.Generator().manual_seed(seed + 1)
    support = torch.rand(k, 3, 240, 240, generator=g, dtype=dtype)
    queries = torch.rand(n_queries, 3, 240, 240, generator=g, dtype=dtype)
    norm = lambda x: (
        (x - torch.tensor(CLIP_MEAN, dtype=dtype).view(1, 3, 1, 1))
        / torch.tensor(CLIP_STD, dtype=dtype).view(1, 3, 1, 1)
    )
    tokenizer = official.tokenize
    rows = []
    with cuda_shim(), torch.no_grad():
        # features
        tok_off, patches_off, _ = off.encode_image(norm(queries))
        cls, patches = ours.clip(queries)
        rows.append(("class embedding (pooled, projected)", *diff(tok_off, cls)))
        for j, b in enumerate(LAYERS):
            rows.append((f"patch tokens after block {b + 1}", *diff(patches_off[j][:, 1:], patches[:, j])))
        ours.adapt(support)
        final_off, image_off, residual_off, text_off = [], [], [], []
        for i in range(n_queries):
            rec = RecordStacks()
            with rec:
                f, s = off(tokenizer, [norm(queries[i : i + 1])], [category], list(norm(support)))
            final_off.append(f), image_off.append(s)
            residual_off.append([t for t in rec.out if t.shape == (1, 225)][-1])
            text_off.append(next(t for t in rec.out if t.shape == (1,)))
        final_ours, _ = ours.predict(queries)
        q_cls, q_patches = ours.encode(queries)
        text_ours = ours._text_scores(q_cls, [category] * n_queries)
        residual_ours = patch_residuals(q_patches, ours._prompt_patches).mean(dim=1)
        _, image_ours = ours._score_batch(
            (q_cls, q_patches, ours._prompt_cls, ours._prompt_patches, [category] * n_queries)
        )
    rows.append(("text score (zero-shot prior)", *diff(torch.cat(text_off), text_ours)))
    rows.append(("residual map (B, 225), layer mean", *diff(torch.cat(residual_off), residual_ours)))
    rows.append(("image-residual score", *diff(torch.cat(image_off), image_ours)))
    rows.append(("final score", *diff(torch.cat(final_off), final_ours)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help="checkout of mala-lab/InCTRL")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--dtypes", default="float32,float64", help="comma-separated: float32, float64")
    a = ap.parse_args()
    official = import_official(os.path.abspath(a.official))
    dtypes = a.dtypes.split(",")
    results = [run(official, getattr(torch, dt), a.k, a.queries, a.seed, a.category) for dt in dtypes]
    torch.set_default_dtype(torch.float32)
    print(f"\nInCTRL parity (official {a.official}; k = {a.k}, {a.queries} queries, seed {a.seed})\n")
    print_dtype_table(dtypes, results)


if __name__ == "__main__":
    main()
