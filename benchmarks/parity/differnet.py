"""fsad-bench's ``diffnet`` ``paper`` preset side by side with the official DifferNet code, stage by stage.

    python benchmarks/parity/differnet.py --official /work/official/differnet [--dtypes float32,float64]
        [--img-size 256] [--fc-internal 512] [--n-transforms-test 8]

Both sides get identical weights (the official constructors' random init, seeded — the AlexNet
random-init as well — copied into ours through the explicit key maps :func:`flow_key`,
:data:`ALEXNET_KEYS`) and identical inputs: our side runs first and records the rotation angles
and image order it draws; the official model is fed our normalised views, and the views stages
compare them with the official transforms applied to the same images and angles
(``utils.get_fixed_transforms(angle)``: ``Resize``, torchvision ``rotate`` of the PIL image with
``resample=False`` = nearest, ``ToTensor``, ``Normalize``; float32 by construction, so in float64
runs they differ from ours by float32 rounding while every later stage gets identical float64
inputs). Printed per stage and dtype: the largest absolute difference and the largest absolute
difference relative to the largest official value.

Stages: loader (official ``Resize(img_size)`` + ``ToTensor`` vs ours), a training batch's views
(ours: :func:`rotate_nearest_uint8`; official: PIL rotation), the flow's fixed permutations,
multi-scale features (input of ``model.nf``), z and log|det J|, the loss, every flow parameter's
gradient and the parameters after one Adam step (official ``train.train``, one meta-epoch of one
sub-epoch on one batch, which then scores the test views), the test scores over the same
per-image random views and their AUROC, and the gradient maps (official
``localization.export_gradient_maps``; ours ``official_grad_maps`` through ``DiffNet.predict``).

Shims (around the official code, never inside it):

* ``import config`` runs ``torch.cuda.set_device(0)``: a no-op while it is imported; then every
  ``config`` value the run needs is set on the module (``device = "cpu"``, sizes, epochs 1 x 1,
  ``save_model = False``, ``verbose = False``) before ``model`` is imported (``nf_head`` binds
  ``c.n_feat`` at import);
* ``model.alexnet`` -> ``torchvision.models.alexnet(weights=None)`` (the official asks for
  ``pretrained=True``, a download; both sides use the same random init instead);
* ``train.DifferNet`` -> a constructor returning the prepared model (so that ``train`` trains the
  weights both sides share), ``train.get_loss`` and ``train.roc_auc_score`` wrapped to record
  the loss and the test scores, ``localization.save_imgs`` replaced by a recorder (no files);
* the data loaders are lists of ready batches ``(views, labels)`` (and, for the gradient maps, an
  object with ``dataset.get_fixed``), views made by the official transforms as above;
* float64 runs: ``torch.set_default_dtype(torch.float64)``, the models ``.double()``, the views
  cast to float64.

Not compared: the ±1e6 output clamp of the official coupling (``freia_funcs``; ours, stock FrEIA,
has none) never acts at these magnitudes; the official ``F_fully_connected.bn`` is never used in
its forward and has no counterpart.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision.transforms import functional as TF

from fsad_bench.adapter import AdapterConfig
from fsad_bench.data.images import load_image
from fsad_bench.data.torch_datasets import TensorImages
from fsad_bench.methods.diffnet.adapter import DiffNet
from fsad_bench.methods.diffnet.torch_model import fixed_degrees, nll_per_sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Table, diff, make_folder  # noqa: E402

#: official alexnet ``features.i`` -> ours
ALEXNET_KEYS = [("feature_extractor.features.", "backbone.stages.0.")]
#: official coupling subnet layer -> ours (official ``s1`` / ``s2`` = FrEIA ``subnet1`` / ``subnet2``)
SUBNET_LAYERS = {"fc1": "0", "fc2": "3", "fc2b": "6", "fc3": "9"}


def flow_key(key: str) -> str | None:
    """Official ``nf.module_list.{2 + 2j}.s{1,2}.fc*`` (node 0 is the input node, odd nodes the permutations)
    -> ours ``module_list.{1 + 2j}.subnet{1,2}.{0,3,6,9}``; None for the unused ``bn``."""
    parts = key.split(".")  # nf, module_list, i, s1, fc1, weight
    if parts[0] != "nf" or parts[1] != "module_list":
        raise KeyError(key)
    if parts[4] == "bn":
        return None
    node = int(parts[2])
    return f"module_list.{node - 1}.subnet{parts[3][1]}.{SUBNET_LAYERS[parts[4]]}.{parts[5]}"


def import_official(root: str, cfg: dict) -> dict:
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.path.insert(0, root)
    set_device = torch.cuda.set_device
    torch.cuda.set_device = lambda *a, **k: None
    try:
        import config as c  # noqa: PLC0415
    finally:
        torch.cuda.set_device = set_device
    for k, v in cfg.items():
        setattr(c, k, v)
    import model as model_mod  # noqa: PLC0415

    model_mod.alexnet = lambda pretrained=True, **kw: torchvision.models.alexnet(weights=None)
    import localization  # noqa: PLC0415
    import train as train_mod  # noqa: PLC0415
    import utils  # noqa: PLC0415

    return {"c": c, "model": model_mod, "train": train_mod, "loc": localization, "utils": utils}


def run(mods: dict, folder: Path, dtype: torch.dtype, table: Table, col: str, a) -> None:
    torch.set_default_dtype(dtype)
    c, utils, train_mod, loc = mods["c"], mods["utils"], mods["train"], mods["loc"]
    size, t_train, t_test = a.img_size, 4, a.n_transforms_test
    cat = folder / "bottle"
    train_paths = sorted((cat / "train" / "good").glob("*.png"))
    test_paths = sorted((cat / "test" / "good").glob("*.png")) + sorted((cat / "test" / "broken").glob("*.png"))
    labels = np.array([0 if "good" in str(p.parent) else 1 for p in test_paths])

    # -- loader ----------------------------------------------------------------------------------
    resize = torchvision.transforms.Resize(c.img_size)  # the official Resize(c.img_size) + ToTensor
    official_imgs = [resize(Image.open(p).convert("RGB")) for p in train_paths + test_paths]
    ours = torch.stack([load_image(p, size) for p in train_paths + test_paths])
    table.add("loader: Resize + ToTensor", col, *diff(ours, torch.stack([TF.to_tensor(im) for im in official_imgs])))
    ours = ours.to(dtype)
    train_imgs, test_imgs = ours[: len(train_paths)], ours[len(train_paths) :]
    pil_train, pil_test = official_imgs[: len(train_paths)], official_imgs[len(train_paths) :]

    def official_views(pil: Image.Image, degrees: list[float]) -> torch.Tensor:
        """The official transforms with these rotations: ``(T, 3, S, S)`` normalised."""
        return torch.stack([utils.get_fixed_transforms(d)(pil) for d in degrees]).to(dtype)

    # -- identical weights -------------------------------------------------------------------------
    torch.manual_seed(a.seed)
    o_model = mods["model"].DifferNet().to(dtype)
    opts = {
        "img_size": size,
        "n_scales": c.n_scales,
        "n_coupling_blocks": c.n_coupling_blocks,
        "fc_internal": c.fc_internal,
        "n_transforms": t_train,
        "n_transforms_test": t_test,
        "batch_size": len(train_paths),
        "meta_epochs": 1,
        "sub_epochs": 1,
        "view_chunk": t_test,
    }
    d = DiffNet(AdapterConfig(weights="none", preset="paper", image_size=size, seed=a.seed, options=opts))
    d.extractor, d.flow = d.extractor.to(dtype), d.flow.to(dtype)
    ext_state = {
        k.replace(ALEXNET_KEYS[0][0], ALEXNET_KEYS[0][1]): v
        for k, v in o_model.state_dict().items()
        if k.startswith(ALEXNET_KEYS[0][0])
    }
    d.extractor.load_state_dict(ext_state)
    flow_state = {}
    for k, v in o_model.state_dict().items():
        if k.startswith("nf."):
            m = flow_key(k)
            if m is not None:
                flow_state[m] = v.clone()
    mine = d.flow.state_dict()
    flow_state.update({k: v for k, v in mine.items() if k.endswith("perm") or k.endswith("perm_inv")})
    assert set(flow_state) == set(mine), sorted(set(mine) ^ set(flow_state))[:5]
    d.flow.load_state_dict(flow_state)
    perm_o = [m.perm for m in o_model.nf.module_list if hasattr(m, "perm")]
    perm_u = [m.perm for m in d.flow.module_list if hasattr(m, "perm")]
    table.add("flow permutations", col, *diff(torch.stack(perm_u).double(), torch.stack(perm_o).double()))

    pre_flow = copy.deepcopy(d.flow)  # the shared weights before the training step

    # -- our training step, recording its views ------------------------------------------------------
    drawn, order, our_views = [], [], []
    sample, apply = d.views.sample, d.views.apply

    def recording_sample(n, generator):
        angles, factors = sample(n, generator)
        drawn.append(angles.clone())
        return angles, factors

    class Recorded(TensorImages):
        def __getitem__(self, i):
            order.append(int(i))
            return super().__getitem__(i)

    d.views.sample = recording_sample
    d.views.apply = lambda *args: our_views.append(apply(*args)) or our_views[-1]
    history = d.train_flow(d.flow, Recorded(train_imgs), 1, d._generator(1))
    d.views.sample, d.views.apply = sample, apply
    degrees = [math.degrees(float(x)) for x in drawn[0]]
    batch = d.extractor.normalise(our_views[0]).detach()  # what the official model is fed (identical inputs)
    o_batch = torch.cat(
        [official_views(pil_train[i], degrees[j * t_train : (j + 1) * t_train]) for j, i in enumerate(order)]
    )
    table.add("training views: ours vs official transforms", col, *diff(batch, o_batch))

    # -- features, z, log-det, loss (before the step) ------------------------------------------------
    feats_o: list[torch.Tensor] = []
    hook = o_model.nf.register_forward_pre_hook(lambda m, args: feats_o.append(args[0].detach().clone()))
    o_model.eval()
    with torch.no_grad():
        z_o = o_model(batch)
        jac_o = o_model.nf.jacobian(run_forward=False)
        f_u = d.extractor.pooled(batch)
        z_u, jac_u = pre_flow(f_u)
    hook.remove()
    table.add("multi-scale features", col, *diff(f_u, feats_o[0]))
    table.add("flow z", col, *diff(z_u, z_o))
    table.add("flow log-det", col, *diff(jac_u, jac_o))
    table.add("loss (batch mean)", col, *diff(nll_per_sample(z_u, jac_u).mean(), train_mod.get_loss(z_o, jac_o)))

    # -- official training step (+ its test pass over our per-image views), then compare ---------------
    angles, factors = d.test_views(test_imgs)
    test_batches, o_test = [], []
    for img, pil, ang, fac, y in zip(test_imgs, pil_test, angles, factors, labels):
        with torch.no_grad():
            v = d.extractor.normalise(d.views.apply(img[None].repeat_interleave(t_test, dim=0), ang, fac))
        test_batches.append((v[None], torch.tensor([y])))
        o_test.append(official_views(pil, [math.degrees(float(x)) for x in ang]))
    table.add(
        "test views: ours vs official transforms",
        col,
        *diff(torch.cat([v[0] for v, _ in test_batches]), torch.cat(o_test)),
    )
    losses, aucs = [], []
    get_loss, auc = train_mod.get_loss, train_mod.roc_auc_score
    train_mod.get_loss = lambda z, j: losses.append(get_loss(z, j)) or losses[-1]
    train_mod.roc_auc_score = lambda y, s: aucs.append((np.asarray(y), np.asarray(s))) or auc(y, s)
    train_mod.DifferNet = lambda: o_model
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            trained = train_mod.train([(batch[None], torch.zeros(1))], test_batches)
    finally:
        train_mod.get_loss, train_mod.roc_auc_score = get_loss, auc
    table.add("loss (training step)", col, *diff(torch.tensor(history[0]), losses[0].detach()))
    mine = dict(d.flow.named_parameters())
    g_d, g_o, p_d, p_o = [], [], [], []
    for k, p in trained.nf.named_parameters(prefix="nf"):
        m = flow_key(k)
        if m is None:
            continue
        g_d.append((mine[m].grad - p.grad).abs().max())
        g_o.append(p.grad.abs().max())
        p_d.append((mine[m].detach() - p.detach()).abs().max())
        p_o.append(p.detach().abs().max())
    gm, pm = torch.stack(g_d).max(), torch.stack(p_d).max()
    table.add("flow gradients", col, float(gm), float(gm / torch.stack(g_o).max()))
    table.add("flow parameters after 1 Adam step", col, float(pm), float(pm / torch.stack(p_o).max()))

    # -- test: scores over the same per-image views, AUROC; gradient maps ------------------------------
    scores, maps = d.predict(test_imgs)
    y_o, s_o = aucs[-1]
    table.add("test scores (same per-image random views)", col, *diff(scores, torch.as_tensor(s_o)))
    auc_o, auc_u = roc_auc_score(y_o, s_o), roc_auc_score(labels, scores.numpy())
    table.add("test image AUROC", col, abs(auc_u - auc_o), abs(auc_u - auc_o) / auc_o)
    with torch.no_grad():  # the same scores from the trained official model called directly
        direct = torch.stack([trained(v[0]).pow(2).mean() for v, _ in test_batches])
    table.add("test scores vs the official model called directly", col, *diff(scores, direct))
    recorded_maps = []
    save_imgs = loc.save_imgs
    loc.save_imgs = lambda inputs, grad, cnt: recorded_maps.append(grad.copy()) or cnt + len(grad)
    fixed, o_fixed = [], []
    for img, pil in zip(test_imgs, pil_test):
        with torch.no_grad():
            v = d.extractor.normalise(
                d.views.rotated(img[None].repeat_interleave(t_test, dim=0), fixed_degrees(t_test))
            )
        fixed.append((v[None], torch.tensor([1])))  # label 1: the official exports maps of anomalies only
        o_fixed.append(official_views(pil, fixed_degrees(t_test)))
    table.add(
        "map views: ours vs official fixed rotations",
        col,
        *diff(torch.cat([v[0] for v, _ in fixed]), torch.cat(o_fixed)),
    )
    optimizer = torch.optim.Adam(trained.nf.parameters(), lr=c.lr_init)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            loc.export_gradient_maps(trained, _Loader(fixed), optimizer, -1)
    finally:
        loc.save_imgs = save_imgs
    o_maps = torch.as_tensor(np.concatenate(recorded_maps))
    table.add("gradient maps (official recipe)", col, *diff(maps, o_maps))
    # our AlexNet runs in channels-last layout (faster on CPU); its last-bit differences flip max-pool
    # ties in constant regions (the rotations' black fill), where the gradient then takes another path
    d.extractor.backbone.memory_format = torch.contiguous_format
    d.extractor.to(memory_format=torch.contiguous_format)
    table.add("gradient maps, our AlexNet in torch's default layout", col, *diff(d.predict(test_imgs)[1], o_maps))
    torch.set_default_dtype(torch.float32)


class _Loader:
    """A list of ready batches with the ``dataset.get_fixed`` flag ``export_gradient_maps`` sets."""

    def __init__(self, batches):
        self.batches, self.dataset = batches, types.SimpleNamespace(get_fixed=False)

    def __iter__(self):
        return iter(self.batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help="checkout of marco-rudolph/differnet")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--img-size", type=int, default=256, help="official 448 (smallest scale >= 63 px)")
    ap.add_argument("--n-scales", type=int, default=3)
    ap.add_argument("--n-coupling-blocks", type=int, default=8)
    ap.add_argument("--fc-internal", type=int, default=512, help="official 2048")
    ap.add_argument("--n-transforms-test", type=int, default=8, help="official 64")
    ap.add_argument("--n-train", type=int, default=3)
    ap.add_argument("--n-test", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = {
        "device": "cpu",
        "img_size": (a.img_size, a.img_size),
        "img_dims": [3, a.img_size, a.img_size],
        "n_scales": a.n_scales,
        "n_coupling_blocks": a.n_coupling_blocks,
        "fc_internal": a.fc_internal,
        "n_feat": 256 * a.n_scales,
        "n_transforms": 4,
        "n_transforms_test": a.n_transforms_test,
        "batch_size": a.n_train,
        "batch_size_test": 1,
        "meta_epochs": 1,
        "sub_epochs": 1,
        "verbose": False,
        "hide_tqdm_bar": True,
        "save_model": False,
        "grad_map_viz": False,
        "modelname": "parity",
    }
    mods = import_official(a.official, cfg)
    table = Table()
    with tempfile.TemporaryDirectory(prefix="differnet_parity_") as tmp:
        folder = make_folder(
            Path(tmp),
            "bottle",
            n_train=a.n_train,
            n_good=a.n_test // 2,
            n_bad=a.n_test - a.n_test // 2,
            size=300,
            seed=a.seed,
        )
        for name in a.dtypes.split(","):
            run(mods, folder, getattr(torch, name), table, name, a)
    print(table.render())


if __name__ == "__main__":
    main()
