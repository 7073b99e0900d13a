"""Trained methods (RegAD, DiffNet, TDG) against their compute floor on this machine.

For each trained method, the work a user waits for, measured beside its floor:

* ``regad`` / ``regad-l``: one SimSiam training step (``train_registration`` on one batch); the
  adaptation (22 augmented views per shot, backbone forward, per-position Gaussian fit); one test image
  (from a batch of ``--test``);
* ``diffnet`` / ``diffnet+``: one flow step (NLL forward + backward + Adam on one batch of features); one
  test image with its gradient maps (``n_transforms_test`` views, an input gradient each);
* ``tdg`` / ``tdg+``: one training iteration at each scale (D and G steps, the adaptation's batch); one
  test image.

The floor of a piece of work is ``max(F / P, B / W)``: ``F`` its forward + backward floating-point
operations, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the exact call (convolutions and
products; element-wise ops, norms, Cholesky and sorts count 0 there), ``P`` the peak measured in the
same run with a large matmul and a large 3x3 convolution of the same dtype and thread count (the faster
of the two); ``B`` the bytes its aten ops read and write (every non-view op's tensor arguments and
results, each counted as if it came from memory: an upper bound on DRAM traffic), ``W`` the bandwidth
of a large copy. Time: median of ``--repeat`` runs after one warm-up. Weights: random init
(``weights="none"``); inputs: random images of the real shape.

Usage: python benchmarks/trained.py [--preset cpu|paper|cpu,paper] [--size 128] [--k 2] [--threads 1]
       [--device cpu] [--methods regad,...] [--profile] [--adaptation] [--before]
The last line is ``summary: <method> <ratio>x ...``: the method's summed time over its summed floor at
the first preset given (default ``cpu``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_device, pick_device, sync  # noqa: E402

from fsad_bench import registry  # noqa: E402
from fsad_bench.adapter import AdapterConfig  # noqa: E402
from fsad_bench.data.torch_datasets import TensorImages  # noqa: E402

METHODS = ("regad", "regad-l", "diffnet", "diffnet+", "tdg", "tdg+")


# ----------------------------------------------------------------------------------------
# Counting and timing
# ----------------------------------------------------------------------------------------
class Traffic(TorchDispatchMode):
    """Bytes read + written by every non-view aten op run inside (tensor arguments and results)."""

    SKIP = {"empty", "empty_like", "empty_strided", "zeros_like", "detach", "lift_fresh", "_to_copy_meta"}

    def __init__(self):
        super().__init__()
        self.bytes = 0

    @staticmethod
    def _touched(t: torch.Tensor) -> int:
        try:
            stored = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            stored = t.numel() * t.element_size()
        return min(t.numel() * t.element_size(), stored)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func._overloadpacket.__name__ not in self.SKIP:
            for t in tree_flatten((args, kwargs, out))[0]:
                if isinstance(t, torch.Tensor):
                    self.bytes += self._touched(t)
        return out


def count(fn) -> tuple[float, float]:
    """(floating-point operations, bytes moved) of one ``fn()``."""
    with FlopCounterMode(display=False) as flops, Traffic() as traffic:
        fn()
    return float(flops.get_total_flops()), float(traffic.bytes)


def median_time(fn, device: torch.device, repeat: int, warmup: int = 1) -> float:
    """Median wall seconds of ``repeat`` calls of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_peak(device: torch.device, repeat: int = 3) -> dict[str, float]:
    """Float32 FLOP/s of a large matmul and a large 3x3 convolution, and bytes/s of a large copy."""
    big = device.type == "cuda"
    n = 8192 if big else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t = median_time(lambda: a @ b, device, repeat)
    matmul = 2 * n**3 / t
    x = torch.randn(64 if big else 8, 128, 56, 56, device=device)
    w = torch.randn(128, 128, 3, 3, device=device)
    t = median_time(lambda: torch.nn.functional.conv2d(x, w, padding=1), device, repeat)
    conv = 2 * x.shape[0] * 128 * 128 * 9 * 56 * 56 / t
    src = torch.randn((2**28 if big else 2**25) // 4, device=device)  # 1 GiB / 32 MiB
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, repeat)
    return {"matmul": matmul, "conv": conv, "flops": max(matmul, conv), "bandwidth": 2 * src.numel() * 4 / t}


