"""The Fréchet distance between two Gaussians: the number behind FID and FVD.

For feature statistics ``(mu1, sigma1)`` and ``(mu2, sigma2)``::

    d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

The product ``sigma1 sigma2`` is not symmetric, and taking its square root in general form
(``scipy.linalg.sqrtm``, ``eigvals``) gives complex values or NaN when the covariances are
near-singular, which is the usual case when there are fewer videos than feature dimensions. With
``sigma1 = L L^T`` (``L = V sqrt(D)`` from ``sigma1``'s eigendecomposition, ``F x r`` for its rank
``r``), ``sigma1 sigma2 = L (L^T sigma2)`` has the nonzero eigenvalues of ``L^T sigma2 L``, which is
symmetric and positive semi-definite: ``eigvalsh`` handles it in float64. Eigenvalues within rounding
noise of zero (below ``F * eps * largest``, the tolerance of ``numpy.linalg.matrix_rank``) are set to
zero: the square root would turn each of them from ~1e-16 into ~1e-8 of the scale, and with fewer
samples than features hundreds of them would add up to a distance biased low by far more than rounding.
Leaving out the ``F - r`` zero directions of ``sigma1`` makes the second matrix ``r x r``: with 512
samples of 4096 features, one eigendecomposition of 4096 dimensions is most of the work.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

# Below this size an eigendecomposition takes milliseconds on one CPU thread, while the
# multi-threaded one stalls on a busy machine (measured 20-100x slower with 2 threads on a shared
# 2-core box); above it, threads pay off on an idle machine.
SINGLE_THREAD_MAX_DIM = 1024


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    Args:
        mu1, mu2: means, shape ``(F,)``.
        sigma1, sigma2: covariances, shape ``(F, F)``; symmetric positive semi-definite up to rounding.

    Returns:
        The distance as a Python float, never negative.
    """
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    sigma1, sigma2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, value, shape in (("mu1", mu1, (dim,)), ("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (F = len(mu1)), got {tuple(value.shape)}")
    sigma2 = sigma2.to(sigma1.device)
    with _cpu_threads(1 if dim <= SINGLE_THREAD_MAX_DIM else torch.get_num_threads()):
        factor = psd_factor(sigma1)
        middle = factor.T @ _symmetric(sigma2) @ factor
        trace_of_root = _without_rounding_noise(torch.linalg.eigvalsh(_symmetric(middle)), dim).sqrt().sum()
    mean_term = (mu1 - mu2.to(mu1.device)).square().sum()
    distance = mean_term + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_of_root
    return max(float(distance), 0.0)


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix (eigenvalues within rounding noise of zero -> 0)."""
    values, vectors = _psd_eigh(matrix)
    return (vectors * values.sqrt()) @ vectors.T


def psd_factor(matrix: torch.Tensor) -> torch.Tensor:
    """``L`` of shape ``(F, r)`` with ``L L^T = matrix``, for a positive semi-definite matrix of numerical
    rank ``r`` (eigenvalues within rounding noise of zero count as zero)."""
    values, vectors = _psd_eigh(matrix)
    kept = values > 0
    return vectors[:, kept] * values[kept].sqrt()


def _psd_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(_symmetric(matrix))
    return _without_rounding_noise(values), vectors


def _without_rounding_noise(eigenvalues: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Eigenvalues of a PSD matrix, with those indistinguishable from zero in its precision set to zero.

    ``dim`` is the size of the matrices whose products made it (default: its own size): a smaller matrix
    reduced from ``F``-dimensional ones carries their rounding noise."""
    if eigenvalues.numel() == 0:  # the factor of a zero covariance (features that never vary) has no columns
        return eigenvalues
    dim = eigenvalues.numel() if dim is None else dim
    tolerance = eigenvalues.abs().max() * dim * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > tolerance, eigenvalues, torch.zeros_like(eigenvalues))


def mean_and_covariance(total: torch.Tensor, outer_total: torch.Tensor, count: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased (N - 1) covariance from the sums ``sum x``, ``sum x x^T`` over ``count`` samples.

    These sums are what a metric keeps per process: summing them across processes gives the sums of
    the whole set, so the statistics are exact under data parallelism.
    """
    count = int(count)
    if count < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {count}")
    total, outer_total = total.double(), outer_total.double()
    mean = total / count
    covariance = (outer_total - count * torch.outer(mean, mean)) / (count - 1)
    return mean, _symmetric(covariance)


@contextmanager
def _cpu_threads(count: int) -> Iterator[None]:
    """Run torch's CPU kernels on ``count`` threads inside, and restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.T) / 2


def _as_float64(value: ArrayLike, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach().to(torch.float64)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds NaN or inf")
    return tensor
