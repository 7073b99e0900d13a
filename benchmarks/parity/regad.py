"""fsad-bench's ``regad`` ``paper`` preset side by side with the official RegAD code, stage by stage.

    python benchmarks/parity/regad.py --official /work/official/RegAD [--dtypes float32,float64]

Both sides get identical weights (the official constructors' random init, seeded, copied into ours
through the explicit key map :data:`KEY_MAP`; the last fc layer of each STN is set to small random
values so that the thetas are not the identity) and identical inputs (images of a small synthetic
MVTec-style folder, decoded by the official loader). Printed per stage and dtype: the largest
absolute difference and the largest absolute difference relative to the largest official value.

Stages: loader (official ``Resize(224, ANTIALIAS)`` vs ours, LANCZOS and bilinear), STN-ResNet
features (registered layer3 map, the three image-frame maps ``stn{i}_output``) and thetas, the
SimSiam training loss, every parameter's gradient, the parameters and BatchNorm statistics after
one SGD step (official ``train.train`` on one batch; ours ``train_registration`` on the same
batch plan), the learning-rate schedule over 50 epochs, the 22 support views (the official
``utils.funcs`` transforms in ``test.py``'s order vs ours unshuffled), then the test pipeline (official
``train.test``; ours ``RegAD.adapt`` + ``RegAD.predict``): blurred maps, image scores (map max)
and image AUROC.

Shims (around the official code, never inside it; active only while it runs):

* ``torch.Tensor.cuda`` -> identity (``models/stn.py`` moves the inverse thetas to CUDA);
* ``models.stn`` sees a ``torch`` whose ``zeros`` maps ``device=-1`` (``x.get_device()`` of a CPU
  tensor) to the CPU and, in float64 runs, ``dtype=torch.float32`` to float64 (the theta buffer);
* ``utils.funcs`` sees a ``torch`` whose ``device(...)`` is always the CPU (``embedding_concat``
  is called with ``use_cuda=True``) and, in float64 runs, ``FloatTensor`` = ``DoubleTensor``
  (``rot_img`` / ``translation_img`` cast the grid to float32);
* ``PIL.Image.ANTIALIAS`` = ``Image.LANCZOS`` (removed in Pillow 10; it was an alias);
* a stub ``IPython`` module (``get_ipython``, ``IPython.display.display_html``) when IPython is not
  installed: ``utils/__init__.py`` imports it for notebook helpers the scripts never call;
* ``train.CosLoss`` is wrapped to record its two values (the loss is not returned by ``train``);
* float64 runs: ``torch.set_default_dtype(torch.float64)`` and the official loader's float32
  tensors cast to float64 before they reach the model;
* diagnosis, on our side: one extra test row fits the Gaussian in its primal (Cholesky) form, to
  show where the test pipeline's remaining differences come from (the grey view's weights, the
  largest one before, are now the official 0.299, 0.587, 0.114: ``augment.GREY_WEIGHTS``);
* ``stn_net(args, pretrained=False)`` with ``args`` a namespace (``stn_mode``): random init,
  no download; the data folder is built in a temporary directory named without "test" (the
  official test loader finds masks by replacing "test" in the path).

Needs kornia (``utils/funcs.py`` imports it; it is in the project's environment) and ~25 minutes
per dtype on a busy 2-core machine (the official per-position loop dominates).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from fsad_bench.adapter import AdapterConfig
from fsad_bench.components import augment
from fsad_bench.components.position_gaussian import PositionGaussian
from fsad_bench.data.images import load_image
from fsad_bench.data.torch_datasets import TensorImages
from fsad_bench.methods.regad.adapter import RegAD
from fsad_bench.methods.regad.torch_model import to_image_frame
from fsad_bench.methods.regad.training import cosine_lr, train_registration, training_batches

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Table, diff, make_folder  # noqa: E402

#: official state-dict prefix -> ours (STN-ResNet, Siamese encoder, predictor); bn3 of the official
#: encoder is never used in its forward and has no counterpart
KEY_MAP = {
    "stn": [
        ("conv1.", "blocks.0.0."),
        ("bn1.", "blocks.0.1."),
        ("layer1.", "blocks.0.4."),
        ("layer2.", "blocks.1."),
        ("layer3.", "blocks.2."),
        ("stn1.conv.", "stns.0.localisation."),
        ("stn1.fc.", "stns.0.regressor."),
        ("stn2.conv.", "stns.1.localisation."),
        ("stn2.fc.", "stns.1.regressor."),
        ("stn3.conv.", "stns.2.localisation."),
        ("stn3.fc.", "stns.2.regressor."),
    ],
    "enc": [("conv1.", "0."), ("bn1.", "1."), ("conv2.", "3."), ("bn2.", "4."), ("conv3.", "6.")],
    "pred": [("conv1.", "0."), ("bn1.", "1."), ("conv2.", "3.")],
}
UNMAPPED = {"enc": ("bn3.",)}


def map_key(kind: str, key: str) -> str | None:
    for a, b in KEY_MAP[kind]:
        if key.startswith(a):
            return b + key[len(a) :]
    if any(key.startswith(p) for p in UNMAPPED.get(kind, ())):
        return None
    raise KeyError(f"{kind}: official key {key} has no counterpart")


def copy_weights(kind: str, official: torch.nn.Module, ours: torch.nn.Module) -> None:
    theirs, mine = official.state_dict(), ours.state_dict()
    mapped = {}
    for k, v in theirs.items():
        m = map_key(kind, k)
        if m is not None:
            assert mine[m].shape == v.shape, (k, m)
            mapped[m] = v.clone()
    missing = set(mine) - set(mapped)
    assert not missing, f"{kind}: ours has unmapped keys {sorted(missing)[:5]}"
    ours.load_state_dict(mapped)


class TorchShim(types.ModuleType):
    """``torch`` as one official module sees it: torch's attributes except the overrides."""

    def __init__(self, **overrides):
        super().__init__("torch")
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def official_shims(mods: dict, dtype: torch.dtype):
    def zeros(*size, dtype=None, device=None, **kw):
        if isinstance(device, int) and device < 0:  # x.get_device() of a CPU tensor
            device = "cpu"
        if dtype is torch.float32:
            dtype = torch.get_default_dtype()
        return torch.zeros(*size, dtype=dtype, device=device, **kw)

    saved_cuda = torch.Tensor.cuda
    saved = {name: mods[name].torch for name in ("stn", "funcs")}
    torch.Tensor.cuda = lambda self, *a, **k: self
    mods["stn"].torch = TorchShim(zeros=zeros)
    mods["funcs"].torch = TorchShim(
        device=lambda *a, **k: torch.device("cpu"),
        **({"FloatTensor": torch.DoubleTensor} if dtype == torch.float64 else {}),
    )
    try:
        yield
    finally:
        torch.Tensor.cuda = saved_cuda
        for name, t in saved.items():
            mods[name].torch = t


