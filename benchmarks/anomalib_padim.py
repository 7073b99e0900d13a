"""Our per-position Gaussian beside anomalib's PaDiM Gaussian, on the same features.

For k = 2, 4, 8 (``--k``): the augmented support set (k x 22 views) goes once through the
ResNet-18 layer1–3 backbone (``fsad_bench.components.backbone.ResNetFeatures``, ImageNet weights when
cached, else random init — the same features for both), all 448 channels concatenated at
S/4 x S/4 (no random channel subset). Then, on exactly these features:

* anomalib: ``MultiVariateGaussian().fit`` (covariance per position in a Python loop, then
  ``torch.linalg.inv`` of the ``(P, C, C)`` stack) and ``AnomalyMapGenerator.compute_distance``
  (anomalib's PaDiM Mahalanobis distance);
* ours: :class:`fsad_bench.components.position_gaussian.PositionGaussian` (dual form, ``L⁻¹`` folded into
  the samples) with ``ε = 0.01 + 1e-5`` — anomalib adds both ridges — so the distances agree.

Prints fit seconds, score ms per test image, peak memory of fit + scoring above the start
(RSS high-water mark, or ``torch.cuda.max_memory_allocated``) and the largest relative
distance difference. Skips with a message when anomalib is not installed
(``pip install 'anomalib>=2.7'``). Runs on cuda when present.

Usage: python benchmarks/anomalib_padim.py [--k 2,4,8] [--size 224] [--test 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, describe_device, pick_device, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", default="2,4,8")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--test", type=int, default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--weights", default="auto", help="backbone weights (auto: ImageNet when cached)")
    args = ap.parse_args()
    try:
        from anomalib.models.components import MultiVariateGaussian
        from anomalib.models.image.padim.anomaly_map import AnomalyMapGenerator
    except ImportError as err:
        print(f"skipped: anomalib is not installed ({err}); pip install 'anomalib>=2.7' to run this comparison")
        return
    import anomalib

    from fsad_bench.components.augment import augment_support
    from fsad_bench.components.backbone import ResNetFeatures
    from fsad_bench.components.maps import concat_pyramid
    from fsad_bench.components.position_gaussian import PositionGaussian

    dev = pick_device(args.device)
    torch.manual_seed(0)
    backbone = ResNetFeatures("resnet18", args.weights).to(dev)
    images = torch.rand(args.test, 3, args.size, args.size, device=dev)

    @torch.no_grad()
    def embed(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([concat_pyramid(backbone(x[i : i + 32])).contiguous() for i in range(0, len(x), 32)])

    test = embed(images)
    t = Table(
        title=f"anomalib {anomalib.__version__} PaDiM Gaussian vs ours, same features "
        f"({args.size}px, 448 channels, {describe_device(dev)}, {backbone.weights_tag})"
    )
    for col in (
        "k",
        "N",
        "fit anomalib",
        "fit ours",
        "score anomalib",
        "score ours",
        "peak anomalib",
        "peak ours",
        "max rel diff",
    ):
        t.add_column(col, justify="right")
    summary = []
    for k in (int(v) for v in args.k.split(",")):
        support = torch.rand(k, 3, args.size, args.size, device=dev)
        train = embed(augment_support(support, torch.Generator().manual_seed(k)))
        with torch.no_grad():
            with PeakMemory(dev) as mem_a:
                mvg = MultiVariateGaussian().to(dev)
                fit_a = timed(lambda: mvg.fit(train), dev)
                score_a = timed(lambda: AnomalyMapGenerator.compute_distance(test, [mvg.mean, mvg.inv_covariance]), dev)
            dist_a = score_a[2][:, 0]
            del mvg
            fit_a = fit_a[:2]
            with PeakMemory(dev) as mem_o:
                ours = PositionGaussian(eps=0.01 + 1e-5)
                fit_o = timed(lambda: ours.fit(train), dev)
                score_o = timed(lambda: ours.mahalanobis(test), dev)
        rel = ((score_o[2] - dist_a).abs() / dist_a.abs().clamp_min(1e-6)).max().item()
        ms = lambda s: f"{1000 * s[0] / args.test:.1f} ms"  # noqa: E731
        t.add_row(
            str(k),
            str(len(train)),
            f"{fit_a[0]:.2f} s",
            f"{fit_o[0]:.2f} s",
            ms(score_a),
            ms(score_o),
            f"{mem_a.mb:.0f} MiB",
            f"{mem_o.mb:.0f} MiB",
            f"{rel:.1e}",
        )
        summary.append(
            f"k={k}: fit {fit_a[0]:.1f} s vs {fit_o[0]:.2f} s, score {ms(score_a)} vs {ms(score_o)}/image, "
            f"peak {mem_a.mb:.0f} vs {mem_o.mb:.0f} MiB"
        )
        del ours, train
    Console(width=140).print(t)
    print(f"summary [{dev.type}] anomalib vs ours: " + "; ".join(summary))


if __name__ == "__main__":
    main()
