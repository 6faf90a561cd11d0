"""Guided sampling against the variance-clipped guidance formula written out here, in float64.

The reference shares no code with the samplers or ``flowvid.flows.guidance``: a flow block's affine
parameters come from its forward pass alone (``z = (x - mu) / sigma`` and ``log|det| = -log sigma``), and
the inverse is built token by token from full forward passes, the unconditional branch reading the guided
values, the frame-local blocks inverted without guidance.
"""

import copy

import pytest
import torch

from flowvid.flows import GlobalLocalFlow
from flowvid.flows.guidance import guided_affine
from flowvid.sampling import GuidedText, JacobiSampler, SequentialSampler
from flowvid.sampling import inversion as inversion_module
from flowvid.testing import perturb_parameters
from flowvid.text.base import TextEmbedding

FRAME = (2, 3)
CHANNELS = 3
TEXT_WIDTH = 8


def reference_guided_gaussian(mu_c, sigma_c, mu_u, sigma_u, w):
    """The guided (mu, sigma) in float64, as the method states it::

        s = clip(sigma_c / sigma_u, max=1)^2
        sigma~ = sigma_c / sqrt(1 + w - w s)
        mu~ = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)
    """
    mu_c, sigma_c, mu_u, sigma_u = (t.double() for t in (mu_c, sigma_c, mu_u, sigma_u))
    ratio = sigma_c / sigma_u
    s = torch.where(ratio < 1, ratio, torch.ones_like(ratio)) ** 2
    denominator = 1 + w - w * s
    return ((1 + w) * mu_c - w * s * mu_u) / denominator, sigma_c / denominator.sqrt()


def relative_error(x, reference):
    return ((x.double() - reference.double()).norm() / reference.double().norm()).item()


# --- one guided step ------------------------------------------------------------------------------------

def test_the_reference_formula_gives_the_values_worked_out_by_hand():
    # Wider unconditional branch: s = 1/4, 1 + w - w s = 3.25.
    mu, sigma = reference_guided_gaussian(*torch.tensor([[1.0], [1.0], [0.0], [2.0]]), 3.0)
    assert torch.allclose(mu, torch.tensor([4 / 3.25], dtype=torch.float64))
    assert torch.allclose(sigma, torch.tensor([3.25 ** -0.5], dtype=torch.float64))
    # Narrower unconditional branch: clipped to s = 1, sigma stays sigma_c, mu extrapolates.
    mu, sigma = reference_guided_gaussian(*torch.tensor([[1.0], [2.0], [0.5], [1.0]]), 3.0)
    assert mu.item() == 2.5 and sigma.item() == 2.0


SIGMA_PAIRS = {  # (sigma_c, sigma_u)
    "uncond_wider": (0.5, 2.0),
    "uncond_slightly_wider": (0.7, 0.7001),
    "uncond_equal": (0.7, 0.7),
    "uncond_slightly_narrower": (0.7001, 0.7),
    "uncond_narrower": (2.0, 0.5),
    "smallest_and_largest_sigma": (0.031, 4.55),
    "largest_and_smallest_sigma": (4.55, 0.031),
}


@pytest.mark.parametrize("w", [0.0, 0.5, 3.5, 1e4])
@pytest.mark.parametrize("sigmas", SIGMA_PAIRS.values(), ids=SIGMA_PAIRS.keys())
def test_one_guided_step_is_the_reference_formula(sigmas, w):
    generator = torch.Generator().manual_seed(0)
    mu_c, mu_u = torch.randn(2, 64, generator=generator) * 3
    sigma_c, sigma_u = (torch.full((64,), value) for value in sigmas)
    mu, sigma = guided_affine(mu_c, sigma_c, mu_u, sigma_u, w)
    mu_ref, sigma_ref = reference_guided_gaussian(mu_c, sigma_c, mu_u, sigma_u, w)
    assert mu.dtype == sigma.dtype == torch.float32
    # fp32 rounding of sigma_c / sigma_u grows by w / (1 + w - w s): large at w = 1e4 with sigmas a hair apart.
    rtol = 1e-5 if w < 100 else 1e-3
    s = sigma_ref.new_tensor(sigmas[0] / max(sigmas)) ** 2
    scale = ((1 + w) * mu_c.abs() + w * s * mu_u.abs()).double() / (1 + w - w * s)
    assert ((mu.double() - mu_ref).abs() <= rtol * scale).all()
    torch.testing.assert_close(sigma.double(), sigma_ref, rtol=rtol, atol=0)
    assert (sigma <= sigma_c).all()  # the clip never widens the conditional Gaussian
    if w == 0:
        assert torch.equal(mu, mu_c) and torch.equal(sigma, sigma_c)


