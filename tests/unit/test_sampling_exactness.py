"""Samplers and likelihood against references that share no code with them: a guided inverse built from
forward passes alone, autograd's Jacobian, and the window-by-window sampling the docs describe."""

import pytest
import torch

from flowvid.flows import GlobalLocalFlow
from flowvid.flows.guidance import guided_affine
from flowvid.sampling import GuidedText, JacobiSampler, SequentialSampler, WindowedSampler, windows
from flowvid.sampling.base import encode_shallow
from flowvid.testing import perturb_parameters
from flowvid.text.base import TextEmbedding

FRAME = (2, 3)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_flow(text_width=8, num_shallow=2):
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=FRAME, text_width=text_width,
                                       num_shallow=num_shallow)
    perturb_parameters(flow, std=0.05)
    return flow.eval()


def make_text(batch, length, seed, padded=True):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if padded:
        mask[0, length // 2:] = False
    return TextEmbedding(torch.randn(batch, length, 8, generator=generator) * mask[..., None], mask)


def relative_error(x, reference):
    return ((x - reference).norm() / reference.norm()).item()


def affine_from_forward(block, values, text=None):
    """(mu, sigma) of every token from one forward pass: z = (x - mu) / sigma and log|det| = -log sigma."""
    z, logdet = block(values, text)
    sigma = torch.exp(-logdet)
    return values - sigma * z, sigma


def invert_by_forward_passes(block, noise, text=None, uncond=None, guidance=0.0, known=None):
    """Token by token in the block's order, each from a full forward pass over the values so far; ``known``
    values (B, k, C) are the first k tokens (of a block that keeps the natural order)."""
    values = torch.zeros_like(noise)
    start = 0 if known is None else known.shape[1]
    if known is not None:
        values[:, :start] = known
    order = block.permutation.index(noise.shape[1])
    for position in order[start:]:
        mu, sigma = affine_from_forward(block, values, text)
        mu, sigma = mu[:, position], sigma[:, position]
        if guidance > 0:
            mu_uncond, sigma_uncond = affine_from_forward(block, values, uncond)
            mu, sigma = guided_affine(mu, sigma, mu_uncond[:, position], sigma_uncond[:, position], guidance)
        values[:, position] = mu + sigma * noise[:, position]
    return values


@torch.no_grad()
def guided_sample_by_forward_passes(flow, z, cond, uncond, guidance, prefix):
    batch, frames = z.shape[:2]
    per_frame, given = flow.tokens_per_frame, prefix.shape[1]
    uncond = TextEmbedding(uncond.tokens.expand(batch, -1, -1), uncond.mask.expand(batch, -1))
    noise = z.reshape(batch, frames * per_frame, -1)
    deep = invert_by_forward_passes(flow.deep, noise, cond, uncond, guidance, known=encode_shallow(flow, prefix))
    tokens = deep[:, given * per_frame:].reshape(-1, per_frame, flow.latent_channels)
    for block in reversed(flow.shallow):
        tokens = invert_by_forward_passes(block, tokens)
    return torch.cat([prefix, tokens.view(batch, frames - given, *z.shape[2:])], dim=1)


@pytest.mark.parametrize("sampler", [SequentialSampler(), JacobiSampler(tol=1e-5, first_block_size=4, block_size=5)],
                         ids=["sequential", "jacobi"])
def test_a_guided_continuation_with_a_shorter_negative_caption_is_the_guided_inverse(sampler):
    flow = make_flow()
    z = torch.randn(3, 3, *FRAME, 3, generator=torch.Generator().manual_seed(1))
    prefix = torch.randn(3, 2, *FRAME, 3, generator=torch.Generator().manual_seed(2))
    cond, uncond = make_text(3, 5, seed=3), make_text(1, 2, seed=4, padded=False)
    reference = guided_sample_by_forward_passes(flow, z, cond, uncond, 2.5, prefix)
    x = sampler.sample(flow, z, GuidedText(cond, uncond), guidance=2.5, prefix=prefix)
    assert torch.equal(x[:, :2], prefix)
    assert relative_error(x, reference) < 1e-4


@pytest.mark.parametrize("num_shallow", [1, 3])  # the block next to the deep one reads frames backwards, then forwards
def test_the_likelihood_of_a_captioned_video_is_exact_frame_by_frame(num_shallow):
    flow = make_flow(num_shallow=num_shallow).double()
    text = make_text(1, 4, seed=5)
    x = torch.randn(1, 3, *FRAME, 3, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.view_as(x), text)[0].reshape(-1).double(),
                                                  x.reshape(-1))
    _, logdet_per_frame = flow.encode(x, text)
    per_frame = x[0, 0].numel()
    for frame in range(3):
        rows = slice(frame * per_frame, (frame + 1) * per_frame)
        assert torch.all(jacobian[rows, (frame + 1) * per_frame:] == 0)  # z of a frame reads no later frame
        block_logdet = torch.linalg.slogdet(jacobian[rows, rows])[1].item()
        assert abs(logdet_per_frame[0, frame].item() - block_logdet) < 1e-4
    assert abs(flow(x, text)[1].item() - torch.linalg.slogdet(jacobian)[1].item()) < 1e-4


@pytest.mark.parametrize("window, context, frames, given", [(3, 2, 7, 0), (4, 1, 9, 3), (3, 2, 8, 5)],
                         ids=["window_is_context_plus_one", "prefix_longer_than_context", "prefix_beyond_window"])
def test_windows_are_the_samples_the_docs_describe_and_stream_them_once_in_order(window, context, frames, given):
    flow, inner = make_flow(), SequentialSampler()
    text = make_text(2, 4, seed=6)
    z = torch.randn(2, frames, *FRAME, 3, generator=torch.Generator().manual_seed(7))
    prefix = torch.randn(2, given, *FRAME, 3, generator=torch.Generator().manual_seed(8)) if given else None
    sampler = WindowedSampler(inner, window=window, context=context)
    x = sampler.sample(flow, z, text, prefix=prefix)
    for number, (start, end) in enumerate(windows(frames, window, context, given)):
        known = given if number == 0 and given < window else (context if start else 0)
        reference = inner.sample(flow, z[:, start:end], text, prefix=x[:, start:start + known] if known else None)
        assert relative_error(x[:, start:end], reference) < 1e-6, f"window {number} ({start}, {end})"
    streamed = list(sampler.stream(flow, z, text, prefix=prefix))
    assert len(streamed) == frames - given
    assert relative_error(torch.stack(streamed, dim=1), x[:, given:]) < 1e-5
