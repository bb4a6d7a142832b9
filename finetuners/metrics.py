"""Image-set metrics: the Fréchet distance between two feature sets (FD-probe on Shapes, FID-style)."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """FD = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^{½}) between Gaussians fitted to [N, d] features.

    The matrix square root is scipy's ``sqrtm``; its imaginary residue (numerical noise) is dropped.
    """
    a = np.asarray(feats_a.detach().cpu() if torch.is_tensor(feats_a) else feats_a, dtype=np.float64)
    b = np.asarray(feats_b.detach().cpu() if torch.is_tensor(feats_b) else feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: regularise as the FID reference does
        eps = 1e-6 * np.eye(a.shape[1])
        covmean = scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