# ----------------------------------------------------------------------------------------
# The work of each method
# ----------------------------------------------------------------------------------------
def _images(n: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


def regad_work(name: str, preset: str, size: int, k: int, n_test: int, device: torch.device) -> list[tuple]:
    from fsad_bench.methods.regad.training import train_registration

    a = registry.get(name)(AdapterConfig(device=str(device), weights="none", preset=preset, image_size=size))
    hp = a.hparams
    bs, shot = hp["batch_size"], hp["train_shot"]
    train = {"c": TensorImages(_images(bs + shot, size, 1, torch.device("cpu")))}

    def step():  # exactly one step: one category, max_queries = batch_size
        train_registration(
            a.model,
            a.encoder,
            a.predictor,
            train,
            epochs=1,
            batch_size=bs,
            shot=shot,
            lr=hp["lr"],
            momentum=hp["momentum"],
            lr_schedule=hp["lr_schedule"],
            max_queries=bs,
            generator=torch.Generator().manual_seed(0),
            device=device,
        )

    support, test = _images(k, size, 2, device), _images(n_test, size, 3, device)
    return [
        (f"training step ({bs} queries x {shot} shots)", step, 1),
        (f"adaptation (k = {k}, 22 views each)", lambda: a.adapt(support), 1),
        (f"test image (batch of {n_test})", lambda: a.predict(test), n_test),
    ]


def diffnet_work(
    name: str, preset: str, size: int, k: int, n_test: int, device: torch.device, before: bool = False
) -> list[tuple]:
    """``before``: the flow step with the per-tensor Adam loop (before 2026-12-02: ``ADAM_FOREACH = False``)."""
    from fsad_bench.methods.diffnet import training
    from fsad_bench.methods.diffnet.torch_model import nll_per_sample

    a = registry.get(name)(AdapterConfig(device=str(device), weights="none", preset=preset, image_size=size))
    hp = a.hparams
    s = a.input_size
    rows = hp["batch_size"] * hp["n_transforms"]
    feats = torch.randn(rows, a.extractor.n_feat, generator=torch.Generator().manual_seed(1)).to(device)
    flow = copy.deepcopy(a.flow).train()
    opt = torch.optim.Adam(
        [p for p in flow.parameters() if p.requires_grad],
        lr=hp["lr"],
        betas=tuple(hp["betas"]),
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
        foreach=False if before else training.ADAM_FOREACH,
    )

    def step():
        opt.zero_grad()
        nll_per_sample(*flow(feats)).mean().backward()
        opt.step()

    test = _images(1, s, 3, device)
    return [
        (f"flow step ({rows} feature rows)", step, 1),
        (f"test image ({hp['n_transforms_test']} views, {s} px)", lambda: a.predict(test), 1),
    ]


#: TDG as it was before 2026-12-02's changes, reachable in the current code: the float ``F.interpolate``
#: pyramid (now the option ``pyramid_resize = "bicubic"``) and the per-tensor Adam loop (``foreach=False``)
TDG_BEFORE = ({"pyramid_resize": "bicubic"}, {"foreach": False})


def tdg_work(
    name: str, preset: str, size: int, k: int, n_test: int, device: torch.device, before: bool = False
) -> list[tuple]:
    options, trainer_fields = TDG_BEFORE if before else ({}, {})
    config = AdapterConfig(device=str(device), weights="none", preset=preset, image_size=size, options=options)
    a = registry.get(name)(config)
    hp, model = a.hparams, a.model
    trainer = dataclasses.replace(a.trainer, sample_every=0, **trainer_fields)  # the 1-in-150 sample forward left out
    support = a.training_images(_images(k, size, 2, torch.device("cpu"))).to(device)
    reals = model.pyramid(support)
    ids = torch.arange(k, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(0)
    model.z_rec = [torch.randn(1, 1, s, s, generator=gen).expand(1, 3, s, s).to(device) for s in model.sizes]
    amps = torch.full((k, len(model.sizes)), 0.1, device=device)
    T = len(model.transforms)
    work = []
    once = "rec_all" in inspect.signature(trainer._train_scale).parameters  # computed once per scale since
    for n, s in enumerate(model.sizes):
        extra = {"rec_all": model.reconstruct_prev(n, ids, amps)} if once else {}

        def one(n=n, extra=extra):
            trainer._train_scale(model, n, reals[n], ids, amps, 1, gen, hp["batch_size"], T, **extra)

        work.append(
            (
                f"iteration at scale {n} ({s} px, {len(reals[n]) if hp['batch_size'] is None else min(k, hp['batch_size'])} images)",
                one,
                1,
            )
        )
    test = _images(1, size, 3, device)
    work.append(("test image", lambda: a.predict(test), 1))
    return work


#: methods whose work function can also measure the code as it was before 2026-12-02 (``--before``)
BEFORE = ("diffnet", "diffnet+", "tdg", "tdg+")

WORK = {
    "regad": regad_work,
    "regad-l": regad_work,
    "diffnet": diffnet_work,
    "diffnet+": diffnet_work,
    "tdg": tdg_work,
    "tdg+": tdg_work,
}


def measure(method: str, preset: str, args, peak: dict, device: torch.device, before: bool = False) -> list[dict]:
    rows = []
    extra = {"before": True} if before else {}
    for label, fn, per in WORK[method](method, preset, args.size, args.k, args.test, device, **extra):
        label = f"before: {label}" if before else label
        seconds = median_time(fn, device, args.repeat) / per
        flops, nbytes = count(fn)
        flops, nbytes = flops / per, nbytes / per
        floor = max(flops / peak["flops"], nbytes / peak["bandwidth"])
        rows.append(
            {
                "method": method,
                "preset": preset,
                "what": label,
                "seconds": seconds,
                "flops": flops,
                "bytes": nbytes,
                "floor": floor,
                "ratio": seconds / floor if floor else math.inf,
                "fn": fn,
            }
        )
    return rows


def profile(fn, device: torch.device, top: int = 8) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts) as p:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in p.key_averages()) or 1
    ev = sorted(p.key_averages(), key=lambda e: -getattr(e, key))[:top]
    return ", ".join(f"{e.key} {100 * getattr(e, key) / total:.0f} %" for e in ev)


