"""Adaptation and scoring cost of the Gaussian few-shot model vs the hardware floor, before → after.

Prints a table, last line a one-line summary. Measures in one run, on the same features,
the implementation before issue 15 (``benchmarks/before.py``: centred samples + inverse
Cholesky factor, two batched products per call, features concatenated then permuted) beside
the current one (``fsad_bench.components.position_gaussian``: ``L⁻¹`` folded into the samples, one product
per call, support features written once into the position-major layout by
``maps.pyramid_samples``, test features laid out and scored band by band by
``PositionGaussian.score_pyramid``):

1. fit + Mahalanobis scoring of ``--test`` images: the official RegAD / PaDiM structure (a
   Python loop over the H x W positions: ``torch.cov`` + ``torch.linalg.inv`` per position,
   one distance per sample) vs batched, on random features of the real shape (k shots x 22
   augmented views, 448 channels, S/4 x S/4): seconds, speed-up, largest score difference;
2. the floor: the backbone forward of the augmented support set alone, and the whole
   adaptation (augmentation + forward + feature layout + fit) as a multiple of it, with the
   peak memory of the adaptation;
3. scoring overhead: feature layout + Mahalanobis + inverse STN warp (RegAD) + upsampling /
   smoothing per test image, as a fraction of the backbone forward per test image;
4. cold vs warm inference of the ``gaussian`` adapter per test image: the first ``predict``
   on new images (what one new image costs: backbone + everything after it) and a repeat
   on the same images (test features served by the feature cache).

Runs on cuda when present (``--device`` to choose). On a shared CPU machine wall seconds
depend on the other jobs; process CPU seconds are printed beside them and the ratios are
given for both.

Usage: python benchmarks/adaptation.py [--k 8] [--size 224] [--test 32] [--skip-loop] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before import PositionGaussian as BeforeGaussian  # noqa: E402
from before import features_before
from common import PeakMemory, describe_device, pick_device, timed  # noqa: E402

from fsad_bench.adapter import AdapterConfig  # noqa: E402
from fsad_bench.components.affine import affine_warp  # noqa: E402
from fsad_bench.components.augment import N_VIEWS, augment_support  # noqa: E402
from fsad_bench.components.maps import ScratchBuffer, smooth_maps  # noqa: E402
from fsad_bench.components.position_gaussian import PositionGaussian  # noqa: E402


def official_loop(train: torch.Tensor, test: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """The official code's structure: per-position covariance, per-position inverse, per-sample distance."""
    n, c, h, w = train.shape
    x = train.reshape(n, c, h * w)
    mean = x.mean(0)
    eye = torch.eye(c, device=train.device)
    cov = torch.zeros(c, c, h * w, device=train.device)
    for i in range(h * w):
        cov[:, :, i] = torch.cov(x[:, :, i].T) + eps * eye
    t = test.reshape(len(test), c, h * w)
    dist = torch.zeros(len(test), h * w, device=train.device)
    for i in range(h * w):
        inv = torch.linalg.inv(cov[:, :, i])
        for b in range(len(test)):
            delta = t[b, :, i] - mean[:, i]
            dist[b, i] = torch.dot(delta, inv @ delta).sqrt()
    return dist.reshape(len(test), h, w)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs().clamp_min(1e-6)).max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--test", type=int, default=32, help="test images per predict call (the engine's batch)")
    ap.add_argument("--skip-loop", action="store_true", help="skip the (slow) official loop")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs for the short measurements")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    torch.manual_seed(0)
    n, c, g = args.k * N_VIEWS, 448, args.size // 4
    rows: list[tuple[str, ...]] = []
    ratios: dict[
        str, tuple[float, float, float, float]
    ] = {}  # name -> (before wall, after wall, before cpu, after cpu)

    def row(what, before, after, note=""):
        rows.append(
            (what, f"{before[0]:.3f} s ({before[1]:.3f})" if before else "", f"{after[0]:.3f} s ({after[1]:.3f})", note)
        )

    # 1. official per-position loop vs batched (before / after), same random features
    train = (torch.randn(n, c, g, g) * torch.rand(1, c, 1, 1) * 2 + torch.randn(1, c, g, g)).to(dev)
    test = (torch.randn(args.test, c, g, g) * 1.5 + torch.randn(1, c, g, g)).to(dev)
    before = timed(lambda: BeforeGaussian(eps=0.01).fit(train).mahalanobis(test), dev, args.repeat)
    after = timed(lambda: PositionGaussian(eps=0.01).fit(train).mahalanobis(test), dev, args.repeat)
    row(f"batched fit + score of {args.test} test images", before, after, f"N={n}, C={c}, {g}x{g}")
    if not args.skip_loop:
        loop = timed(lambda: official_loop(train, test), dev)
        ratios["speed-up over the official loop"] = (
            loop[0] / before[0],
            loop[0] / after[0],
            loop[1] / before[1],
            loop[1] / after[1],
        )
        rows.append(
            (
                "official per-position loop",
                f"{loop[0]:.2f} s ({loop[1]:.2f})",
                "",
                "torch.cov + linalg.inv per position",
            )
        )
        rows.append(
            (
                "largest score difference vs the loop (max rel)",
                f"{max_rel(before[2], loop[2]):.1e}",
                f"{max_rel(after[2], loop[2]):.1e}",
                "float32 round-off",
            )
        )
    del train, test

    # 2. floor: backbone forward of the augmented support set vs the whole adaptation
    from fsad_bench.methods.gaussian import GaussianAdapter

    # bilinear layer2/3 upsampling, as the "before" path (concat_pyramid's default): both sides then
    # compute the same model, so their distances must agree to float32 round-off (the paper preset
    # of `gaussian` uses nearest repetition, which the old path did not have)
    same_recipe = {"upsample": "bilinear"}
    adapter = GaussianAdapter(AdapterConfig(weights="none", image_size=args.size, device=str(dev), options=same_recipe))
    support = torch.rand(args.k, 3, args.size, args.size, device=dev)
    augmented = augment_support(support, torch.Generator().manual_seed(0))

    @torch.no_grad()
    def forward_only():
        for i in range(0, len(augmented), 32):
            adapter.backbone(augmented[i : i + 32])

    def adapt_before():
        aug = augment_support(support, torch.Generator().manual_seed(0))
        return BeforeGaussian(eps=0.01).fit(features_before(adapter.backbone, aug))

    floor = timed(forward_only, dev, args.repeat)
    with PeakMemory(dev) as mem_before:
        a_before = timed(adapt_before, dev)
    a_before = a_before[:2]  # drop the model before measuring the next one
    with PeakMemory(dev) as mem_after:
        a_after = timed(lambda: adapter.adapt(support), dev)
    rows.append(
        (
            "backbone forward, augmented support (floor)",
            f"{floor[0]:.3f} s ({floor[1]:.3f})",
            "",
            f"{len(augmented)} images",
        )
    )
    row("adaptation (augment + forward + layout + fit)", a_before, a_after)
    ratios["adaptation / floor"] = (
        a_before[0] / floor[0],
        a_after[0] / floor[0],
        a_before[1] / floor[1],
        a_after[1] / floor[1],
    )
    rows.append(
        (
            "peak memory of adaptation above start",
            f"{mem_before.mb:.0f} MiB",
            f"{mem_after.mb:.0f} MiB",
            "RSS high-water mark" if dev.type == "cpu" else "max_memory_allocated",
        )
    )
    old_model = adapt_before()

    # 3. scoring overhead per test image (one batch of --test images, as the engine predicts them)
    images = torch.rand(args.test, 3, args.size, args.size, device=dev)
    with torch.no_grad():
        fwd = timed(lambda: adapter.backbone(images), dev, args.repeat)
    feats = fwd[2]
    theta = torch.eye(2, 3, device=dev).expand(len(images), 2, 3)

    def post(dist):  # RegAD's inverse STN warp of the map, then upsampling + smoothing
        return smooth_maps(affine_warp(dist[:, None], theta)[:, 0], args.size, 4.0)

    def score_before():
        from fsad_bench.components.maps import concat_pyramid

        dist = old_model.mahalanobis(concat_pyramid(feats))
        return post(dist), dist

    scratch = ScratchBuffer()  # as the adapters score test batches: one reused band-sized block

    def score_after(mode="bilinear"):  # layout fused into the scoring, band by band, as the adapters predict
        dist = adapter.gaussian.score_pyramid(feats, mode, scratch)
        return post(dist), dist

    score_before()  # warm-up: the timed and measured calls find their scratch blocks allocated
    score_after()
    with PeakMemory(dev) as smem_before:
        s_before = timed(score_before, dev, args.repeat)
    with PeakMemory(dev) as smem_after:
        s_after = timed(score_after, dev, args.repeat)
    s_near = timed(lambda: score_after("nearest"), dev, args.repeat)  # the paper presets' layout
    per = lambda t: tuple(x / len(images) for x in t[:2])  # noqa: E731
    rows.append(
        (
            "backbone forward per test image",
            "",
            f"{1000 * fwd[0] / len(images):.2f} ms ({1000 * fwd[1] / len(images):.2f})",
            f"batch of {args.test}",
        )
    )
    rows.append(
        (
            "layout + Mahalanobis + inverse warp + smoothing per image",
            f"{1000 * per(s_before)[0]:.2f} ms ({1000 * per(s_before)[1]:.2f})",
            f"{1000 * per(s_after)[0]:.2f} ms ({1000 * per(s_after)[1]:.2f})",
            f"distances max rel diff {max_rel(s_after[2][1], s_before[2][1]):.1e}",
        )
    )
    rows.append(
        (
            "peak memory of scoring one batch above start",
            f"{smem_before.mb:.0f} MiB",
            f"{smem_after.mb:.0f} MiB",
            f"{args.test} images, features already computed",
        )
    )
    rows.append(
        (
            "  the same with nearest layer2/3 repetition (paper presets)",
            "",
            f"{1000 * per(s_near)[0]:.2f} ms ({1000 * per(s_near)[1]:.2f})",
            "no old counterpart",
        )
    )
    ratios["scoring / forward"] = (s_before[0] / fwd[0], s_after[0] / fwd[0], s_before[1] / fwd[1], s_after[1] / fwd[1])
    ratios["scoring / forward, nearest (paper presets)"] = (
        float("nan"),
        s_near[0] / fwd[0],
        float("nan"),
        s_near[1] / fwd[1],
    )

    # 4. cold vs warm inference of the adapter (new adapter: empty feature cache)
    fresh = GaussianAdapter(AdapterConfig(weights="none", image_size=args.size, device=str(dev), options=same_recipe))
    fresh.adapt(support)
    cold = timed(lambda: fresh.predict(images), dev)
    warm = timed(lambda: fresh.predict(images), dev, args.repeat)
    rows.append(
        (
            "predict per image, cold (new images)",
            "",
            f"{1000 * cold[0] / len(images):.2f} ms ({1000 * cold[1] / len(images):.2f})",
            "backbone + layout + score + smoothing",
        )
    )
    rows.append(
        (
            "predict per image, warm (cached features)",
            "",
            f"{1000 * warm[0] / len(images):.2f} ms ({1000 * warm[1] / len(images):.2f})",
            "same images again",
        )
    )

    t = Table(
        title=f"adaptation benchmark (k={args.k}, {args.size}px, {describe_device(dev)}); "
        "wall seconds (process CPU seconds)"
    )
    for col in ("what", "before", "after", "note"):
        t.add_column(col)
    for r in rows:
        t.add_row(*r)
    for name, (bw, aw, bc, ac) in ratios.items():
        pct = name.startswith("scoring / forward")
        fmt = (lambda v: "n/a" if v != v else f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.2f}x")
        t.add_row(f"[b]{name}[/b]", f"{fmt(bw)} (cpu {fmt(bc)})", f"{fmt(aw)} (cpu {fmt(ac)})", "ratio")
    Console(width=140).print(t)
    parts = []
    for name, (bw, aw, bc, ac) in ratios.items():
        pct = name.startswith("scoring / forward")
        fmt = (lambda v: "n/a" if v != v else f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.2f}x")
        parts.append(f"{name} {fmt(bw)} -> {fmt(aw)} (cpu time {fmt(bc)} -> {fmt(ac)})")
    print(
        f"summary [{dev.type}]: "
        + "; ".join(parts)
        + f"; adaptation peak {mem_before.mb:.0f} -> {mem_after.mb:.0f} MiB"
    )


if __name__ == "__main__":
    main()
