"""Adaptation and scoring cost of the Gaussian few-shot model, near the hardware floor.

Prints a table, last line a one-line summary. Measures, on this machine and in one run:

1. the per-position Gaussian fit + Mahalanobis scoring as the official RegAD / PaDiM code
   does it (a Python loop over the H x W positions: ``torch.cov`` + ``torch.linalg.inv`` per
   position, one distance per sample) vs ours (:class:`fsad_bench.gaussian_model.PositionGaussian`,
   batched), on the same random features of the real shape (k shots x 22 augmented views,
   448 channels, 56 x 56): seconds, speed-up and the largest score difference;
2. the floor: the backbone forward of the augmented support set alone, and our whole
   adaptation (augmentation + forward + fit) as a multiple of it;
3. scoring overhead: Mahalanobis + inverse STN warp (RegAD) + upsampling/smoothing per test
   image, as a fraction of the backbone forward per test image;
4. peak memory (RSS high-water mark) of an adaptation.

Usage: python benchmarks/adaptation.py [--k 8] [--size 224] [--test 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fsad_bench.adapter import AdapterConfig
from fsad_bench.augment import N_VIEWS, augment_support
from fsad_bench.gaussian_model import PositionGaussian


def official_loop(train: torch.Tensor, test: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """The official code's structure: per-position covariance, per-position inverse, per-sample distance."""
    n, c, h, w = train.shape
    x = train.reshape(n, c, h * w)
    mean = x.mean(0)
    eye = torch.eye(c)
    cov = torch.zeros(c, c, h * w)
    for i in range(h * w):
        cov[:, :, i] = torch.cov(x[:, :, i].T) + eps * eye
    t = test.reshape(len(test), c, h * w)
    dist = torch.zeros(len(test), h * w)
    for i in range(h * w):
        inv = torch.linalg.inv(cov[:, :, i])
        for b in range(len(test)):
            delta = t[b, :, i] - mean[:, i]
            dist[b, i] = torch.dot(delta, inv @ delta).sqrt()
    return dist.reshape(len(test), h, w)


def timed(fn, *args, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--test", type=int, default=32, help="test images (the engine predicts 32 at a time)")
    ap.add_argument("--skip-loop", action="store_true", help="skip the (slow) official loop")
    args = ap.parse_args()
    torch.manual_seed(0)
    console = Console(width=120)
    n, c, g = args.k * N_VIEWS, 448, args.size // 4
    rows: list[tuple[str, str, str]] = []

    # 1. official per-position loop vs batched, same features
    train = torch.randn(n, c, g, g) * torch.rand(1, c, 1, 1) * 2 + torch.randn(1, c, g, g)
    test = torch.randn(args.test, c, g, g) * 1.5 + torch.randn(1, c, g, g)
    ours_s, ours = timed(lambda: PositionGaussian(eps=0.01).fit(train).mahalanobis(test))
    rows.append(("batched fit + score (ours)", f"{ours_s:.2f} s", f"N={n}, C={c}, {g}x{g}, {args.test} test"))
    speedup = float("nan")
    if not args.skip_loop:
        loop_s, ref = timed(official_loop, train, test)
        diff = (ours - ref).abs().max().item()
        rel = ((ours - ref).abs() / ref.abs().clamp_min(1e-6)).max().item()
        speedup = loop_s / ours_s
        rows.append(("official per-position loop", f"{loop_s:.2f} s", "torch.cov + linalg.inv per position"))
        rows.append(("speed-up (target >= 10x)", f"{speedup:.1f}x", f"max |diff| {diff:.2e} (max rel {rel:.1e})"))
    del train, test

    # 2. floor: backbone forward of the augmented support set vs our whole adaptation
    from fsad_bench.methods.gaussian import GaussianAdapter

    adapter = GaussianAdapter(AdapterConfig(weights="none", image_size=args.size))
    support = torch.rand(args.k, 3, args.size, args.size)
    augmented = augment_support(support, torch.Generator().manual_seed(0))

    @torch.no_grad()
    def forward_only():
        for i in range(0, len(augmented), 32):
            adapter.backbone(augmented[i : i + 32])

    floor_s, _ = timed(forward_only, repeat=2)
    reset_peak()
    adapt_s, _ = timed(lambda: adapter.adapt(support))
    peak = peak_rss_mb()
    rows.append(("backbone forward, augmented support (floor)", f"{floor_s:.2f} s", f"{len(augmented)} images"))
    rows.append(("our adaptation (target <= 1.3x floor)", f"{adapt_s:.2f} s", f"{adapt_s / floor_s:.2f}x floor"))
    rows.append(("peak memory of adaptation (RSS)", f"{peak:.0f} MiB", ""))

    # 3. scoring overhead per test image (a batch of --test images, as the engine predicts them)
    images = torch.rand(args.test, 3, args.size, args.size)
    with torch.no_grad():
        fwd_s, feats = timed(lambda: [adapter.backbone(images)], repeat=2)  # one batch, as the engine does
    from fsad_bench.maps import concat_pyramid, smooth_maps

    emb = torch.cat([concat_pyramid(f) for f in feats])
    score_s, dist = timed(lambda: adapter.gaussian.mahalanobis(emb), repeat=2)
    theta = torch.eye(2, 3).expand(len(images), 2, 3)

    def warp_and_smooth():
        from fsad_bench.augment import affine_warp

        back = affine_warp(dist[:, None], theta)[:, 0]  # RegAD's inverse STN warp of the map
        return smooth_maps(back, args.size, 4.0)

    post_s, _ = timed(warp_and_smooth, repeat=2)
    per_fwd = fwd_s / len(images)
    per_score = (score_s + post_s) / len(images)
    rows.append(("backbone forward per test image", f"{1000 * per_fwd:.1f} ms", ""))
    rows.append(("Mahalanobis + inverse warp + smoothing per image", f"{1000 * per_score:.1f} ms",
                 f"{100 * per_score / per_fwd:.0f}% of forward (target <= 25%)"))

    t = Table(title=f"adaptation benchmark (k={args.k}, {args.size}px, torch threads {torch.get_num_threads()})")
    for col in ("what", "value", "note"):
        t.add_column(col)
    for r in rows:
        t.add_row(*r)
    console.print(t)
    print(f"summary: batched Gaussian {speedup:.1f}x faster than the per-position loop; adaptation "
          f"{adapt_s / floor_s:.2f}x the backbone floor; scoring overhead {100 * per_score / per_fwd:.0f}% "
          f"of a forward; peak {peak:.0f} MiB")


if __name__ == "__main__":
    main()
