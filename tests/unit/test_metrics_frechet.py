"""frechet_distance against scipy, on near-singular covariances, and the statistics it is fed."""

import numpy as np
import pytest
import torch

from flowvid.metrics import frechet_distance, mean_and_covariance, psd_sqrt
from flowvid.metrics.frechet import psd_factor

scipy_linalg = pytest.importorskip("scipy.linalg", reason="scipy is in the dev extra: pip install -e '.[dev]'")


def _gaussian_stats(rng: np.random.Generator, dim: int, samples: int, shift: float = 0.0):
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    features = rng.normal(size=(samples, dim)) @ mixing + shift
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    root = scipy_linalg.sqrtm(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(np.real(root)))


@pytest.mark.parametrize("dim", [8, 64])
def test_matches_scipy_sqrtm_to_1e_6_relative(dim):
    rng = np.random.default_rng(dim)
    mu1, sigma1 = _gaussian_stats(rng, dim, 4 * dim)
    mu2, sigma2 = _gaussian_stats(rng, dim, 4 * dim, shift=0.3)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(_scipy_frechet(mu1, sigma1, mu2, sigma2), rel=1e-6)


def test_symmetric_and_zero_for_identical_statistics():
    rng = np.random.default_rng(1)
    mu1, sigma1 = _gaussian_stats(rng, 32, 100)
    mu2, sigma2 = _gaussian_stats(rng, 32, 100, shift=1.0)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(frechet_distance(mu2, sigma2, mu1, sigma1), rel=1e-10)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) < 1e-9 * np.trace(sigma1)


def test_exact_on_singular_commuting_covariances():
    # Both covariances share eigenvectors, so tr((s1 s2)^1/2) = sum sqrt(d1 d2) exactly; half the
    # eigenvalues are zero or 1e-14, as with fewer samples than feature dimensions.
    rng = np.random.default_rng(2)
    dim = 48
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    d1 = rng.uniform(0.5, 2.0, dim)
    d2 = rng.uniform(0.5, 2.0, dim)
    d1[: dim // 2] = 0.0
    d2[dim // 4 : dim // 2 + 4] = 1e-14
    sigma1, sigma2 = (rotation * d1) @ rotation.T, (rotation * d2) @ rotation.T
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(exact, rel=1e-7)


def test_fewer_samples_than_dimensions_stays_finite_and_consistent():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(10, 64))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)  # rank 9
    other = features[::-1] + 0.5
    distance = frechet_distance(mu, sigma, other.mean(0), np.cov(other, rowvar=False))
    assert np.isfinite(distance)
    assert distance == pytest.approx(64 * 0.25, rel=1e-6)  # same spread, mean moved by 0.5 in 64 dims
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-9 * np.trace(sigma)


def test_accepts_tensors_and_rejects_bad_shapes_and_nan():
    mu, sigma = torch.zeros(4), torch.eye(4)
    assert frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"sigma2 must have shape \(4, 4\)"):
        frechet_distance(mu, sigma, mu, torch.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma, mu * float("nan"), sigma)


def test_mean_and_covariance_from_sums_match_numpy():
    rng = np.random.default_rng(4)
    features = torch.from_numpy(rng.normal(size=(50, 6)) * 3 + 10)
    mean, covariance = mean_and_covariance(features.sum(0), features.T @ features, features.shape[0])
    np.testing.assert_allclose(mean.numpy(), features.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(covariance.numpy(), np.cov(features.numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 samples"):
        mean_and_covariance(features[0], torch.outer(features[0], features[0]), 1)


def _low_rank_psd(rng: np.random.Generator, dim: int, rank: int) -> np.ndarray:
    factor = rng.normal(size=(dim, rank))
    return factor @ factor.T


def test_the_factor_of_a_covariance_has_its_rank_as_columns_and_gives_it_back():
    rng = np.random.default_rng(5)
    for rank in (0, 7, 40):
        sigma = torch.from_numpy(_low_rank_psd(rng, 40, rank))
        factor = psd_factor(sigma)
        assert factor.shape == (40, rank)
        torch.testing.assert_close(factor @ factor.T, sigma, rtol=0, atol=1e-10 * (1 + float(sigma.abs().max())))


@pytest.mark.parametrize("rank1, rank2", [(120, 120), (15, 120), (120, 15), (15, 15), (0, 30)])
def test_matches_the_symmetric_square_root_form_to_1e_8_relative(rank1, rank2):
    # tr((sqrt(s1) s2 sqrt(s1))^1/2) with both square roots in full, as the distance was once computed.
    rng = np.random.default_rng(rank1 + rank2)
    sigma1, sigma2 = (torch.from_numpy(_low_rank_psd(rng, 120, rank)) for rank in (rank1, rank2))
    mu1, mu2 = torch.from_numpy(rng.normal(size=120)), torch.from_numpy(rng.normal(size=120))
    root1 = psd_sqrt(sigma1)
    trace_of_root = psd_sqrt(root1 @ sigma2 @ root1).trace()
    expected = float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_of_root)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
