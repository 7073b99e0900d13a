"""TDG beside the official code (shellysheynin/A-Hierarchical-Transformation-Discriminating-Generative-
Model-for-Few-Shot-Anomaly-Detection): identical random weights, identical inputs, one stage table.

    python benchmarks/parity/tdg.py --official /work/official/A-Hierarchical-Trans [--size 128] [--k 2]

Both sides are built with the official configuration (`config_few_shot.py`: kernel 3, 5 layers,
nfc = min_nfc = 32 doubled every 4 scales, scale factor 0.75, pyramid 25 -> 64 px for 128 px images,
alpha 100, Dsteps = Gsteps = 3, Adam 5e-4 / (0.5, 0.999)) and the 54 transformations of
`Dataloaders/mvtec_loader.py` in our order (the official code shuffles them with an unseeded
`random.shuffle` and saves the order to `transformations.npy`; here that file holds our order). Our
weights (seeded random init) are copied into the official nets through :data:`KEY_MAP`. The table
(printed for float32 and float64; max absolute and max relative difference) has one row per stage:

* ``transform t``: the 54 transformations (official ``apply_augmentation``: kornia warps) on the same image;
* ``pyramid``: the official test pyramid (``adjust_scales2image`` + ``creat_reals_pyramid``: SinGAN's
  Matlab-style ``imresize`` with 8-bit quantisation) against ours (``pyramid_resize = "official"``,
  :func:`~fsad_bench.methods.tdg.torch_model.matlab_resize`) and against the option ``"bicubic"``
  (``F.interpolate``); ``chain upsampling``: official ``imresize(x, 1 / factor)`` cropped to the next side
  (``draw_concat``) against our ``TDGHierarchy.up`` at every scale;
* ``G_n`` / ``D_n``: generator and discriminator forwards at every scale n on identical inputs;
* ``loss ...``: the cross-entropies of one official training iteration at scale 0
  (``train_single_scale`` with ``niter = 1``) against ours (``HierarchyTrainer._train_scale``),
  with the same noise maps; ``step D/G``: all parameters and BatchNorm buffers after that iteration;
* ``score``: the official ``defect_detection`` image scores (normality ``s``, summed over the T
  transformations) against ours (``1 - s / T``, compared as ``T * (1 - ours)``) on the official test
  pyramid (our ``pyramid`` replaced by it for this row, so only the scoring is compared).

Shims (the official code is imported from ``--official``, never edited):

1. ``torch.Tensor.cuda`` -> identity and ``torch.cuda.LongTensor`` / ``torch.cuda.FloatTensor`` ->
   ``torch.LongTensor`` / ``torch.FloatTensor`` while the official code runs, when CUDA is absent
   (``augments_transform_color.translation`` / ``rotate_90``, ``training_parallel.pad_image_id`` and the
   loss functions call them unconditionally).
2. ``kornia.augmentation.functional`` (removed from kornia after 0.5; kornia 0.9 is installed): a module
   with ``apply_hflip`` = ``kornia.geometry.transform.hflip`` and ``apply_rotation(x, params, flags)`` =
   ``kornia.geometry.transform.rotate(x, params['degrees'], mode=<flags['interpolation']>,
   align_corners=flags['align_corners'])`` (kornia 0.5's definition); ``kornia.rgb_to_grayscale`` =
   ``kornia.color.rgb_to_grayscale``. (Downgrading kornia in the shared venv would break anomalib.)
   The official ``apply_augmentation`` swallows every exception and returns the image unchanged, so
   the ``transform`` rows check that no transformation silently became the identity.
3. ``functions.generate_noise`` -> pops the next pre-drawn noise map (so both sides see the same noise).
4. ``training_parallel.get_err_*_and_backward`` wrapped to record their losses (logic unchanged).
5. ``defect_detection_evaluation.roc_auc_score`` -> records ``(labels, scores)`` (the function returns
   nothing; its first call receives the raw per-image scores); ``imresize`` there and in ``functions``
   wrapped to cast its float32 output to the default dtype (float64 runs only; ``np2torch`` hard-codes
   ``FloatTensor``); ``functions.creat_reals_pyramid`` wrapped to record the test pyramid.
6. ``opt``: an ``argparse.Namespace`` from ``config_few_shot.get_arguments()`` defaults plus the
   attributes ``main_train.py`` / ``post_config`` set (``not_cuda = True``, ``device = cpu``); files the
   official code reads or writes (``TrainedModels/...``, ``mvtec_test_scale...``, sample PNGs) live in a
   temporary working directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fsad_bench.methods.tdg import training as our_training
from fsad_bench.methods.tdg.adapter import SAMPLE_EVERY
from fsad_bench.methods.tdg.torch_model import (
    TDGHierarchy,
    official_scale_factor,
    official_transformations,
    pyramid_sizes,
)
from fsad_bench.methods.tdg.training import HierarchyTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_dtype_table  # noqa: E402

#: official ``WDiscriminatorMulti`` / ``GeneratorConcatSkip2CleanAdd`` key -> ours (prefix rewrite)
_CONV_NORM = [  # the head and body blocks: the same in both
    ("head.conv.", "features.0.0."),
    ("head.norm.", "features.0.1."),
    ("body.block1.conv.", "features.1.0."),
    ("body.block1.norm.", "features.1.1."),
    ("body.block2.conv.", "features.2.0."),
    ("body.block2.norm.", "features.2.1."),
    ("body.block3.conv.", "features.3.0."),
    ("body.block3.norm.", "features.3.1."),
]
KEY_MAP = {
    "D": [*_CONV_NORM, ("tail.", "classifier.")],
    "G": [*_CONV_NORM, ("tail.0.", "to_rgb.0.")],
}


def to_official(ours: dict, kind: str) -> dict:
    out = {}
    for key, value in ours.items():
        for off, our in KEY_MAP[kind]:
            if key.startswith(our):
                out[off + key[len(our) :]] = value.clone()
                break
        else:
            raise KeyError(f"no official key for {kind} {key}")
    return out


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    d = (a - b).abs().max().item()
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return d, d / scale


# -- shims -----------------------------------------------------------------------------------------
def install_kornia_shim() -> None:
    import kornia

    mod = types.ModuleType("kornia.augmentation.functional")
    modes = {0: "nearest", 1: "bilinear", 2: "bicubic"}

    def apply_hflip(x):
        return kornia.geometry.transform.hflip(x)

    def apply_rotation(x, params, flags):
        angle = params["degrees"].to(x.device, x.dtype).reshape(-1).expand(len(x))
        return kornia.geometry.transform.rotate(
            x, angle, mode=modes[int(flags["interpolation"].item())], align_corners=bool(flags["align_corners"])
        )

    mod.apply_hflip, mod.apply_rotation = apply_hflip, apply_rotation
    sys.modules["kornia.augmentation.functional"] = mod
    kornia.augmentation.functional = mod
    if not hasattr(kornia, "rgb_to_grayscale"):
        kornia.rgb_to_grayscale = kornia.color.rgb_to_grayscale


@contextlib.contextmanager
def cuda_shim():
    if torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.cuda, torch.cuda.LongTensor, torch.cuda.FloatTensor
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.LongTensor, torch.cuda.FloatTensor = torch.LongTensor, torch.FloatTensor
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.cuda.LongTensor, torch.cuda.FloatTensor = saved


def import_official(path: str):
    sys.path.insert(0, path)
    install_kornia_shim()
    import config_few_shot
    import defect_detection_evaluation as dde
    import FewShot_models.training_parallel as tp
    from FewShot_models import functions, models
    from FewShot_models.augments_transform_color import apply_transform

    return types.SimpleNamespace(
        config=config_few_shot, functions=functions, models=models, tp=tp, dde=dde, apply_transform=apply_transform
    )


def make_opt(off, size: int, k: int, transforms) -> argparse.Namespace:
    opt = off.config.get_arguments().parse_args([])
    opt.not_cuda, opt.device, opt.device_ids = True, torch.device("cpu"), 0
    opt.size_image, opt.num_images, opt.pos_class, opt.index_download, opt.policy = size, k, "bottle", 1, ""
    opt.niter, opt.num_transforms, opt.fraction_defect, opt.mode = 1, len(transforms), 0.1, "train"
    opt.input_name = f"parity_{k}.png"
    opt.niter_init, opt.noise_amp_init = opt.niter, opt.noise_amp
    opt.nfc_init, opt.min_nfc_init, opt.scale_factor_init = opt.nfc, opt.min_nfc, opt.scale_factor
    # as the official np.save(list of tuples): an int array (flip as 0/1)
    opt.list_transformations = np.array([(int(t.gray), t.flip, t.tx, t.ty, t.rot) for t in transforms])
    return opt


# -- the comparison --------------------------------------------------------------------------------
def run(off, dtype: torch.dtype, size: int, k: int, seed: int) -> list[tuple[str, float, float]]:
    torch.set_default_dtype(dtype)
    rows: list[tuple[str, float, float]] = []
    transforms = official_transformations()
    T = len(transforms)
    opt = make_opt(off, size, k, transforms)
    sizes = pyramid_sizes(size, opt.min_size, opt.max_size, opt.scale_factor)
    torch.manual_seed(seed)
    factor = official_scale_factor(size, opt.min_size, opt.max_size, opt.scale_factor)
    ours = TDGHierarchy(sizes, transforms, opt.nfc, opt.min_nfc, opt.num_layer, resize="official", factor=factor)
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.rand(k, 3, size, size, generator=g, dtype=dtype)

    with cuda_shim():
        # (1) transformations, at the finest scale's side
        x = torch.rand(k, 3, sizes[-1], sizes[-1], generator=g, dtype=dtype) * 2 - 1
        worst = (0.0, 0.0, "")
        for t in transforms:
            o = off.apply_transform(x, t.flip, t.tx, t.ty, t.rot, int(t.gray))
            d = diff(o, t.apply(x))
            if t.flip or t.tx or t.ty or t.rot or t.gray:
                assert not torch.equal(o, x), f"official transformation {t} fell back to the identity"
            if d[0] >= worst[0]:
                worst = (*d, f"{t}")
        rows.append((f"transform (worst of {T}: {worst[2]})", worst[0], worst[1]))

        # (1b) the generator chain's upsampling: official draw_concat's imresize(x, 1 / factor), cropped
        opt.scale_factor = factor
        worst = (0.0, 0.0)
        for n in range(len(sizes) - 1):
            x = torch.rand(k, 3, sizes[n], sizes[n], generator=g, dtype=dtype) * 2 - 1
            up_off = torch.cat([off.functions.imresize(x[i : i + 1], 1 / factor, opt) for i in range(k)])
            d = diff(up_off[:, :, : sizes[n + 1], : sizes[n + 1]].to(dtype), ours.up(x, n))
            worst = max(worst, d)
        rows.append(("chain upsampling: official imresize(1/f) + crop vs ours, every scale", *worst))
        opt.scale_factor = opt.scale_factor_init

        # (2) per-scale forwards on identical inputs
        nets_off = []
        for n, s in enumerate(sizes):
            opt.nfc = min(opt.nfc_init * 2 ** (n // 4), size)
            opt.min_nfc = min(opt.min_nfc_init * 2 ** (n // 4), size)
            D_off, G_off = off.models.WDiscriminatorMulti(opt), off.models.GeneratorConcatSkip2CleanAdd(opt)
            D_off.load_state_dict(to_official(ours.discriminators[n].state_dict(), "D"))
            G_off.load_state_dict(to_official(ours.generators[n].state_dict(), "G"))
            nets_off.append((D_off, G_off))
            D, G = ours.discriminators[n].eval(), ours.generators[n].eval()
            D_off.eval(), G_off.eval()
            noisy = torch.randn(k, 3, s, s, generator=g, dtype=dtype)
            prev = torch.randn(k, 3, s, s, generator=g, dtype=dtype) * 0.5
            ids = torch.arange(k, dtype=dtype)
            with torch.no_grad():
                pad = ours.generators[n].margin
                x_off = off.tp.pad_image_id(F.pad(noisy, [pad] * 4), range(k))
                rows.append(
                    (f"G_{n} forward ({s} px)", *diff(G_off(x_off, F.pad(prev, [pad] * 4)), G(noisy, prev, ids)))
                )
                xt = torch.cat([t.apply(noisy) for t in transforms])
                rows.append((f"D_{n} forward ({s} px)", *diff(D_off(xt), D(xt))))

        # (3) one training iteration at scale 0 (D: 3 steps, G: 3 steps), identical noise
        rows += train_iteration(off, opt, ours, nets_off[0], images, g, dtype)

        # (4) test scores through the official defect_detection
        rows += test_scores(off, opt, ours, images, g, dtype)
    return rows


def train_iteration(off, opt, ours, nets_off, images, g, dtype):
    k, s = len(images), ours.sizes[0]
    trainer = HierarchyTrainer(
        lr_g=opt.lr_g,
        lr_d=opt.lr_d,
        beta1=opt.beta1,
        gamma=opt.gamma,
        milestone_d=500,
        milestone_g=1000,
        d_steps=opt.Dsteps,
        g_steps=opt.Gsteps,
        alpha=opt.alpha,
        noise_amp=opt.noise_amp,
        sample_every=SAMPLE_EVERY,
    )
    real = torch.rand(k, 3, s, s, generator=g, dtype=dtype) * 2 - 1
    z_opt = torch.randn(1, 1, s, s, generator=g, dtype=dtype)
    noise = torch.randn(k, 1, s, s, generator=g, dtype=dtype)
    D_off, G_off = nets_off
    D_off.train(), G_off.train()
    # official side
    lost_off: list[tuple[str, float]] = []
    saved = {
        n: getattr(off.tp, n)
        for n in ("get_err_D_real_and_backward", "get_err_D_fake_and_backward", "get_err_G_fake_and_backward")
    }

    def recorder(name, fn):
        def wrapped(*args, **kwargs):
            loss = fn(*args, **kwargs)
            lost_off.append((name, loss.item()))
            return loss

        return wrapped

    for name, fn in saved.items():
        setattr(off.tp, name, recorder(name, fn))
    saved_noise = off.functions.generate_noise
    off.functions.generate_noise = lambda size, num_samp=1, device="cuda", type="gaussian", scale=1: noise.clone()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            opt.nzx = opt.nzy = s
            opt.out_ = "TrainedModels/x"
            opt.global_outf = f"{opt.out_}/0"
            opt.outf = [f"{opt.out_}/0/index_image_{i}" for i in range(k)]
            for d in opt.outf:
                os.makedirs(d, exist_ok=True)
            reals = {i: [real[i : i + 1]] for i in range(k)}
            z_pad = F.pad(z_opt.expand(k, 3, s, s), [5] * 4)
            opt_d = torch.optim.Adam(D_off.parameters(), lr=opt.lr_d, betas=(opt.beta1, 0.999))
            opt_g = torch.optim.Adam(G_off.parameters(), lr=opt.lr_g, betas=(opt.beta1, 0.999))
            sd = torch.optim.lr_scheduler.MultiStepLR(opt_d, [500], gamma=opt.gamma)
            sg = torch.optim.lr_scheduler.MultiStepLR(opt_g, [1000], gamma=opt.gamma)
            opt.niter = 1
            off.tp.train_single_scale(
                D_off,
                G_off,
                reals,
                [],
                {i: [] for i in range(k)},
                0,
                {i: [] for i in range(k)},
                opt,
                range(k),
                z_pad,
                opt_d,
                opt_g,
                sd,
                sg,
                False,
            )
        finally:
            os.chdir(cwd)
            off.functions.generate_noise = saved_noise
            for name, fn in saved.items():
                setattr(off.tp, name, fn)
    # our side
    lost_ours: list[float] = []
    real_ce = our_training.patch_ce

    def record_ce(logits, labels):
        loss = real_ce(logits, labels)
        lost_ours.append(loss.item())
        return loss

    our_training.patch_ce = record_ce
    saved_noise_ours = TDGHierarchy.noise
    TDGHierarchy.noise = staticmethod(lambda b, n, size, gen, device: noise.expand(b, 3, size, size))
    try:
        ours.z_rec = [z_opt.expand(1, 3, s, s)]
        amps = torch.ones(k, len(ours.sizes))
        trainer._train_scale(
            ours, 0, real, torch.arange(k, dtype=torch.float32), amps, 1, torch.Generator(), None, len(ours.transforms)
        )
    finally:
        our_training.patch_ce = real_ce
        TDGHierarchy.noise = saved_noise_ours
    rows = []
    # official order per D step: real, fake; per G step: G adversarial. Ours: real, fake per D step, then G.
    names_off = [n for n, _ in lost_off]
    d_real = [v for n, v in lost_off if n == "get_err_D_real_and_backward"]
    d_fake = [v for n, v in lost_off if n == "get_err_D_fake_and_backward"]
    g_adv = [v for n, v in lost_off if n == "get_err_G_fake_and_backward"]
    nd = opt.Dsteps
    ours_real, ours_fake, ours_g = lost_ours[0 : 2 * nd : 2], lost_ours[1 : 2 * nd : 2], lost_ours[2 * nd :]
    assert len(names_off) == len(lost_ours), (names_off, lost_ours)
    for j in range(nd):
        rows.append((f"loss D real, step {j}", *diff(torch.tensor(d_real[j]), torch.tensor(ours_real[j]))))
        rows.append((f"loss D fake, step {j}", *diff(torch.tensor(d_fake[j]), torch.tensor(ours_fake[j]))))
    for j in range(opt.Gsteps):
        rows.append((f"loss G adversarial, step {j}", *diff(torch.tensor(g_adv[j]), torch.tensor(ours_g[j]))))
    for kind, a, b in (("D", D_off, ours.discriminators[0]), ("G", G_off, ours.generators[0])):
        mine = to_official(b.state_dict(), kind)
        params = {n for n, _ in a.named_parameters()}
        buffers = {key for key in a.state_dict() if key.endswith(("running_mean", "running_var"))}
        for what, keys in (("parameters", params), ("BN running stats", buffers)):
            worst = max((diff(v, mine[key]) for key, v in a.state_dict().items() if key in keys), key=lambda d: d[0])
            rows.append((f"step {kind}_0: {what} after one iteration", *worst))
    return rows


def test_scores(off, opt, ours, images, g, dtype):
    size = images.shape[-1]
    n_test = 4
    test = torch.rand(n_test, 3, size, size, generator=g, dtype=dtype)
    labels = np.array([1, 0, 1, 0])
    recorded, pyramids = [], []
    saved = (off.dde.roc_auc_score, off.dde.imresize, off.functions.imresize, off.functions.creat_reals_pyramid)
    cast = lambda fn: lambda *a, **kw: fn(*a, **kw).to(torch.get_default_dtype())

    def record_pyramid(*a, **kw):
        out = saved[3](*a, **kw)
        pyramids.append([r.clone() for r in out[0]])
        return out

    off.dde.roc_auc_score = lambda y, p: recorded.append(np.asarray(p, dtype=np.float64).copy()) or 0.5
    off.dde.imresize, off.functions.imresize = cast(saved[1]), cast(saved[2])
    off.functions.creat_reals_pyramid = record_pyramid
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            opt.num_images, opt.scale_factor = 1, opt.scale_factor_init
            name = opt.input_name[:-4]
            folder = f"mvtec_test_scale{size}_{opt.pos_class}_1"
            os.makedirs(folder)
            np.save(f"{folder}/mvtec_data_test_{opt.pos_class}{size}_{opt.index_download}.npy", test.numpy())
            np.save(f"{folder}/mvtec_labels_test_{opt.pos_class}{size}_{opt.index_download}.npy", labels)
            os.makedirs(f"TrainedModels/{name}")
            np.save(f"TrainedModels/{name}/transformations.npy", opt.list_transformations)
            for n, D in enumerate(ours.discriminators):
                os.makedirs(f"TrainedModels/{name}/scale_factor=0.750000,alpha={int(opt.alpha)}/{n}")
                torch.save(
                    to_official(D.state_dict(), "D"),
                    f"TrainedModels/{name}/scale_factor=0.750000,alpha={int(opt.alpha)}/{n}/netD.pth",
                )
            off.dde.defect_detection(opt.input_name, n_test, opt)
        finally:
            os.chdir(cwd)
            (off.dde.roc_auc_score, off.dde.imresize, off.functions.imresize, off.functions.creat_reals_pyramid) = saved
    official = torch.tensor(recorded[0])  # per image: sum over T of the mean lowest fraction, mean over scales
    T = len(ours.transforms)
    rows = []
    ours_pyr = [ours.pyramid(test[i : i + 1]) for i in range(n_test)]
    sizes_off = [r.shape[-1] for r in pyramids[0]]
    rows.append((f"pyramid sides official {sizes_off} vs ours {ours.sizes}", float(sizes_off != ours.sizes), 0.0))
    if sizes_off == ours.sizes:
        worst = max(
            (diff(a, b) for p_off, p_ours in zip(pyramids, ours_pyr) for a, b in zip(p_off, p_ours)), key=lambda d: d[0]
        )
        rows.append(("pyramid: official imresize (8-bit) vs ours (pyramid_resize = official)", *worst))
        bicubic = TDGHierarchy(ours.sizes, ours.transforms, 8, 8, 2)
        worst = max(
            (diff(a, b) for i, p_off in enumerate(pyramids) for a, b in zip(p_off, bicubic.pyramid(test[i : i + 1]))),
            key=lambda d: d[0],
        )
        rows.append(("pyramid: official imresize vs option pyramid_resize = bicubic", *worst))
    # scores on the official pyramid
    scores = []
    saved_pyr = ours.pyramid
    try:
        for i in range(n_test):
            ours.pyramid = lambda _x, i=i: [r.to(torch.get_default_dtype()) for r in pyramids[i]]
            scores.append(ours.score(test[i : i + 1], opt.fraction_defect)[0])
    finally:
        ours.pyramid = saved_pyr
    mine = T * (1 - torch.cat(scores).double())
    rows.append(("score: official normality vs T * (1 - ours), same pyramid", *diff(official, mine)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help="checkout of the official TDG repository")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtypes", default="float32,float64", help="comma-separated: float32, float64")
    a = ap.parse_args()
    a.official = os.path.abspath(a.official)
    off = import_official(a.official)
    dtypes = a.dtypes.split(",")
    results = [run(off, getattr(torch, dt), a.size, a.k, a.seed) for dt in dtypes]
    torch.set_default_dtype(torch.float32)
    print(f"\nTDG parity (official {a.official}; size {a.size}, k = {a.k}, seed {a.seed})\n")
    print_dtype_table(dtypes, results)


if __name__ == "__main__":
    main()