# ----------------------------------------------------------------------------------------
# Adaptation seconds (paper: RTX 3090) and the projected paper_mvtec suite
# ----------------------------------------------------------------------------------------
#: RegAD paper (Huang et al., ECCV 2022), adaptation seconds per cell on an RTX 3090
PAPER_ADAPT_SECONDS = {"regad": 4.47, "diffnet+": 357.75, "tdg+": 1559.76}
#: MVTec AD (train, test) images per category (the dataset's published split)
MVTEC = {
    "bottle": (209, 83),
    "cable": (224, 150),
    "capsule": (219, 132),
    "carpet": (280, 117),
    "grid": (264, 78),
    "hazelnut": (391, 110),
    "leather": (245, 124),
    "metal_nut": (220, 115),
    "pill": (267, 167),
    "screw": (320, 160),
    "tile": (230, 117),
    "toothbrush": (60, 42),
    "transistor": (213, 100),
    "wood": (247, 79),
    "zipper": (240, 151),
}


def adaptation_seconds(method: str, preset: str, size: int, k: int, device: torch.device, fraction: float):
    """(measured seconds, projected seconds of the full adaptation, note): ``adapt`` of ``k`` random shots;
    iterative adaptations (DiffNet+ ``finetune_epochs``, TDG+ ``adapt_niter``) run ``fraction`` of their
    iterations (at least 1) and are scaled up linearly (their cost per iteration is constant)."""
    cls = registry.get(method)
    key = {"diffnet+": "finetune_epochs", "tdg+": "adapt_niter"}.get(method)
    full = cls.presets[preset][key] if key else 1
    run = max(1, round(full * fraction)) if key else 1
    opts = {key: run} if key else {}
    a = cls(AdapterConfig(device=str(device), weights="none", preset=preset, image_size=size, options=opts))
    support = _images(k, a.input_size or size, 2, device)
    sync(device)
    t0 = time.perf_counter()
    a.adapt(support)
    sync(device)
    seconds = time.perf_counter() - t0
    return seconds, seconds * full / run, (f"{run} of {full} {key}" if key else "complete")


