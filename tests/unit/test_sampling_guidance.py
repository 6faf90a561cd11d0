"""Classifier-free guidance for flows: the variance-clipped formula and guided sampling."""

import math

import pytest
import torch

from flowvid.flows import GlobalLocalFlow
from flowvid.flows.guidance import guided_affine
from flowvid.sampling import BlockInversion, GuidedText, JacobiSampler, SequentialSampler
from flowvid.sampling.sequential import invert_slots_sequential
from flowvid.testing import perturb_parameters
from flowvid.text.base import TextEmbedding


def gaussian_log_density(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)


def test_weight_zero_returns_the_conditional_branch_exactly():
    mu_c, mu_u = torch.randn(2, 50)
    sigma_c, sigma_u = torch.rand(2, 50) + 0.1
    mu, sigma = guided_affine(mu_c, sigma_c, mu_u, sigma_u, 0.0)
    assert torch.equal(mu, mu_c) and torch.equal(sigma, sigma_c)


def test_guided_gaussian_is_the_tilted_product_when_the_unconditional_branch_is_wider():
    torch.manual_seed(0)
    sigma_c = torch.rand(20) + 0.2
    sigma_u = sigma_c * (1.0 + torch.rand(20))  # wider: no clipping
    mu_c, mu_u = torch.randn(2, 20)
    w = 2.5
    mu, sigma = guided_affine(mu_c, sigma_c, mu_u, sigma_u, w)
    # (1 + w) log p_c - w log p_u equals log N(mu, sigma^2) up to a constant in x.
    points = torch.tensor([-2.0, 0.3, 1.7])[:, None]
    tilted = (1 + w) * gaussian_log_density(points, mu_c, sigma_c) - w * gaussian_log_density(points, mu_u, sigma_u)
    difference = tilted - gaussian_log_density(points, mu, sigma)
    torch.testing.assert_close(difference - difference[0], torch.zeros_like(difference), atol=1e-4, rtol=0)


def test_clipping_never_widens_the_conditional_branch_even_at_large_weight():
    torch.manual_seed(1)
    mu_c, mu_u = torch.randn(2, 200)
    sigma_c, sigma_u = torch.rand(2, 200) + 0.05
    for w in (0.5, 3.5, 100.0):
        mu, sigma = guided_affine(mu_c, sigma_c, mu_u, sigma_u, w)
        assert torch.isfinite(mu).all() and (sigma > 0).all() and (sigma <= sigma_c + 1e-7).all()
    narrower = sigma_u < sigma_c  # clipped: sigma stays sigma_c, mu extrapolates linearly
    mu, sigma = guided_affine(mu_c, sigma_c, mu_u, sigma_u, 3.5)
    torch.testing.assert_close(sigma[narrower], sigma_c[narrower])
    torch.testing.assert_close(mu[narrower], (4.5 * mu_c - 3.5 * mu_u)[narrower])


def test_negative_weight_is_rejected():
    with pytest.raises(ValueError, match="guidance weight"):
        guided_affine(*torch.ones(4, 3), -1.0)


def make_flow():
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3), text_width=8)
    perturb_parameters(flow, std=0.05)
    return flow.eval()


def make_text(batch=2):
    generator = torch.Generator().manual_seed(3)
    cond = TextEmbedding(torch.randn(batch, 4, 8, generator=generator), torch.ones(batch, 4, dtype=torch.bool))
    uncond = TextEmbedding(torch.zeros(1, 2, 8), torch.zeros(1, 2, dtype=torch.bool))
    return GuidedText(cond, uncond)


def test_both_branches_read_the_same_guided_history():
    flow, text = make_flow(), make_text()
    z = torch.randn(2, 12, 3)
    inversion = BlockInversion(flow.deep, z, text.cond, text.uncond, guidance=2.0)
    invert_slots_sequential(inversion, 12)
    x = inversion.result()
    # Re-run both branches in parallel on the guided result: every slot must be its guided update.
    uncond = TextEmbedding(text.uncond.tokens.expand(2, -1, -1), text.uncond.mask.expand(2, -1))
    with torch.no_grad():
        z_cond, logdet_cond = flow.deep(x, text.cond)
        z_uncond, logdet_uncond = flow.deep(x, uncond)
    sigma_c, sigma_u = torch.exp(-logdet_cond), torch.exp(-logdet_uncond)
    mu_c, mu_u = x - sigma_c * z_cond, x - sigma_u * z_uncond
    mu, sigma = guided_affine(mu_c, sigma_c, mu_u, sigma_u, 2.0)
    torch.testing.assert_close(mu + sigma * z, x, rtol=1e-4, atol=1e-4)


def test_guidance_changes_the_sample_and_jacobi_follows_sequential():
    flow, text = make_flow(), make_text()
    z = torch.randn(2, 3, 2, 3, 3)
    plain = SequentialSampler().sample(flow, z, text.cond)
    guided = SequentialSampler().sample(flow, z, text, guidance=3.5)
    assert (guided - plain).norm() / plain.norm() > 1e-2
    jacobi = JacobiSampler(tol=1e-5).sample(flow, z, text, guidance=3.5)
    assert (jacobi - guided).norm() / guided.norm() < 1e-4


def test_guided_videos_of_a_batch_stop_on_their_own():
    flow = make_flow()
    generator = torch.Generator().manual_seed(4)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False], [True, False, False, False]])
    text = GuidedText(TextEmbedding(torch.randn(3, 4, 8, generator=generator), mask), make_text().uncond)
    z = torch.randn(3, 3, 2, 3, 3, generator=generator) * torch.tensor([1.0, 3.0, 0.3])[:, None, None, None, None]
    sampler = JacobiSampler(tol=1e-2)
    batch = sampler.sample(flow, z, text, guidance=2.0)
    deep = sampler.last_stats["deep"]
    assert any(s < i for s, i in zip(deep["sample_iterations"], deep["iterations"]))
    for video in range(3):
        alone = GuidedText(TextEmbedding(text.cond.tokens[video:video + 1], mask[video:video + 1]), text.uncond)
        torch.testing.assert_close(batch[video:video + 1], sampler.sample(flow, z[video:video + 1], alone, guidance=2.0),
                                   rtol=1e-5, atol=1e-5)


def test_one_unconditional_embedding_serves_the_whole_batch():
    flow, text = make_flow(), make_text()
    z = torch.randn(2, 2, 2, 3, 3)
    repeated = GuidedText(text.cond, TextEmbedding(text.uncond.tokens.expand(2, -1, -1).clone(),
                                                   text.uncond.mask.expand(2, -1).clone()))
    sampler = SequentialSampler()
    assert torch.equal(sampler.sample(flow, z, text, guidance=1.5), sampler.sample(flow, z, repeated, guidance=1.5))


def test_guidance_needs_an_unconditional_text_and_a_conditional_flow():
    flow, text = make_flow(), make_text()
    z = torch.randn(2, 2, 2, 3, 3)
    with pytest.raises(ValueError, match="GuidedText"):
        SequentialSampler().sample(flow, z, text.cond, guidance=2.0)
    with pytest.raises(ValueError, match=">= 0"):
        SequentialSampler().sample(flow, z, text, guidance=-1.0)
    with pytest.raises(ValueError, match="unconditional text tokens"):
        bad = GuidedText(text.cond, TextEmbedding(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.bool)))
        JacobiSampler().sample(flow, z, bad, guidance=2.0)
    unconditional = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3))
    with pytest.raises(ValueError, match="unconditional"):
        JacobiSampler().sample(unconditional, z, None, guidance=2.0)