def import_official(root: str) -> dict:
    if not hasattr(Image, "ANTIALIAS"):
        Image.ANTIALIAS = Image.LANCZOS  # removed in Pillow 10 (an alias of LANCZOS)
    try:
        import IPython  # noqa: F401, PLC0415
    except ImportError:  # utils/__init__.py imports notebook helpers that train.py never calls
        stub, display = types.ModuleType("IPython"), types.ModuleType("IPython.display")
        stub.get_ipython, display.display_html, stub.display = (lambda: None), (lambda *a, **k: None), display
        sys.modules.update({"IPython": stub, "IPython.display": display})
    sys.path.insert(0, root)
    import datasets.mvtec as mvtec  # noqa: PLC0415
    import models.siamese as siamese  # noqa: PLC0415
    import models.stn as stn  # noqa: PLC0415
    import train as train_mod  # noqa: PLC0415
    import utils.funcs as funcs  # noqa: PLC0415

    return {"stn": stn, "siamese": siamese, "train": train_mod, "funcs": funcs, "mvtec": mvtec}


def run(
    mods: dict, folder: Path, dtype: torch.dtype, table: Table, col: str, n_test: int, shot: int, seed: int
) -> None:
    torch.set_default_dtype(dtype)
    stn_mod, train_mod, mvtec = mods["stn"], mods["train"], mods["mvtec"]
    # -- inputs: the official loader ---------------------------------------------------------
    ds = mvtec.FSAD_Dataset_test(str(folder), class_name="bottle", is_train=False, resize=224, shot=1)
    train_paths = sorted((folder / "bottle" / "train" / "good").glob("*.png"))
    train_imgs = torch.stack([ds.transform_x(Image.open(p).convert("RGB")) for p in train_paths])
    ours_lanczos = torch.stack([load_image(p, 224, "lanczos") for p in train_paths])
    ours_bilinear = torch.stack([load_image(p, 224, "bilinear") for p in train_paths])
    table.add("loader: ours lanczos vs official ANTIALIAS", col, *diff(ours_lanczos, train_imgs))
    table.add("loader: ours bilinear vs official ANTIALIAS", col, *diff(ours_bilinear, train_imgs))
    train_imgs = train_imgs.to(dtype)
    test_items = [ds[i] for i in range(len(ds))][:n_test]
    test_loader = [(q[None].to(dtype), None, m[None], torch.tensor([y])) for q, _, m, y in test_items]
    test_imgs = torch.cat([q for q, *_ in test_loader])
    labels = np.array([int(y) for *_, y in test_loader])

    # -- identical weights ---------------------------------------------------------------------
    torch.manual_seed(seed)
    args = types.SimpleNamespace(stn_mode="rotation_scale")
    with official_shims(mods, dtype):
        o_stn = stn_mod.stn_net(args, pretrained=False)
        o_enc, o_pred = mods["siamese"].Encoder(), mods["siamese"].Predictor()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for s in (o_stn.stn1, o_stn.stn2, o_stn.stn3):  # non-identity thetas
                s.fc[2].weight.copy_(torch.randn(s.fc[2].weight.shape, generator=g, dtype=torch.float64) * 2e-3)
    o_stn, o_enc, o_pred = (m.to(dtype) for m in (o_stn, o_enc, o_pred))
    a = RegAD(AdapterConfig(weights="none", preset="paper", image_size=224, seed=seed))
    a.model, a.encoder, a.predictor = (m.to(dtype) for m in (a.model, a.encoder, a.predictor))

    def sync_weights():
        copy_weights("stn", o_stn, a.model)
        copy_weights("enc", o_enc, a.encoder)
        copy_weights("pred", o_pred, a.predictor)

    sync_weights()

    # -- features and thetas (eval mode) ----------------------------------------------------------
    thetas: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(o_stn, f"stn{i}").register_forward_hook(lambda m, i, out, n=n: thetas.__setitem__(n, out[1].detach()))
        for n, i in (("1", 1), ("2", 2), ("3", 3))
    ]
    o_stn.eval()
    a.model.eval()
    x = torch.cat([train_imgs[:2], test_imgs[:2]])
    with torch.no_grad(), official_shims(mods, dtype):
        o_out = o_stn(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        maps, th = a.model(x)
        frame = to_image_frame(maps, th)
    table.add("STN-ResNet layer3 registered map", col, *diff(maps[-1], o_out))
    for i in range(3):
        table.add(f"theta {i + 1}", col, *diff(th[i], thetas[str(i + 1)]))
        table.add(f"image-frame map stn{i + 1}_output", col, *diff(frame[i], getattr(o_stn, f"stn{i + 1}_output")))

    # -- one training step: loss, gradients, SGD step, BN statistics -----------------------------------
    n, lr = len(train_imgs), 1e-4
    plan = training_batches({"c": n}, n, shot, torch.Generator().manual_seed(seed + 2))[0]
    query = train_imgs[plan.queries][None]
    support = torch.stack([train_imgs[s] for s in plan.supports])[None]
    recorded: list[torch.Tensor] = []
    cos_loss = train_mod.CosLoss
    train_mod.CosLoss = lambda *a_, **k: recorded.append(cos_loss(*a_, **k)) or recorded[-1]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in (o_stn, o_enc, o_pred)]
    try:
        with official_shims(mods, dtype), contextlib.redirect_stdout(io.StringIO()):
            train_mod.train([o_stn, o_enc, o_pred], 1, [(query, support, None)], opts, io.StringIO())
    finally:
        train_mod.CosLoss = cos_loss
    o_loss = recorded[0] / 2 + recorded[1] / 2
    history = train_registration(
        a.model,
        a.encoder,
        a.predictor,
        {"c": TensorImages(train_imgs)},
        epochs=1,
        batch_size=n,
        shot=shot,
        lr=lr,
        momentum=0.9,
        lr_schedule="step-cosine",
        max_queries=None,
        generator=torch.Generator().manual_seed(seed + 2),
        device=torch.device("cpu"),
    )
    table.add("SimSiam loss", col, *diff(torch.tensor(history[0]), o_loss.detach()))
    for kind, official, ours in (("stn", o_stn, a.model), ("enc", o_enc, a.encoder), ("pred", o_pred, a.predictor)):
        mine = dict(ours.named_parameters())
        g_d, p_d, theirs_g, theirs_p = [], [], [], []
        for k, p in official.named_parameters():
            m = map_key(kind, k)
            if m is None or p.grad is None:
                continue
            g_d.append((mine[m].grad - p.grad).abs().max())
            theirs_g.append(p.grad.abs().max())
            p_d.append((mine[m].detach() - p.detach()).abs().max())
            theirs_p.append(p.detach().abs().max())
        gmax, pmax = torch.stack(g_d).max(), torch.stack(p_d).max()
        table.add(f"gradients ({kind})", col, float(gmax), float(gmax / torch.stack(theirs_g).max()))
        table.add(f"parameters after 1 SGD step ({kind})", col, float(pmax), float(pmax / torch.stack(theirs_p).max()))
        bufs = dict(ours.named_buffers())
        b_d = [
            (bufs[map_key(kind, k)].to(v.dtype) - v).abs().max()
            for k, v in official.named_buffers()
            if map_key(kind, k) is not None and v.is_floating_point()
        ]
        if b_d:
            table.add(f"BN running stats after the step ({kind})", col, float(torch.stack(b_d).max()), float("nan"))
    epochs = 50
    o_lrs, ours_lrs = [], []
    opt1 = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-4) for _ in range(3)]
    for e in range(1, epochs + 1):
        train_mod.adjust_learning_rate(opt1, [1e-4] * 3, e, types.SimpleNamespace(epochs=epochs))
        o_lrs.append(opt1[0].param_groups[0]["lr"])
        ours_lrs.append(cosine_lr(1e-4, "epoch-cosine", e, epochs, 0, 0))
    table.add("lr schedule (50 epochs)", col, *diff(torch.tensor(ours_lrs), torch.tensor(o_lrs)))

    # -- the support augmentation: the official functions in test.py's order vs ours (unshuffled) ------------
    sup = train_imgs[:shot]
    f = mods["funcs"]
    with torch.no_grad(), official_shims(mods, dtype):
        kinds = {
            "image": [sup],
            # the official angles (±π/4, ±3π/16, ±π/8, ±π/16) in our order (the set is what the Gaussian sees)
            "small rotations": [f.rot_img(sup, t) for t in augment.SMALL_ANGLES],
            "translations": [
                f.translation_img(sup, x, y)
                for x, y in (
                    (0.2, 0.2),
                    (-0.2, 0.2),
                    (-0.2, -0.2),
                    (0.2, -0.2),
                    (0.1, 0.1),
                    (-0.1, 0.1),
                    (-0.1, -0.1),
                    (0.1, -0.1),
                )
            ],
            "flip": [f.hflip_img(sup)],
            "grey": [f.grey_img(sup)],
            "rot90": [f.rot90_img(sup, r) for r in (1, 2, 3)],
        }
    g_aug = torch.Generator().manual_seed(seed + 4)
    shuffled = augment.augment_support(sup, generator=g_aug)
    ours_views = torch.empty_like(shuffled)
    ours_views[torch.randperm(len(shuffled), generator=torch.Generator().manual_seed(seed + 4))] = shuffled
    at = 0
    for kind, views in kinds.items():
        o = torch.cat(views)
        table.add(f"support views: {kind}", col, *diff(ours_views[at : at + len(o)], o))
        at += len(o)

    # -- the test pipeline (same trained weights on both sides) -------------------------------------
    sync_weights()
    with torch.no_grad(), official_shims(mods, dtype), contextlib.redirect_stdout(io.StringIO()):
        torch.manual_seed(seed + 3)
        o_maps, *_ = train_mod.test([o_stn, o_enc, o_pred], 0, [sup], test_loader)
    o_maps = torch.as_tensor(np.asarray(o_maps))
    a.adapt(sup)
    scores, maps = a.predict(test_imgs)
    table.add("test: blurred anomaly maps", col, *diff(maps, o_maps))
    o_scores = o_maps.flatten(1).max(dim=1).values
    table.add("test: image scores (map max)", col, *diff(scores, o_scores))
    auc_o, auc = roc_auc_score(labels, o_scores.numpy()), roc_auc_score(labels, scores.numpy())
    table.add("test: image AUROC", col, abs(auc - auc_o), abs(auc - auc_o) / max(abs(auc_o), 1e-300))
    # the Gaussian in its primal form (Cholesky of the C x C covariance; the default for N < C is the
    # Woodbury form |x-μ|² - |W(x-μ)|², exact in algebra but cancelling digits near the support's span)
    default_gaussian = a.gaussian
    try:
        a.gaussian = PositionGaussian(eps=0.01, form="primal")
        a.adapt(sup)
        table.add("test: maps, ours with the primal-form Gaussian", col, *diff(a.predict(test_imgs)[1], o_maps))
    finally:
        a.gaussian = default_gaussian
    torch.set_default_dtype(torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help="checkout of MediaBrain-SJTU/RegAD")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--n-test", type=int, default=4, help="test images (half of them anomalous)")
    ap.add_argument("--shot", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    mods = import_official(a.official)
    table = Table()
    with tempfile.TemporaryDirectory(prefix="regad_parity_") as tmp:
        folder = make_folder(
            Path(tmp), "bottle", n_train=6, n_good=a.n_test // 2, n_bad=a.n_test - a.n_test // 2, size=300, seed=a.seed
        )
        for name in a.dtypes.split(","):
            run(mods, folder, getattr(torch, name), table, name, a.n_test, a.shot, a.seed)
    print(table.render())


if __name__ == "__main__":
    main()