def project_suite(rows: list[dict], adapt: dict[str, float], k: int, runs: int = 10, ks=(2, 4, 8)) -> dict[str, float]:
    """Projected seconds of ``paper_mvtec`` (15 categories x ``ks`` x ``runs`` cells per method) from the
    measured per-piece costs: per (method, held-out category) the aggregated fit (RegAD: 50 epochs of
    training steps over the other categories' images; DiffNet+: 192 epochs of flow steps, view features
    not included; TDG+: 1000 pre-training iterations per scale, at the adaptation's batch), per cell the
    adaptation (measured at ``k``) and every test image of the category."""
    out = {}
    for m in ("regad", "diffnet+", "tdg+"):
        mine = {r["what"].split(" (")[0]: r for r in rows if r["method"] == m}
        if not mine or m not in adapt:
            continue
        cls = registry.get(m)
        hp = cls.presets[rows[0]["preset"]]
        total = 0.0
        for held, (_, n_test) in MVTEC.items():
            others = [n for c, (n, _) in MVTEC.items() if c != held]
            if m == "regad":
                fit = (
                    hp["epochs"]
                    * sum(math.ceil(n / hp["batch_size"]) for n in others)
                    * mine["training step"]["seconds"]
                )
            elif m == "diffnet+":
                steps = math.ceil(sum(others) / hp["batch_size"])
                fit = hp["meta_epochs"] * hp["sub_epochs"] * steps * mine["flow step"]["seconds"]
            else:
                fit = hp["pretrain_niter"] * sum(r["seconds"] for w, r in mine.items() if w.startswith("iteration"))
            cells = len(ks) * runs
            total += fit + cells * (adapt[m] + n_test * mine["test image"]["seconds"])
        out[m] = total
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", help="comma-separated presets (cpu, paper)")
    ap.add_argument("--size", type=int, default=128, help="image side (px; DiffNet resizes to its img_size)")
    ap.add_argument("--k", type=int, default=2, help="shots")
    ap.add_argument("--test", type=int, default=4, help="test images per RegAD predict call")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of each row")
    ap.add_argument(
        "--before",
        action="store_true",
        help="tdg / tdg+ / diffnet / diffnet+ also as before 2026-12-02 (TDG: float bicubic pyramid, per-tensor "
        "Adam; DiffNet: per-tensor Adam in the flow step), measured first, in the same run",
    )
    ap.add_argument(
        "--adaptation",
        action="store_true",
        help="also time regad / diffnet+ / tdg+ adaptations beside the paper's RTX 3090 seconds, and "
        "project the paper_mvtec suite's wall time",
    )
    ap.add_argument(
        "--adapt-fraction",
        type=float,
        default=0.05,
        help="share of DiffNet+ / TDG+ adaptation iterations actually run (then scaled up)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    peak = measure_peak(device)
    print(f"# {describe_device(device)}; torch {torch.__version__}; float32")
    print(
        f"# peak: matmul {peak['matmul'] / 1e9:.1f} GFLOP/s, 3x3 conv {peak['conv'] / 1e9:.1f} GFLOP/s, "
        f"copy {peak['bandwidth'] / 1e9:.1f} GB/s (read + write)"
    )
    presets = args.preset.split(",")
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    print("| method | preset | work | time ms | GFLOP | traffic MB | floor ms | time / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in presets:
        for m in methods:
            variants = [True, False] if args.before and m in BEFORE else [False]
            for r in (r for before in variants for r in measure(m, preset, args, peak, device, before)):
                rows.append(r)
                print(
                    f"| {m} | {preset} | {r['what']} | {1e3 * r['seconds']:.1f} | {r['flops'] / 1e9:.3f} | "
                    f"{r['bytes'] / 1e6:.1f} | {1e3 * r['floor']:.2f} | {r['ratio']:.1f}x |",
                    flush=True,
                )
                if args.profile:
                    print(f"|   profile | | {profile(r['fn'], device)} | | | | | |", flush=True)
    if args.adaptation:
        adapt = {}
        print("\n| method | preset | adaptation s (measured) | projected full adaptation s | paper s (RTX 3090) |")
        print("|---|---|---|---|---|")
        for m in ("regad", "diffnet+", "tdg+"):
            sec, full, note = adaptation_seconds(m, presets[0], args.size, args.k, device, args.adapt_fraction)
            adapt[m] = full
            print(f"| {m} | {presets[0]} | {sec:.2f} ({note}) | {full:.2f} | {PAPER_ADAPT_SECONDS[m]} |", flush=True)
        proj = project_suite([r for r in rows if r["preset"] == presets[0]], adapt, args.k)
        hours = sum(proj.values()) / 3600
        print(
            f"projected paper_mvtec wall time ({presets[0]} preset, {args.size} px, this device): "
            + ", ".join(f"{m} {v / 3600:.2f} h" for m, v in proj.items())
            + f"; total {hours:.2f} h "
            "(gaussian not included; DiffNet+ fit without its view-feature extraction)"
        )
    first = [r for r in rows if r["preset"] == presets[0]]
    summary = []
    for m in methods:
        mine = [r for r in first if r["method"] == m and not r["what"].startswith("before: ")]
        floor = sum(r["floor"] for r in mine)
        summary.append(f"{m} {sum(r['seconds'] for r in mine) / floor:.1f}x")
    print("summary: " + " ".join(summary))
    return rows


if __name__ == "__main__":
    main()
