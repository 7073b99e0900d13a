"""``inctrl``: in-context residual learning on a frozen CLIP (Zhu & Pang, CVPR 2024).

A generalist detector trained once on labelled normal and anomalous images of an auxiliary
dataset, then applied to other datasets' categories with k normal images as prompts and no
further training (protocol ``cross-dataset``). The paper's facts, the official code's
behaviour, our deviations and the options are in ``README.md`` beside this file.

* :mod:`.torch_model`: patch residuals, the residual adapter and score heads, focal loss (plain torch);
* :mod:`.training`: the training pool, CutPaste-like anomaly synthesis, the training loop;
* :mod:`.adapter`: :class:`InCTRL`, the fsad-bench adapter (frozen CLIP from
  :mod:`fsad_bench.components.clip`, presets, options).
"""

from fsad_bench.methods.inctrl.adapter import InCTRL
from fsad_bench.methods.inctrl.torch_model import patch_residuals
from fsad_bench.methods.inctrl.training import cutpaste

__all__ = ["InCTRL", "cutpaste", "patch_residuals"]
