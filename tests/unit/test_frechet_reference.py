"""The Fréchet distance and FVD statistics against float64 references computed independently with numpy."""

import numpy as np
import pytest
import torch

from flowvid.metrics import FrechetVideoDistance, frechet_distance, mean_and_covariance
from flowvid.metrics.extractor import FVDExtractor

FEATURES = 400  # I3D's logits


def _exact_distance(x1: np.ndarray, x2: np.ndarray) -> float:
    """The distance between the Gaussians fitted to two feature sets, without a square root of a big matrix.

    With centred features C1, C2 and unbiased covariances, tr((S1^1/2 S2 S1^1/2)^1/2) is the sum of the
    singular values of C1 C2^T / sqrt((n1 - 1)(n2 - 1)), a matrix of samples x samples: exact in float64
    even when the covariances are singular.
    """
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    trace_of_root = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt((len(x1) - 1) * (len(x2) - 1))
    traces = np.trace(np.cov(x1, rowvar=False)) + np.trace(np.cov(x2, rowvar=False))
    return float(np.sum((x1.mean(0) - x2.mean(0)) ** 2) + traces - 2 * trace_of_root)


def _distance_of_features(x1: np.ndarray, x2: np.ndarray) -> float:
    return frechet_distance(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))


def _logit_like(rng: np.random.Generator, count: int, scale: float = 5.0) -> np.ndarray:
    mixing = rng.normal(size=(FEATURES, FEATURES)) / np.sqrt(FEATURES)
    return rng.normal(size=(count, FEATURES)) @ mixing * scale + 3.0


def test_diagonal_gaussians_match_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=FEATURES), rng.normal(size=FEATURES)
    var1, var2 = rng.uniform(0, 3, FEATURES), rng.uniform(0, 3, FEATURES)
    var2[:50] = 0.0  # singular too
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("shift", [0.0, 1e-3, 0.1, 10.0])
def test_sixteen_videos_of_400_features_match_the_exact_distance(shift):
    # Rank-15 covariances in 400 dimensions: the rounding noise of 385 zero eigenvalues must not leak
    # into the square root, which would pull the distance of two close sets down to about nothing.
    rng = np.random.default_rng(1)
    real = _logit_like(rng, 16)
    close = real[rng.permutation(16)] + shift  # same spread: the exact distance is 400 shift^2
    other = _logit_like(rng, 16) + shift
    many = _logit_like(rng, 2048)
    scale = np.trace(np.cov(real, rowvar=False))
    for generated in (close, other, many):
        ours, exact = _distance_of_features(real, generated), _exact_distance(real, generated)
        assert np.isfinite(ours) and ours >= 0
        assert ours == pytest.approx(exact, abs=1e-9 * scale)
        assert _distance_of_features(generated, real) == pytest.approx(ours, abs=1e-9 * scale)
    assert _exact_distance(real, close) == pytest.approx(FEATURES * shift**2, abs=1e-9 * scale)


def test_a_set_against_itself_is_zero_even_when_its_covariance_is_singular():
    features = _logit_like(np.random.default_rng(2), 16)
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-10 * np.trace(sigma)


class _GivenFeatures(FVDExtractor):
    """Hands out rows of a fixed float32 table in order, as if the videos had produced them."""

    feature_dim = FEATURES

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = torch.from_numpy(table.astype(np.float32))
        self.cursor = 0

    def features(self, video: torch.Tensor) -> torch.Tensor:
        rows = self.table[self.cursor : self.cursor + len(video)]
        self.cursor += len(video)
        return rows


def _videos(count: int) -> torch.Tensor:
    return torch.zeros(count, 2, 8, 8, 3, dtype=torch.uint8)


def _accumulate(metric: FrechetVideoDistance, count: int, batch: int, real: bool) -> None:
    for start in range(0, count, batch):
        metric.update(_videos(min(batch, count - start)), real=real)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_statistics_over_many_float32_batches_are_numpys_unbiased_ones(offset):
    # The features come as float32; an offset of 1e3 (larger than any extractor's features) with a
    # spread of 1 cancels 6 of the 16 digits of float64 in sum(x x^T) - N mu mu^T; with float32 sums
    # (7 digits) the covariance would be off by about 0.1.
    table = (np.random.default_rng(3).normal(size=(1000, FEATURES)) + offset).astype(np.float32)
    metric = FrechetVideoDistance(_GivenFeatures(table))
    _accumulate(metric, len(table), batch=7, real=True)
    mean, covariance = mean_and_covariance(metric.real_features_sum, metric.real_features_cov_sum,
                                           metric.real_features_num_samples)
    exact = table.astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), exact.mean(0), rtol=1e-12)
    np.testing.assert_allclose(covariance.numpy(), np.cov(exact, rowvar=False), rtol=0, atol=1e-7)
    stats = metric.real_statistics()
    np.testing.assert_allclose(stats.sigma, np.cov(exact, rowvar=False, ddof=1), rtol=0, atol=1e-7)


def test_statistics_merged_from_several_processes_equal_those_of_one():
    rng = np.random.default_rng(4)
    real, fake = _logit_like(rng, 600), _logit_like(rng, 40) + 0.5
    table = np.concatenate([real, fake]).astype(np.float32)
    whole = FrechetVideoDistance(_GivenFeatures(table))
    _accumulate(whole, 600, batch=32, real=True)
    _accumulate(whole, 40, batch=8, real=False)
    parts = []
    for real_rows, fake_rows in ((real[:250], fake[:16]), (real[250:], fake[16:])):
        part = FrechetVideoDistance(_GivenFeatures(np.concatenate([real_rows, fake_rows])))
        _accumulate(part, len(real_rows), batch=32, real=True)
        _accumulate(part, len(fake_rows), batch=8, real=False)
        parts.append(part)
    parts[0].merge_state(parts[1])  # the same sum reduction as a DDP sync
    merged, single = float(parts[0].compute()), float(whole.compute())
    exact = _exact_distance(real.astype(np.float32).astype(np.float64), fake.astype(np.float32).astype(np.float64))
    assert merged == pytest.approx(single, rel=1e-9)
    assert single == pytest.approx(exact, rel=1e-9)