def test_one_guided_step_is_the_reference_formula_on_mixed_branches():
    generator = torch.Generator().manual_seed(1)
    mu_c, mu_u = torch.randn(2, 4, 50, generator=generator)
    sigma_c, sigma_u = torch.rand(2, 4, 50, generator=generator) * 3 + 0.05
    assert (sigma_u < sigma_c).any() and (sigma_u > sigma_c).any()
    mu, sigma = guided_affine(mu_c, sigma_c, mu_u, sigma_u, 3.5)
    mu_ref, sigma_ref = reference_guided_gaussian(mu_c, sigma_c, mu_u, sigma_u, 3.5)
    torch.testing.assert_close(mu.double(), mu_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sigma.double(), sigma_ref, rtol=1e-5, atol=0)


def test_one_guided_step_is_fp32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(2)
    mu_c, mu_u = torch.randn(2, 200, generator=generator)
    sigma_c, sigma_u = torch.rand(2, 200, generator=generator) + 0.05
    outside = guided_affine(mu_c, sigma_c, mu_u, sigma_u, 3.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = guided_affine(mu_c, sigma_c, mu_u, sigma_u, 3.5)
        from_bf16 = guided_affine(*(t.bfloat16() for t in (mu_c, sigma_c, mu_u, sigma_u)), 3.5)
    assert all(t.dtype == torch.float32 for t in (*inside, *from_bf16))
    assert torch.equal(inside[0], outside[0]) and torch.equal(inside[1], outside[1])
    # bf16 branches are widened to fp32 before the formula, not rounded on the way through it.
    reference = reference_guided_gaussian(*(t.bfloat16() for t in (mu_c, sigma_c, mu_u, sigma_u)), 3.5)
    for value, expected in zip(from_bf16, reference):
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)


# --- whole samples ------------------------------------------------------------------------------------

def make_flow():
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=CHANNELS, frame_size=FRAME, text_width=TEXT_WIDTH)
    perturb_parameters(flow, std=0.1)  # branches far enough apart for guidance to matter, and to be clipped
    return flow.eval()


def make_text(batch, length, seed, valid=None):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if valid is not None:
        mask[:, valid:] = False
    return TextEmbedding(torch.randn(batch, length, TEXT_WIDTH, generator=generator) * mask[..., None], mask)


UNCONDS = {
    "empty_caption": lambda: make_text(1, 2, seed=4, valid=1),  # one embedding serves the whole batch
    "negative_prompt": lambda: make_text(2, 6, seed=5, valid=5),  # one per video, longer than the caption
}


def affine_from_forward(block, values, text=None):
    """(mu, sigma) of every token from one forward pass: z = (x - mu) / sigma and log|det| = -log sigma."""
    z, logdet = block(values, text)
    sigma = torch.exp(-logdet)
    return values - sigma * z, sigma


class ClipCounter:
    """How often the unconditional branch was narrower (clipped) and wider (not clipped)."""

    def __init__(self):
        self.narrower = self.wider = 0

    def add(self, sigma_c, sigma_u):
        self.narrower += int((sigma_u < sigma_c).sum())
        self.wider += int((sigma_u > sigma_c).sum())


def reference_inverse(block, noise, text=None, uncond=None, w=0.0, known=None, clips=None):
    """One token at a time in the block's order, each from full forward passes over the values so far;
    the unconditional branch reads the same (guided) values. ``known`` (B, k, C): the first k tokens."""
    values = torch.zeros_like(noise)
    start = 0 if known is None else known.shape[1]
    if known is not None:
        values[:, :start] = known
    for position in block.permutation.index(noise.shape[1])[start:]:
        mu, sigma = (p[:, position] for p in affine_from_forward(block, values, text))
        if w > 0:
            mu_u, sigma_u = (p[:, position] for p in affine_from_forward(block, values, uncond))
            if clips is not None:
                clips.add(sigma, sigma_u)
            mu, sigma = reference_guided_gaussian(mu, sigma, mu_u, sigma_u, w)
        values[:, position] = (mu + sigma * noise[:, position]).to(values.dtype)
    return values


def float64(text):
    return TextEmbedding(text.tokens.double(), text.mask)


