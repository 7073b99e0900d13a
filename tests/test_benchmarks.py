"""Benchmarks (``benchmarks/trained.py``, ``benchmarks/gpu.sh``) and the TDG speed-ups they measured:
each faster TDG function is compared with the function it replaced, kept here verbatim (as of the
commit before the speed-ups)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsad_bench.adapter import AdapterConfig
from fsad_bench.methods.tdg.adapter import TDG
from fsad_bench.methods.tdg.torch_model import (
    TDGHierarchy,
    apply_all,
    dihedral_transformations,
    official_transformations,
)
from fsad_bench.methods.tdg.training import HierarchyTrainer, patch_ce

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# The TDG code before the speed-ups
# ----------------------------------------------------------------------------------------
def apply_all_before(transforms, x):
    return torch.cat([t.apply(x) for t in transforms])


class TrainerBefore(HierarchyTrainer):
    def train(
        self,
        model: TDGHierarchy,
        images: torch.Tensor,
        niter: int,
        gen: torch.Generator,
        batch_size: int | None = None,
        warm_start: bool = False,
        index_scale: float = 1.0,
    ) -> None:
        """Train every scale of ``model``, coarse to fine, ``niter`` iterations each, on ``images``
        ``(N, 3, S, S)`` in [0, 1]; every random draw comes from ``gen``.

        ``batch_size``: images per iteration (None = all; the official few-shot setting).
        Fresh Adam optimisers per scale. ``warm_start=False`` (TDG): a scale whose width
        equals the previous one's starts from its trained weights (official); ``True``
        (``tdg+`` adapting): every scale keeps its own pre-trained weights. ``index_scale``:
        image ``i``'s index channel holds ``i · index_scale`` (official: 1). Sets the model's
        ``z_rec`` and ``amps``.
        """
        dev = next(model.parameters()).device
        reals = [r.to(dev) for r in model.pyramid(images.to(dev))]
        n_img = len(images)
        ids_all = torch.arange(n_img, dtype=torch.float32, device=dev) * index_scale
        # fixed reconstruction noise maps (official: one grey map per scale, shared by all images)
        model.z_rec = [torch.randn(1, 1, s, s, generator=gen).expand(1, 3, s, s).to(dev) for s in model.sizes]
        amps = torch.ones(n_img, len(model.sizes), device=dev)
        T = len(model.transforms)
        for n in range(len(model.sizes)):
            G, D = model.generators[n], model.discriminators[n]
            if n > 0 and model.widths[n] == model.widths[n - 1] and not warm_start:
                G.load_state_dict(model.generators[n - 1].state_dict())
                D.load_state_dict(model.discriminators[n - 1].state_dict())
            if n > 0:  # noise amplitude: noise_amp x mean |real - reconstruction| per image
                rec = model.reconstruct_prev(n, ids_all, amps)
                amps[:, n] = self.noise_amp * (reals[n] - rec).abs().flatten(1).mean(1)
            self._train_scale(model, n, reals[n], ids_all, amps, niter, gen, batch_size, T)
        model.amps = amps

    def _train_scale(
        self,
        model: TDGHierarchy,
        n: int,
        real_all: torch.Tensor,
        ids_all: torch.Tensor,
        amps: torch.Tensor,
        niter: int,
        gen: torch.Generator,
        batch_size: int | None,
        T: int,
    ) -> None:
        """``niter`` iterations of scale ``n`` on ``real_all`` ``(N, 3, s_n, s_n)`` in [-1, 1]."""
        G, D = model.generators[n], model.discriminators[n]
        dev = real_all.device
        G.train(), D.train()
        opt_d = torch.optim.Adam(D.parameters(), lr=self.lr_d, betas=(self.beta1, 0.999))
        opt_g = torch.optim.Adam(G.parameters(), lr=self.lr_g, betas=(self.beta1, 0.999))
        sched_d = torch.optim.lr_scheduler.MultiStepLR(opt_d, [self.milestone_d], gamma=self.gamma)
        sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, [self.milestone_g], gamma=self.gamma)
        size = model.sizes[n]
        for it in range(niter):
            if batch_size is None or batch_size >= len(real_all):
                idx = torch.arange(len(real_all), device=dev)
            else:
                idx = torch.randperm(len(real_all), generator=gen)[:batch_size].to(dev)
            real, ids, amp = real_all[idx], ids_all[idx], amps[idx]
            b = len(idx)
            z = model.noise(b, n, size, gen, dev)
            if self.transforms_per_step and self.transforms_per_step < T:  # cpu preset: a random subset
                chosen = torch.randperm(T, generator=gen)[: self.transforms_per_step].tolist()
            else:  # official: every transformation, every iteration
                chosen = list(range(T))
            transforms = [model.transforms[t] for t in chosen]
            real_t = apply_all_before(transforms, real)  # (T'*b, 3, s, s)
            labels = torch.tensor(chosen, device=dev).repeat_interleave(b)
            # (1) D: real transformed patches -> their transformation, fakes -> class T
            for p in D.parameters():
                p.requires_grad_(True)
            for _ in range(self.d_steps):
                opt_d.zero_grad()
                loss_real = patch_ce(D(real_t), labels)
                prev = model.sample_prev(n, ids, amp, gen)
                noisy = amp[:, n].view(-1, 1, 1, 1) * z + prev if n > 0 else z
                with torch.no_grad():
                    fake = G(noisy, prev, ids)
                logits_fake = D(apply_all_before(transforms, fake))
                loss_fake = patch_ce(logits_fake, torch.full((len(logits_fake),), T, device=dev))
                (loss_real + loss_fake).backward()
                opt_d.step()
            # (2) G: make D recognise the transformations of the fakes + reconstruction
            for p in D.parameters():
                p.requires_grad_(False)
            rec_prev = model.reconstruct_prev(n, ids, amp)
            z_rec = model.z_rec[n].expand(b, 3, -1, -1)
            noisy_rec = amp[:, n].view(-1, 1, 1, 1) * z_rec + rec_prev
            for _ in range(self.g_steps):
                opt_g.zero_grad()
                fake = G(noisy, prev, ids)
                loss = patch_ce(D(apply_all_before(transforms, fake)), labels)
                if self.alpha:
                    loss = loss + self.alpha * F.mse_loss(G(noisy_rec, rec_prev, ids), real)
                loss.backward()
                opt_g.step()
            if self.sample_every and (it % self.sample_every == 0 or it == niter - 1):
                with torch.no_grad():
                    G(noisy_rec, rec_prev, ids)
            for p in D.parameters():
                p.requires_grad_(True)
            sched_d.step(), sched_g.step()
        G.eval(), D.eval()


class HierarchyBefore(TDGHierarchy):
    @torch.no_grad()
    def score_before(self, images: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly scores ``(B,)`` and maps ``(B, S, S)`` for ``images`` ``(B, 3, S, S)`` in [0, 1].

        Per scale: p(correct transformation) per patch for every transformation;
        normality = mean over transformations of the mean of the lowest ``fraction`` of
        patches; score = 1 - mean over scales. Map: 1 - p(correct), mapped back through
        each inverse transformation, averaged (transformations with a vote there), padded
        to the scale's grid and upsampled; averaged over scales.
        """
        dev = next(self.parameters()).device
        out_size = images.shape[-1]
        b, T = len(images), len(self.transforms)
        normality, maps = [], []
        for n, real in enumerate(self.pyramid(images.to(dev))):
            D = self.discriminators[n].eval()
            logits = D(apply_all_before(self.transforms, real))[:, :T]  # (T*b, T, h, w)
            probs = logits.softmax(1).view(T, b, T, *logits.shape[-2:])
            correct = torch.stack([probs[t, :, t] for t in range(T)])  # (T, b, h, w)
            flat = correct.flatten(2).sort(dim=2).values
            k = max(1, int(flat.shape[2] * fraction))
            normality.append(flat[:, :, :k].mean(2).mean(0))
            back = torch.stack(
                [
                    t.invert(1 - correct[i], size=real.shape[-1], fill=float("nan"))
                    for i, t in enumerate(self.transforms)
                ]
            )
            m = back.nanmean(0)
            m = torch.where(torch.isnan(m), torch.nanmean(m), m)
            margin = (real.shape[-1] - m.shape[-1]) // 2
            m = F.pad(m[:, None], [margin] * 4, mode="replicate")
            maps.append(F.interpolate(m, size=(out_size, out_size), mode="bilinear", align_corners=False)[:, 0])
        scores = 1 - torch.stack(normality).mean(0)
        return scores.cpu(), torch.stack(maps).mean(0).cpu()


