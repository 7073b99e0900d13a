"""patchcore: nearest-neighbour search, coreset, Eq. 7 image score, adapter end to end."""

import math

import pytest
import torch

from fsad_bench.adapter import AdapterConfig
from fsad_bench.errors import FsadError
from fsad_bench.methods.patchcore import PatchCore, greedy_coreset, nearest, reweighted_score


def test_nearest_is_exact_and_chunked():
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    d, i = nearest(q, bank, k=3, chunk=7)
    ref = torch.cdist(q.double(), bank.double())
    rd, ri = ref.topk(3, largest=False)
    assert torch.equal(i, ri) and torch.allclose(d.double(), rd, atol=1e-5)
    # cancellation-free: far from the origin, tiny distances stay exact
    far = bank[:5] + 1e3
    d2, i2 = nearest(far + 0.05, far, k=1)
    assert torch.equal(i2[:, 0], torch.arange(5)) and torch.allclose(d2[:, 0], torch.full((5,), 0.2), rtol=1e-3)


#: points on a line: 0, 1, 3, 7, 20; the greedy order of 3 picks for every start point, by hand
#: (each step adds the point farthest from those chosen; squared or not, the argmax is the same)
LINE = torch.tensor([[0.0], [1.0], [3.0], [7.0], [20.0]])
GREEDY_3 = {
    0: [0, 4, 3],  # from 0: 20 is farthest; then 7 (7 from 0) beats 3 (3)
    1: [1, 4, 3],  # from 1: 20; then 7 (6 from 1)
    2: [2, 4, 3],  # from 3: 20; then 7 (4 from 3) beats 0 (3 from 3)
    3: [3, 4, 0],  # from 7: 20 (13 away); then 0 (7 from 7)
    4: [4, 0, 3],
}  # from 20: 0; then 7 (7 from 0, 13 from 20)


def test_greedy_coreset_by_hand():
    starts = set()
    for seed in range(12):
        idx = greedy_coreset(LINE, 3, dim=0, generator=torch.Generator().manual_seed(seed))
        assert idx.dtype == torch.long and len(idx) == 3
        start = int(idx[0])
        assert idx.tolist() == GREEDY_3[start], f"seed {seed}"
        assert torch.equal(idx, greedy_coreset(LINE, 3, dim=0, generator=torch.Generator().manual_seed(seed)))
        starts.add(start)
    assert len(starts) >= 3  # the start point is drawn, and the order follows from it
    # a random projection keeps a 1-D order when the features are one direction (x * v)
    v = torch.randn(1, 256, generator=torch.Generator().manual_seed(1))
    idx = greedy_coreset(LINE * v, 3, dim=16, generator=torch.Generator().manual_seed(2))
    assert idx.tolist() == GREEDY_3[int(idx[0])]
    assert torch.equal(greedy_coreset(LINE, 9), torch.arange(5))  # n >= M: every row, in order


def test_reweighted_score_by_hand():
    # bank: m0 = 0, m1 = 1, m2 = 3 (1-D); one test image with patches at 0.25 and 5
    bank = torch.tensor([[0.0], [1.0], [3.0]])
    emb = torch.tensor([[[0.25], [5.0]]])
    d, i = nearest(emb[0], bank)
    patch, nn = d[:, 0][None], i[:, 0][None]
    assert patch.tolist() == [[0.25, 2.0]] and nn.tolist() == [[0, 2]]
    # m* = 5, s* = 2, m^ = 3; N_2(m^) = {3, 1}: distances from 5: 2, 4
    w = 1 - math.exp(2) / (math.exp(2) + math.exp(4))
    assert reweighted_score(patch, nn, emb, bank, b=2).item() == pytest.approx(w * 2)
    assert reweighted_score(patch, nn, emb, bank, b=1).item() == 2.0


def test_adapter_scores_and_maps():
    torch.manual_seed(0)
    support = torch.rand(2, 3, 64, 64) * 0.2 + 0.4
    test = torch.cat([support[:1], torch.rand(1, 3, 64, 64)])
    a = PatchCore(AdapterConfig(weights="none", image_size=64, options={"arch": "resnet18", "num_neighbors": 1}))
    a.adapt(support)
    scores, maps = a.predict(test)
    assert scores.shape == (2,) and maps.shape == (2, 64, 64)
    assert scores[0] == pytest.approx(0.0, abs=1e-3) and scores[1] > 1  # a support image is in the bank
    assert "arch" in a.describe()["hparams"] and a.label == "patchcore [paper, resnet18, random-init, num_neighbors=1]"
    # coreset keeps the requested share; the scores stay finite
    b = PatchCore(AdapterConfig(weights="none", image_size=64, options={"arch": "resnet18", "coreset_ratio": 0.25}))
    b.adapt(support)
    assert len(b.bank) == int(len(a.bank) * 0.25)
    assert torch.isfinite(b.predict(test)[0]).all()


def test_bad_options():
    for preset in PatchCore.presets.values():
        PatchCore.check_options(preset)
    PatchCore.check_options({"taps": ["layer1", "layer2"], "coreset_ratio": 1, "sigma": 0, "knn": "faiss"})
    for bad, what in [
        ({"upsample": "cubic"}, "upsample.*one of 'bilinear', 'nearest'"),
        ({"knn": "annoy"}, "knn"),
        ({"coreset_ratio": 0.0}, r"coreset_ratio.*in \(0, 1\]"),
        ({"coreset_ratio": 1.5}, "coreset_ratio"),
        ({"num_neighbors": 0}, "num_neighbors"),
        ({"taps": "layer2"}, "taps"),
        ({"augment": 1}, "augment"),
    ]:
        with pytest.raises(FsadError, match=what):
            PatchCore.check_options(bad)
    with pytest.raises(FsadError, match="no default taps"):
        PatchCore(AdapterConfig(weights="none", options={"arch": "vgg11"}))


def test_faiss_optional():
    support, test = torch.rand(2, 3, 64, 64), torch.rand(1, 3, 64, 64)
    a = PatchCore(AdapterConfig(weights="none", image_size=64, options={"arch": "resnet18", "knn": "faiss"}))
    try:
        import faiss  # noqa: F401
    except ImportError:
        with pytest.raises(FsadError, match="needs faiss"):
            a.adapt(support)
        return
    a.adapt(support)
    b = PatchCore(AdapterConfig(weights="none", image_size=64, options={"arch": "resnet18"}))
    b.adapt(support)
    assert torch.allclose(a.predict(test)[1], b.predict(test)[1], rtol=1e-3, atol=1e-3)
