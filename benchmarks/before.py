"""The pre-issue-15 implementation, kept verbatim for side-by-side benchmarks (not used by the package).

``PositionGaussian`` as it was (dual form: centred samples + inverse Cholesky factor, two
batched products per call) and the feature path as the adapters had it (``concat_pyramid``
per batch, ``torch.cat``, permute + contiguous copies in ``fit``).
"""

from __future__ import annotations

import torch


class PositionGaussian:
    """Gaussian per spatial position of ``(N, C, H, W)`` feature maps.

    ``eps``: ridge added to every covariance (RegAD / PaDiM: 0.01). ``form``: ``"auto"``
    (dual when N < C), ``"primal"`` or ``"dual"``.
    """

    def __init__(self, eps: float = 0.01, form: str = "auto", chunk: int = 512):
        if form not in ("auto", "primal", "dual"):
            raise ValueError(f"form must be auto, primal or dual, got {form!r}")
        self.eps, self.form, self.chunk = eps, form, chunk
        self.mean: torch.Tensor | None = None  # (P, C)
        self.inv_chol: torch.Tensor | None = None  # primal: (P, C, C); dual: (P, N, N) — lower-triangular L⁻¹
        self.samples: torch.Tensor | None = None  # dual only: centred samples (P, N, C)
        self.shape: tuple[int, int] | None = None
        self.used_form = ""

    def fit(self, features: torch.Tensor) -> PositionGaussian:
        """Fit from ``features`` ``(N, C, H, W)``, N >= 2."""
        n, c, h, w = features.shape
        if n < 2:
            raise ValueError(f"need at least 2 feature maps to fit a covariance, got {n}")
        # (N, P, C) with channels contiguous (no copy for channels-last input): each position's
        # (N, C) sample matrix is then a BLAS-friendly strided view, and chunks copy out in whole rows.
        x = features.permute(0, 2, 3, 1).reshape(n, h * w, c).contiguous()
        self.mean = x.mean(dim=0)  # (P, C)
        x -= self.mean
        x = x.permute(1, 0, 2)  # (P, N, C) view of the centred samples
        dual = self.form == "dual" or (self.form == "auto" and n < c)
        self.used_form = "dual" if dual else "primal"
        size = n if dual else c
        eye = torch.eye(size, dtype=features.dtype, device=features.device)
        self.inv_chol = torch.empty(h * w, size, size, dtype=features.dtype, device=features.device)
        self.samples = torch.empty(h * w, n, c, dtype=features.dtype, device=features.device) if dual else None
        for s in range(0, h * w, self.chunk):
            if dual:
                xc = self.samples[s : s + self.chunk]
                xc.copy_(x[s : s + self.chunk])
                gram = torch.baddbmm(eye.expand(len(xc), n, n), xc, xc.transpose(1, 2), beta=self.eps * (n - 1))
            else:
                xc = x[s : s + self.chunk].contiguous()
                gram = torch.baddbmm(
                    eye.expand(len(xc), c, c), xc.transpose(1, 2), xc, beta=self.eps, alpha=1.0 / (n - 1)
                )
            chol = torch.linalg.cholesky(gram)
            self.inv_chol[s : s + self.chunk] = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
        self.shape = (h, w)
        return self

    def mahalanobis(self, features: torch.Tensor) -> torch.Tensor:
        """Distance of each position of ``features`` ``(B, C, H, W)`` to its Gaussian -> ``(B, H, W)``."""
        if self.mean is None:
            raise RuntimeError("PositionGaussian.fit must be called first")
        b, c, h, w = features.shape
        if (h, w) != self.shape:
            raise ValueError(f"feature grid {(h, w)} differs from the fitted grid {self.shape}")
        # (P, B, C) view; free when the features are channels-last (ResNetFeatures' output)
        d = features.permute(2, 3, 0, 1).reshape(h * w, b, c) - self.mean[:, None, :]
        if self.used_form == "dual":
            z = torch.bmm(torch.bmm(d, self.samples.transpose(1, 2)), self.inv_chol.transpose(1, 2))  # (P, B, N)
            sq = (d.square().sum(dim=2) - z.square().sum(dim=2)).clamp_min(0) / self.eps
        else:
            sq = torch.bmm(d, self.inv_chol.transpose(1, 2)).square().sum(dim=2)  # (P, B)
        return sq.sqrt().T.reshape(b, h, w)


def features_before(backbone, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """The adapters' feature path before issue 15: ``concat_pyramid`` per batch, then ``torch.cat``
    -> ``(N, ΣC, H1, W1)`` (the old ``fit`` / ``mahalanobis`` then permute it into positions)."""
    from fsad_bench.components.maps import concat_pyramid

    with torch.no_grad():
        return torch.cat(
            [concat_pyramid(backbone(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        )