# ----------------------------------------------------------------------------------------
# Before == after
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [17, 26])
def test_batched_transformations_equal_the_loop(size):
    ts = official_transformations()
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    new, old = apply_all(ts, x), apply_all_before(ts, x)
    assert torch.equal(new, old)  # the values: bit for bit
    w = torch.randn(new.shape, generator=torch.Generator().manual_seed(1))
    (g_new,) = torch.autograd.grad((new * w).sum(), x)
    (g_old,) = torch.autograd.grad((old * w).sum(), x)
    assert torch.equal(g_new, g_old)  # with a gradient: the loop, as before
    with torch.no_grad():
        assert torch.equal(apply_all(ts, x), old)  # without: the gather


@pytest.mark.parametrize("transforms", [official_transformations, dihedral_transformations])
def test_batched_scoring_equals_the_loop(transforms):
    torch.manual_seed(0)
    model = HierarchyBefore([17, 26], transforms(), 8, 8).eval()
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    s_new, m_new = model.score(images, 0.1)
    s_old, m_old = model.score_before(images, 0.1)
    assert torch.equal(s_new, s_old) and torch.equal(m_new, m_old)


def _train(trainer_cls, batch_size, niter=2, n_img=3, transforms_per_step=None, sample_every=0):
    torch.manual_seed(0)
    model = TDGHierarchy([16, 20, 24], dihedral_transformations()[:4], 8, 8)
    trainer = trainer_cls(
        lr_g=5e-4,
        lr_d=5e-4,
        beta1=0.5,
        gamma=0.1,
        milestone_d=500,
        milestone_g=1000,
        d_steps=2,
        g_steps=2,
        alpha=10.0,
        noise_amp=0.1,
        transforms_per_step=transforms_per_step,
        sample_every=sample_every,
    )
    images = torch.rand(n_img, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    trainer.train(model, images, niter, torch.Generator().manual_seed(2), batch_size=batch_size)
    return model


@pytest.mark.slow  # about 20 s on 2 cores
@pytest.mark.parametrize("batch_size,per_step,sample_every", [(None, None, 1), (2, 2, 0)])
def test_training_equals_the_code_before(batch_size, per_step, sample_every):
    """Same random draws, bit-identical trained weights and noise amplitudes (reconstruction input computed
    once per scale; a batch takes its rows)."""
    new = _train(HierarchyTrainer, batch_size, transforms_per_step=per_step, sample_every=sample_every)
    old = _train(TrainerBefore, batch_size, transforms_per_step=per_step, sample_every=sample_every)
    assert torch.equal(new.amps, old.amps)
    sn, so = new.state_dict(), old.state_dict()
    assert sn.keys() == so.keys() and all(torch.equal(sn[key], so[key]) for key in sn)


def test_adapter_scores_equal_before():
    """The tdg adapter (cpu preset, 3 iterations) before and after: the same scores and maps, bit for bit."""
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    test = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    outs = []
    for trainer_cls in (HierarchyTrainer, TrainerBefore):
        torch.manual_seed(0)
        a = TDG(AdapterConfig(preset="cpu", image_size=48, options={"niter": 3, "clahe": False}))
        a.trainer = trainer_cls(**{f: getattr(a.trainer, f) for f in a.trainer.__dataclass_fields__})
        a.adapt(images)
        outs.append(a.predict(test))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ----------------------------------------------------------------------------------------
# The benchmark scripts
# ----------------------------------------------------------------------------------------
def test_counts_the_multiply_adds_and_traffic_of_a_product():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import trained

    a, b = torch.randn(32, 16), torch.randn(16, 8)
    flops, nbytes = trained.count(lambda: a @ b)
    assert flops == 2 * 32 * 16 * 8 and nbytes == 4 * (32 * 16 + 16 * 8 + 32 * 8)


@pytest.mark.slow
def test_gpu_sh_runs_in_its_cpu_mode(tmp_path):
    env = {
        **os.environ,
        "GPU_SH_DEVICE": "cpu",
        "GPU_SH_OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[-1] == "gpu.sh: done on cpu"
    assert lines[-2].startswith("summary: regad ") and "tdg+" in lines[-2]
    assert any(line.startswith("projected paper_mvtec wall time") for line in lines)
    assert any(line.startswith("| tdg+ | cpu | before: iteration at scale 0") for line in lines)  # --before
    assert (tmp_path / "gpu_sh.txt").read_text().endswith("gpu.sh: done on cpu\n")