@torch.no_grad()
def reference_sample(flow, z, cond, uncond, w, prefix=None, clips=None):
    """The guided deep block over the whole video, then every shallow block unguided on each frame; all
    in float64, so that its own rounding is far below the samplers' fp32."""
    flow, z, cond, uncond = copy.deepcopy(flow).double(), z.double(), float64(cond), float64(uncond)
    batch, frames = z.shape[:2]
    per_frame, given = flow.tokens_per_frame, 0 if prefix is None else prefix.shape[1]
    uncond = TextEmbedding(uncond.tokens.expand(batch, -1, -1), uncond.mask.expand(batch, -1))
    known = None
    if prefix is not None:
        known = prefix.double().reshape(batch * given, per_frame, CHANNELS)
        for block in flow.shallow:
            known, _ = block(known)
        known = known.reshape(batch, given * per_frame, CHANNELS)
    deep = reference_inverse(flow.deep, z.reshape(batch, frames * per_frame, CHANNELS), cond, uncond, w, known, clips)
    tokens = deep[:, given * per_frame:].reshape(batch * (frames - given), per_frame, CHANNELS)
    for block in reversed(flow.shallow):
        tokens = reference_inverse(block, tokens)
    sampled = tokens.reshape(batch, frames - given, *FRAME, CHANNELS)
    return sampled if prefix is None else torch.cat([prefix.double(), sampled], dim=1)


@pytest.fixture(scope="module")
def flow():
    return make_flow()


@pytest.fixture(scope="module")
def cond():
    return make_text(2, 4, seed=3, valid=3)


