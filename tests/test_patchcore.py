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


def test_greedy_coreset_by_hand():
    # points on a line: 0, 1, 2, 10; start forced at index 0 by a one-point-start trick
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    idx = greedy_coreset(x, 4, dim=0, generator=torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == [0, 1, 2, 3]
    first = int(idx[0])
    idx2 = greedy_coreset(x, 2, dim=0, generator=torch.Generator().manual_seed(0))
    assert int(idx2[0]) == first
    expected_second = 3 if first != 3 else 0  # the farthest point from the start
    assert int(idx2[1]) == expected_second
    assert torch.equal(greedy_coreset(x, 9), torch.arange(4))


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
    with pytest.raises(FsadError, match="upsample"):
        PatchCore(AdapterConfig(weights="none", options={"arch": "resnet18", "upsample": "cubic"}))
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
