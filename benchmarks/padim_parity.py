"""anomalib:Padim (all channels) beside fsad-bench's own PaDiM math on the same support sets.

Our side: torchvision backbone + create_feature_extractor (our weights resolution), pyramid
concatenated with nearest upsampling (anomalib's PaDiM choice), no support augmentation,
fsad_bench.components.position_gaussian.PositionGaussian (ε = 0.01), Mahalanobis map upsampled bilinearly
and smoothed with σ = 4 (fsad_bench.components.maps.smooth_maps), score = map maximum. anomalib's side:
the ``anomalib:Padim`` adapter (PadimModel). Prints per (k, run) the largest map difference
relative to the map range, the score difference, both sides' metrics and wall times.

    python benchmarks/padim_parity.py DATA_ROOT WEIGHTS [--category bottle] [--k 1,2,4,8] [--runs 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchvision.models.feature_extraction import create_feature_extractor

from fsad_bench import registry
from fsad_bench.adapter import AdapterConfig
from fsad_bench.components.backbone import IMAGENET_MEAN, IMAGENET_STD, build_torchvision
from fsad_bench.components.maps import smooth_maps
from fsad_bench.components.position_gaussian import PositionGaussian
from fsad_bench.data.images import load_images, load_mask
from fsad_bench.data.roots import open_data_root
from fsad_bench.data.sampler import SupportSampler
from fsad_bench.metrics import evaluate

TAPS = ["features.3", "features.6", "features.13"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_root")
    ap.add_argument("weights")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--k", default="2,4,8")  # k = 1: PaDiM's covariance needs N >= 2
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", default="padim_parity.csv")
    a = ap.parse_args()
    ds = open_data_root("mvtec", a.data_root, [a.category], "needs a data root")
    split = ds.split(a.category)
    test_images = load_images([s.path for s in split.test], a.size)
    test_labels = np.array([s.label for s in split.test], dtype=np.int64)
    test_masks = torch.stack([load_mask(s.mask_path, a.size, s.path) for s in split.test])
    sampler = SupportSampler(0, None)
    net, _ = build_torchvision("mobilenet_v2", a.weights)
    body = create_feature_extractor(net, {t: t for t in TAPS}).eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def feats(x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x), 16):
            f = list(body((x[i : i + 16] - mean) / std).values())
            out.append(torch.cat([f[0]] + [F.interpolate(t, size=f[0].shape[-2:], mode="nearest") for t in f[1:]], 1))
        return torch.cat(out)

    test_feats = feats(test_images)
    rows = []
    for k in [int(v) for v in a.k.split(",")]:
        for run in range(a.runs):
            support = load_images(sampler.support(split, k, run), a.size)
            ad = registry.get("anomalib:Padim")(
                AdapterConfig(
                    weights=a.weights, image_size=a.size, options={"arch": "mobilenet_v2", "n_features": "all"}
                )
            )
            t0 = time.perf_counter()
            ad.adapt(support)
            sa, ma = ad.predict(test_images)
            t_anomalib = time.perf_counter() - t0
            t0 = time.perf_counter()
            g = PositionGaussian(eps=0.01).fit(feats(support))
            with torch.no_grad():
                mo = smooth_maps(g.mahalanobis(test_feats), a.size, 4.0)
            so = mo.flatten(1).amax(1)
            t_ours = time.perf_counter() - t0
            row = {
                "k": k,
                "run": run,
                "anomalib_s": t_anomalib,
                **{
                    f"anomalib_{m}": v
                    for m, v in evaluate(test_labels, sa.numpy(), test_masks.numpy(), ma.numpy()).items()
                },
            }
            row.update(
                {
                    "ours_s": t_ours,
                    "max_map_diff_rel": float((ma - mo).abs().max() / (mo.max() - mo.min())),
                    "max_score_diff_rel": float(((sa - so).abs() / so.abs()).max()),
                    **{
                        f"ours_{m}": v
                        for m, v in evaluate(test_labels, so.numpy(), test_masks.numpy(), mo.numpy()).items()
                    },
                }
            )
            rows.append(row)
            print({k2: (round(v, 7) if isinstance(v, float) else v) for k2, v in row.items()}, flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(a.out, index=False)
    print(df.groupby("k").mean(numeric_only=True).drop(columns="run").round(4).T.to_string())


if __name__ == "__main__":
    main()
