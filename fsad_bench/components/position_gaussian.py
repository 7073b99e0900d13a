"""Per-position multivariate Gaussians (PaDiM / RegAD), batched over all positions.

At each of the ``P = H W`` positions, ``N`` feature vectors of ``C`` channels give a mean
``μ`` and a covariance ``Σ = Xᵀ X / (N - 1) + ε I`` (``X``: centred samples, ``(N, C)``);
a test vector ``x`` is scored by the Mahalanobis distance ``sqrt((x-μ)ᵀ Σ⁻¹ (x-μ))``.

Two exact ways to compute it, chosen by ``form``:

* ``primal`` — Cholesky of the ``C × C`` covariance, inverse factor kept: scoring costs
  ``C²`` per position. Used when ``N >= C``.
* ``dual`` — Woodbury identity, ``Σ⁻¹ = (I - Xᵀ G⁻¹ X) / ε`` with ``G = ε m I + X Xᵀ = L Lᵀ``,
  ``m = N - 1``: only an ``N × N`` matrix per position is factorised. The inverse factor is
  folded into the samples at fit time, ``W = L⁻¹ X`` ``(N, C)``, so that
  ``ε (x-μ)ᵀ Σ⁻¹ (x-μ) = |x-μ|² - |W (x-μ)|²``: one batched product of ``N C`` per position
  and test image, and only ``W`` (no ``L⁻¹``) is streamed per call. The few-shot case:
  RegAD's augmented support has ``22 k`` samples, fewer than ``C = 448`` up to k = 20.
  Same numbers as the primal form up to float32 round-off.

Layout: both :meth:`PositionGaussian.fit_samples` and :meth:`PositionGaussian.score_samples`
take *position-major* samples ``(P, N, C)`` (each position's ``(N, C)`` matrix contiguous,
what the batched products read; :func:`fsad_bench.components.maps.pyramid_samples` writes features
straight into it) and work in place in that buffer: the fitted ``W`` overwrites the
support samples, the test buffer is centred in place. A test batch of ``B`` images is
scored in one pass over ``W`` (each position's ``W`` is read once for all ``B`` images).
:meth:`score_pyramid` fuses the layout into the scoring: band by band of grid rows, the
centred test samples are written into a small reused block and scored at once, so the
``(P, B, C)`` test buffer never exists (one write and one read of it per image less, and
a block of a few MB instead of ``P B C`` floats). Same numbers as
``score_samples(pyramid_samples(...))``, bit for bit.
:meth:`fit` / :meth:`mahalanobis` take ``(N, C, H, W)`` maps and copy them into that layout.

Everything is batched over positions (``torch.bmm`` / ``torch.linalg``), no Python loop
over positions; ``chunk`` positions are factorised at once (bounds the temporaries and
keeps a chunk's samples in cache between the Gram product, the Cholesky and the fold).
"""

from __future__ import annotations

import math

import torch

from fsad_bench.components.maps import ScratchBuffer, pyramid_samples, upsample


