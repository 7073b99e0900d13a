"""anomalib:<Model> adapters (skipped without the anomalib extra) and the registry prefix."""

import pytest
import torch

from fsad_bench import registry
from fsad_bench.adapter import AdapterConfig
from fsad_bench.errors import FsadError
from fsad_bench.methods import anomalib_models

needs_anomalib = pytest.mark.skipif(anomalib_models.anomalib_version() is None, reason="anomalib extra not installed")


def test_registry_prefix_without_anomalib(monkeypatch):
    monkeypatch.setattr(anomalib_models, "anomalib_version", lambda: None)
    monkeypatch.setattr(registry, "_installed", lambda package: package != "anomalib")
    assert not any(n.startswith("anomalib:") for n in registry.available())
    with pytest.raises(FsadError, match=r"pip install 'fsad-bench\[anomalib\]'"):
        registry.get("anomalib:Padim")
    with pytest.raises(FsadError, match="unknown anomalib model 'Nope'"):
        registry.get("anomalib:Nope")


@needs_anomalib
def test_registry_lists_and_resolves():
    assert {"anomalib:Padim", "anomalib:Patchcore", "anomalib:WinClip"} <= set(registry.available())
    assert registry.get("anomalib:Padim").name == "anomalib:Padim"


def _images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 64, 64, generator=g) * 0.2 + 0.4, torch.rand(2, 3, 64, 64, generator=g)


@needs_anomalib
def test_padim_equals_position_gaussian():
    """anomalib's PadimModel (all channels) == our PositionGaussian on the same features
    (nearest-upsampled pyramid, bilinear map upsampling, sigma 4 blur)."""
    import torch.nn.functional as F

    from fsad_bench.components.maps import smooth_maps
    from fsad_bench.components.position_gaussian import PositionGaussian

    support, test = _images()
    torch.manual_seed(0)  # the random-init backbone, as the run layer seeds it before constructing
    a = registry.get("anomalib:Padim")(AdapterConfig(weights="none", image_size=64, options={"n_features": "all"}))
    a.adapt(support)
    scores, maps = a.predict(test)
    assert a.hparams["n_features_used"] == 448 and a.hparams["anomalib_version"]
    fx = a.model.feature_extractor

    def feats(x):
        f = list(fx(a.normalize(x)).values())
        return torch.cat([f[0]] + [F.interpolate(t, size=f[0].shape[-2:], mode="nearest") for t in f[1:]], 1)

    with torch.no_grad():
        ours = smooth_maps(PositionGaussian(0.01, form="primal").fit(feats(support)).mahalanobis(feats(test)), 64, 4.0)
    assert torch.allclose(maps, ours, rtol=1e-3, atol=1e-3 * ours.abs().max())
    assert torch.allclose(scores, ours.flatten(1).amax(1), rtol=1e-3)


@needs_anomalib
def test_patchcore_equals_ours():
    from fsad_bench.methods.patchcore import PatchCore

    support, test = _images()
    opts = {"arch": "resnet18", "coreset_ratio": 1.0}
    torch.manual_seed(0)  # the same random-init backbone on both sides (the run layer seeds like this)
    a = registry.get("anomalib:Patchcore")(AdapterConfig(weights="none", image_size=64, options=opts))
    a.adapt(support)
    torch.manual_seed(0)
    b = PatchCore(AdapterConfig(weights="none", image_size=64, options={**opts, "upsample": "nearest"}))
    b.adapt(support)
    (sa, ma), (sb, mb) = a.predict(test), b.predict(test)
    assert torch.allclose(sa, sb, rtol=1e-4) and torch.allclose(ma, mb, rtol=1e-4, atol=1e-4)


def test_option_constraints():
    """Declared per option and checked at planning (no anomalib needed)."""
    for cls in anomalib_models.MODELS.values():
        for preset in cls.presets.values():
            cls.check_options(preset)
    padim, patchcore, winclip = (anomalib_models.MODELS[m] for m in ("Padim", "Patchcore", "WinClip"))
    padim.check_options({"n_features": "all", "taps": ["layer1"]})
    padim.check_options({"n_features": 50})
    for cls, bad, what in [
        (padim, {"n_features": "most"}, "n_features"),
        (padim, {"n_features": 0}, "n_features"),
        (patchcore, {"coreset_ratio": 0}, r"coreset_ratio.*in \(0, 1\]"),
        (patchcore, {"num_neighbors": 0}, "num_neighbors"),
        (winclip, {"scales": 2}, "scales"),
        (winclip, {"batch_size": 0}, "batch_size"),
    ]:
        with pytest.raises(FsadError, match=what):
            cls.check_options(bad)


def test_winclip_weights_lookup_without_open_clip(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)
    assert anomalib_models.winclip_weights_cached() is None


def test_winclip_weights_lookup(tmp_path, monkeypatch):
    """Where open_clip itself looks (~/.cache/clip, the Hugging Face cache); never torch hub's folder."""
    pytest.importorskip("open_clip")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    name = "vit_b_16_plus_240-laion400m_e31-8fb26589.pt"
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / name).write_bytes(b"x")
    assert anomalib_models.winclip_weights_cached() is None
    (tmp_path / ".cache" / "clip").mkdir(parents=True)
    (tmp_path / ".cache" / "clip" / name).write_bytes(b"x")
    assert anomalib_models.winclip_weights_cached() == str(tmp_path / ".cache" / "clip" / name)


def test_winclip_missing_weights_is_one_line(monkeypatch):
    pytest.importorskip("anomalib")
    pytest.importorskip("open_clip")
    monkeypatch.setattr(anomalib_models, "winclip_weights_cached", lambda: None)
    with pytest.raises(FsadError, match="ViT-B-16-plus-240 / laion400m_e31 are not cached"):
        anomalib_models.AnomalibWinClip(AdapterConfig(weights="none"))