def noise(frames=3, seed=1):
    return torch.randn(2, frames, *FRAME, CHANNELS, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("w, tolerance", [(1.0, 1e-5), (3.5, 1e-5), (20.0, 1e-4)])  # large w amplifies fp32 rounding
@pytest.mark.parametrize("uncond_kind", UNCONDS)
def test_a_guided_sequential_sample_is_the_reference_inverse(flow, cond, uncond_kind, w, tolerance):
    uncond, z, clips = UNCONDS[uncond_kind](), noise(), ClipCounter()
    reference = reference_sample(flow, z, cond, uncond, w, clips=clips)
    x = SequentialSampler().sample(flow, z, GuidedText(cond, uncond), guidance=w)
    assert clips.narrower > 0 and clips.wider > 0  # both sides of the clip were sampled
    assert relative_error(x, reference) < tolerance
    unguided = SequentialSampler().sample(flow, z, cond)
    assert relative_error(unguided, reference) > 1e-2  # guidance matters here, so the comparison has teeth


def test_the_unconditional_branch_reads_the_guided_values_not_its_own(flow, cond):
    """Had the unconditional branch followed its own history, the sample would be another one."""
    uncond, z = UNCONDS["empty_caption"](), noise()
    batch, tokens = z.shape[0], flow.tokens_per_frame * z.shape[1]
    expanded = TextEmbedding(uncond.tokens.expand(batch, -1, -1), uncond.mask.expand(batch, -1))
    deep_noise = z.reshape(batch, tokens, CHANNELS)
    guided, own = torch.zeros_like(deep_noise), torch.zeros_like(deep_noise)
    with torch.no_grad():
        for position in range(tokens):
            mu_c, sigma_c = (p[:, position] for p in affine_from_forward(flow.deep, guided, cond))
            mu_u, sigma_u = (p[:, position] for p in affine_from_forward(flow.deep, own, expanded))
            mu, sigma = reference_guided_gaussian(mu_c, sigma_c, mu_u, sigma_u, 3.5)
            guided[:, position] = (mu + sigma * deep_noise[:, position]).float()
            own[:, position] = mu_u + sigma_u * deep_noise[:, position]
        frames = guided.reshape(-1, flow.tokens_per_frame, CHANNELS)
        for block in reversed(flow.shallow):
            frames = reference_inverse(block, frames)
    x = SequentialSampler().sample(flow, z, GuidedText(cond, uncond), guidance=3.5)
    assert relative_error(x, frames.view_as(x)) > 1e-2
    assert relative_error(x, reference_sample(flow, z, cond, uncond, 3.5)) < 1e-5


JACOBI = {
    "affine_warm_start": JacobiSampler(tol=1e-6, max_iterations=64),
    "values_warm_start": JacobiSampler(tol=1e-6, max_iterations=64, warm_start="values", block_size=4),
    "noise_warm_start": JacobiSampler(tol=1e-6, max_iterations=64, warm_start="noise", first_block_size=2),
}


@pytest.mark.parametrize("sampler", JACOBI.values(), ids=JACOBI.keys())
@pytest.mark.parametrize("uncond_kind", UNCONDS)
def test_guided_jacobi_agrees_with_guided_sequential_and_the_reference(flow, cond, uncond_kind, sampler):
    uncond, z = UNCONDS[uncond_kind](), noise()
    text = GuidedText(cond, uncond)
    sequential = SequentialSampler().sample(flow, z, text, guidance=3.5)
    jacobi = sampler.sample(flow, z, text, guidance=3.5)
    assert sampler.last_stats["deep"]["unconverged_blocks"] == 0
    assert relative_error(jacobi, sequential) < 1e-4
    assert relative_error(jacobi, reference_sample(flow, z, cond, uncond, 3.5)) < 1e-4


@pytest.mark.parametrize("sampler", [SequentialSampler(), JacobiSampler(tol=1e-6)], ids=["sequential", "jacobi"])
def test_weight_zero_is_the_unguided_sample_exactly(flow, cond, sampler):
    z, uncond = noise(), UNCONDS["negative_prompt"]()
    unguided = sampler.sample(flow, z, cond)
    assert torch.equal(sampler.sample(flow, z, GuidedText(cond, uncond), guidance=0.0), unguided)
    # The batched [cond; uncond] pass computes the same conditional branch as the unguided one.
    barely = SequentialSampler().sample(flow, z, GuidedText(cond, uncond), guidance=1e-6)
    assert relative_error(barely, unguided) < 1e-5


def test_only_the_deep_block_runs_both_branches(flow, cond, monkeypatch):
    rows = {block: [] for block in flow.blocks}
    for block in flow.blocks:
        def spy(inputs, cache, _block=block, _affine=block.affine):
            rows[_block].append(inputs.shape[0])
            return _affine(inputs, cache)
        monkeypatch.setattr(block, "affine", spy)
    guided_shapes = []

    def guided_spy(mu_c, *args):
        guided_shapes.append(mu_c.shape)
        return guided_affine(mu_c, *args)

    monkeypatch.setattr(inversion_module, "guided_affine", guided_spy)
    z = noise()
    SequentialSampler().sample(flow, z, GuidedText(cond, UNCONDS["empty_caption"]()), guidance=3.5)
    batch, frames = z.shape[:2]
    assert set(rows[flow.deep]) == {2 * batch}
    for block in flow.shallow:
        assert block.proj_text is None and set(rows[block]) == {batch * frames}
    assert set(guided_shapes) == {torch.Size([batch, 1, CHANNELS])}
    assert len(guided_shapes) == frames * flow.tokens_per_frame  # one guided step per deep token, no more


@pytest.mark.parametrize("sampler", [SequentialSampler(), JacobiSampler(tol=1e-6, max_iterations=64)],
                         ids=["sequential", "jacobi"])
def test_a_guided_continuation_keeps_its_prefix_and_is_the_reference_inverse(flow, cond, sampler):
    uncond, z = UNCONDS["negative_prompt"](), noise(frames=4)
    prefix = noise(frames=2, seed=6) * 0.7
    text = GuidedText(cond, uncond)
    x = sampler.sample(flow, z, text, guidance=3.5, prefix=prefix)
    assert torch.equal(x[:, :2], prefix)
    assert relative_error(x, reference_sample(flow, z, cond, uncond, 3.5, prefix)) < 1e-4
    other_prefix_noise = z.clone()
    other_prefix_noise[:, :2] = 5.0  # the prefix frames' noise is not read
    assert torch.equal(sampler.sample(flow, other_prefix_noise, text, guidance=3.5, prefix=prefix), x)


def test_guided_sampling_math_stays_fp32_under_bf16_autocast(flow, cond, monkeypatch):
    steps = []

    def guided_spy(*args):
        mu, sigma = guided_affine(*args)
        steps.append((args, mu, sigma))
        return mu, sigma

    monkeypatch.setattr(inversion_module, "guided_affine", guided_spy)
    text = GuidedText(cond, UNCONDS["empty_caption"]())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = SequentialSampler().sample(flow, z=noise(), text=text, guidance=3.5)
    assert x.dtype == torch.float32
    for (mu_c, sigma_c, mu_u, sigma_u, w), mu, sigma in steps:
        # Both branches' (mu, sigma) come out of the bf16 transformer in fp32, and the step keeps them there.
        assert {t.dtype for t in (mu_c, sigma_c, mu_u, sigma_u, mu, sigma)} == {torch.float32}
        mu_ref, sigma_ref = reference_guided_gaussian(mu_c, sigma_c, mu_u, sigma_u, w)
        torch.testing.assert_close(mu.double(), mu_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sigma.double(), sigma_ref, rtol=1e-5, atol=0)
