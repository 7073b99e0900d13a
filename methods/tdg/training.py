"""TDG's SinGAN-like training: a :class:`~fsad_bench.methods.tdg.torch_model.TDGHierarchy` is
trained scale by scale, coarse to fine, with the official cross-entropy losses (see README.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fsad_bench.methods.tdg.torch_model import TDGHierarchy, apply_all


def patch_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every patch's logits ``(B, C, h, w)`` against its image's label ``(B,)``."""
    return F.cross_entropy(logits, labels.view(-1, 1, 1).expand(-1, *logits.shape[-2:]))


@dataclass(frozen=True)
class HierarchyTrainer:
    """The training recipe of one scale, applied to every scale of a hierarchy by :meth:`train`.

    ``lr_g`` / ``lr_d``: Adam learning rates (betas ``(beta1, 0.999)``), multiplied by ``gamma`` after
    ``milestone_g`` / ``milestone_d`` iterations; ``d_steps`` / ``g_steps``: D and G updates per
    iteration; ``alpha``: weight of the reconstruction MSE (0: none); ``noise_amp``: noise amplitude
    of a scale = ``noise_amp`` x mean |real - coarser reconstruction| per image (pixels in [-1, 1]);
    ``transforms_per_step``: transformations drawn per iteration (None: all of them);
    ``sample_every``: every that many iterations (0: never), and at the last one, one more generator
    forward of the reconstruction input in training mode, as the official loop's sample-saving step
    (``plt.imsave(... G(z_opt) ...)`` at epochs 0, 150, 300, …, niter − 1): it updates only G's BatchNorm
    running statistics, which the coarser-scale chains use in eval mode. ``foreach``: Adam's multi-tensor
    implementation (the same element-wise ops in the same order, bit-identical to the per-tensor loop on
    CPU, test ``test_foreach_adam_is_bit_identical``; ≈ 2x faster steps on these nets' many small tensors).
    """

    lr_g: float
    lr_d: float
    beta1: float
    gamma: float
    milestone_d: int
    milestone_g: int
    d_steps: int
    g_steps: int
    alpha: float
    noise_amp: float
    transforms_per_step: int | None = None
    sample_every: int = 0
    foreach: bool = True

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
            rec = model.reconstruct_prev(n, ids_all, amps)  # coarser scales are frozen: the same every iteration
            if n > 0:  # noise amplitude: noise_amp x mean |real - reconstruction| per image
                amps[:, n] = self.noise_amp * (reals[n] - rec).abs().flatten(1).mean(1)
            self._train_scale(model, n, reals[n], ids_all, amps, niter, gen, batch_size, T, rec_all=rec)
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
        rec_all: torch.Tensor | None = None,
    ) -> None:
        """``niter`` iterations of scale ``n`` on ``real_all`` ``(N, 3, s_n, s_n)`` in [-1, 1].

        ``rec_all``: ``model.reconstruct_prev(n, ids_all, amps)`` ``(N, 3, s_n, s_n)`` if already computed
        (the coarser generators are frozen in eval mode, so the reconstruction input is computed once per
        scale instead of once per iteration; a batch takes its rows)."""
        G, D = model.generators[n], model.discriminators[n]
        dev = real_all.device
        if rec_all is None:
            rec_all = model.reconstruct_prev(n, ids_all, amps)
        z_rec_all = model.z_rec[n].expand(len(real_all), 3, -1, -1)
        noisy_rec_all = amps[:, n].view(-1, 1, 1, 1) * z_rec_all + rec_all
        G.train(), D.train()
        opt_d = torch.optim.Adam(D.parameters(), lr=self.lr_d, betas=(self.beta1, 0.999), foreach=self.foreach)
        opt_g = torch.optim.Adam(G.parameters(), lr=self.lr_g, betas=(self.beta1, 0.999), foreach=self.foreach)
        sched_d = torch.optim.lr_scheduler.MultiStepLR(opt_d, [self.milestone_d], gamma=self.gamma)
        sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, [self.milestone_g], gamma=self.gamma)
        size = model.sizes[n]
        for it in range(niter):
            full = batch_size is None or batch_size >= len(real_all)
            if full:
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
            real_t = apply_all(transforms, real)  # (T'*b, 3, s, s)
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
                logits_fake = D(apply_all(transforms, fake))
                loss_fake = patch_ce(logits_fake, torch.full((len(logits_fake),), T, device=dev))
                (loss_real + loss_fake).backward()
                opt_d.step()
            # (2) G: make D recognise the transformations of the fakes + reconstruction
            for p in D.parameters():
                p.requires_grad_(False)
            rec_prev, noisy_rec = (rec_all, noisy_rec_all) if full else (rec_all[idx], noisy_rec_all[idx])
            for _ in range(self.g_steps):
                opt_g.zero_grad()
                fake = G(noisy, prev, ids)
                loss = patch_ce(D(apply_all(transforms, fake)), labels)
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