def position_major(features: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` maps -> a new contiguous ``(H W, N, C)`` tensor (one copy).

    Copied map by map (each a ``(C, H W)`` transpose): one strided permute of the whole
    ``(N, C, H, W)`` block walks memory ``H W`` floats apart and was 7x slower on CPU."""
    n, c, h, w = features.shape
    out = torch.empty(h * w, n, c, dtype=features.dtype, device=features.device)
    view = out.view(h, w, n, c)
    for i in range(n):
        view[:, :, i].copy_(features[i].permute(1, 2, 0))
    return out


class PositionGaussian:
    """Gaussian per spatial position.

    ``eps``: ridge added to every covariance (RegAD / PaDiM: 0.01). ``form``: ``"auto"``
    (dual when N < C), ``"primal"`` or ``"dual"``. ``chunk``: positions factorised at once
    (8: a chunk's samples stay in the core's cache from the mean to the fold; 1.39 s vs 1.77 s
    with 32 for the k = 8 fit at 224 px, one Xeon thread; no effect on the numbers).
    """

    #: positions per band of :meth:`score_pyramid` (rounded to whole grid rows)
    band_positions = 224

    def __init__(self, eps: float = 0.01, form: str = "auto", chunk: int = 8):
        if form not in ("auto", "primal", "dual"):
            raise ValueError(f"form must be auto, primal or dual, got {form!r}")
        self.eps, self.form, self.chunk = eps, form, chunk
        self.mean: torch.Tensor | None = None  # (P, C)
        self.inv_chol: torch.Tensor | None = None  # primal only: (P, C, C) lower-triangular L⁻¹
        self.folded: torch.Tensor | None = None  # dual only: (P, N, C) = L⁻¹ X (G = L Lᵀ)
        self.shape: tuple[int, int] | None = None
        self.used_form = ""

    # -- fit -----------------------------------------------------------------------------
    def fit(self, features: torch.Tensor) -> PositionGaussian:
        """Fit from ``features`` ``(N, C, H, W)``, N >= 2 (copied; the input is left as is)."""
        _, _, h, w = features.shape
        return self.fit_samples(position_major(features), (h, w))

    @torch.no_grad()
    def fit_samples(self, x: torch.Tensor, shape: tuple[int, int]) -> PositionGaussian:
        """Fit from position-major samples ``x`` ``(P, N, C)`` with ``P = shape[0] * shape[1]``.

        ``x`` is consumed: centred in place and, in the dual form, overwritten by ``L⁻¹ X``
        (kept as :attr:`folded`, no second copy)."""
        p, n, c = x.shape
        if p != shape[0] * shape[1]:
            raise ValueError(f"{p} positions do not match the grid {shape}")
        if n < 2:
            raise ValueError(f"need at least 2 feature maps to fit a covariance, got {n}")
        x = x.contiguous()
        dual = self.form == "dual" or (self.form == "auto" and n < c)
        self.used_form = "dual" if dual else "primal"
        self.mean = torch.empty(p, c, dtype=x.dtype, device=x.device)
        size = n if dual else c
        eye = torch.eye(size, dtype=x.dtype, device=x.device)
        self.inv_chol = None if dual else torch.empty(p, c, c, dtype=x.dtype, device=x.device)
        for s in range(0, p, self.chunk):
            xc = x[s : s + self.chunk]  # (chunk, N, C), contiguous
            torch.mean(xc, dim=1, out=self.mean[s : s + self.chunk])
            xc -= self.mean[s : s + self.chunk, None, :]
            if dual:
                gram = torch.baddbmm(eye, xc, xc.transpose(1, 2), beta=self.eps * (n - 1))
                chol = self._cholesky(gram)
                # W = L⁻¹ X, solved as Wᵀ Lᵀ = Xᵀ (column-major right-hand side, no copy in)
                xc.copy_(torch.linalg.solve_triangular(chol.mT, xc.mT, upper=True, left=False).mT)
            else:
                gram = torch.baddbmm(eye, xc.transpose(1, 2), xc, beta=self.eps, alpha=1.0 / (n - 1))
                chol = self._cholesky(gram)
                self.inv_chol[s : s + self.chunk] = torch.linalg.solve_triangular(
                    chol, eye.expand_as(chol), upper=False
                )
        self.folded = x if dual else None
        self.shape = tuple(shape)
        return self

    @staticmethod
    def _cholesky(gram: torch.Tensor) -> torch.Tensor:
        chol, info = torch.linalg.cholesky_ex(gram)
        if bool((info != 0).any()):
            raise ValueError("covariance not positive definite (non-finite features?)")
        return chol

    # -- score ---------------------------------------------------------------------------
    def mahalanobis(self, features: torch.Tensor) -> torch.Tensor:
        """Distance of each position of ``features`` ``(B, C, H, W)`` to its Gaussian -> ``(B, H, W)``."""
        self._check()
        _, _, h, w = features.shape
        if (h, w) != self.shape:
            raise ValueError(f"feature grid {(h, w)} differs from the fitted grid {self.shape}")
        return self.score_samples(position_major(features))

    @torch.no_grad()
    def score_samples(self, x: torch.Tensor, centred: bool = False) -> torch.Tensor:
        """Distances of position-major test samples ``x`` ``(P, B, C)`` -> ``(B, H, W)``.

        ``x`` is consumed (centred in place), or already centred (``centred=True``: written as
        ``x - mean`` by :func:`fsad_bench.components.maps.pyramid_samples` with ``subtract=mean``).
        One pass over the stored ``W`` for all ``B``."""
        self._check()
        p, b, c = x.shape
        if p != self.shape[0] * self.shape[1] or c != self.mean.shape[1]:
            raise ValueError(
                f"test samples {tuple(x.shape)} do not match the fit ({p} positions, "
                f"{self.mean.shape[1]} channels expected)"
            )
        x = x.contiguous()
        if not centred:
            x -= self.mean[:, None, :]  # d = x - μ, in place
        return self._squared(x, 0).sqrt_().T.reshape(b, *self.shape)

    @torch.no_grad()
    def score_pyramid(
        self, maps: list[torch.Tensor], mode: str = "bilinear", scratch: ScratchBuffer | None = None
    ) -> torch.Tensor:
        """Distances of a test batch's feature pyramid ``maps`` ``[(B, C_i, H_i, W_i)]`` -> ``(B, H, W)``.

        The numbers of ``score_samples(pyramid_samples(maps, mode, subtract=mean), centred=True)``
        (bit for bit), computed band by band of about :attr:`band_positions` grid positions: each
        band's centred samples ``(band, B, C)`` are written into ``scratch`` (a reused block) and
        scored at once. Coarse maps that ``mode="nearest"`` repeats by an integer ratio are sliced
        band by band (bands are whole multiples of every ratio); others are upsampled once."""
        self._check()
        b, _, h, w = maps[0].shape
        if (h, w) != self.shape:
            raise ValueError(f"feature grid {(h, w)} differs from the fitted grid {self.shape}")
        step, sliceable = 1, [maps[0]]
        for m in maps[1:]:
            hi, wi = m.shape[-2:]
            if (hi, wi) != (h, w):
                if mode == "nearest" and h % hi == 0 and w % wi == 0:
                    step = math.lcm(step, h // hi)  # sliced as it is
                else:
                    m = upsample(m, (h, w), mode)  # what pyramid_samples writes
            sliceable.append(m)
        rows = step * max(1, round(self.band_positions / (w * step)))
        scratch = scratch or ScratchBuffer()
        sq = torch.empty(h * w, b, dtype=self.mean.dtype, device=self.mean.device)
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            band = [m[:, :, r0 * m.shape[2] // h : r1 * m.shape[2] // h] for m in sliceable]
            s, e = r0 * w, r1 * w
            x = scratch.get((e - s, b, self.mean.shape[1]), self.mean.dtype, self.mean.device)
            pyramid_samples(band, mode, out=x, subtract=self.mean[s:e])
            sq[s:e] = self._squared(x, s)
        return sq.sqrt_().T.reshape(b, h, w)

    def _squared(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Squared distances ``(p, B)`` of centred samples ``x`` ``(p, B, C)`` at positions
        ``start … start + p`` (consumes nothing; ``x`` is read once per product)."""
        end = start + x.shape[0]
        if self.used_form == "dual":
            z = torch.bmm(x, self.folded[start:end].transpose(1, 2))  # (p, B, N) = d Wᵀ
            return (torch.linalg.vector_norm(x, dim=2).square_() - z.square_().sum(dim=2)).clamp_min_(0) / self.eps
        return torch.bmm(x, self.inv_chol[start:end].transpose(1, 2)).square_().sum(dim=2)

    def _check(self) -> None:
        if self.mean is None:
            raise RuntimeError("PositionGaussian.fit must be called first")
