"""Conformance tests for samplers.

A sampler plugin's test module subclasses the mixin and says how to build its sampler::

    from flowvid.testing import SamplerConformance

    class TestMySampler(SamplerConformance):
        sampler_class = MySampler       # called as sampler_class(**sampler_kwargs)
        sampler_kwargs = {"tol": 1e-5}
        tolerance = 1e-4                # relative L2 to the exact SequentialSampler that it promises

pytest then runs every ``test_*`` method below on a tiny text-conditioned flow with perturbed weights:
agreement with ``SequentialSampler`` (plain, guided, with a prefix, guided with a prefix; the unconditional
text a real token, as text encoders give the empty caption), guided samples that are the guided inverse,
exact prefix reproduction, the inverse of the flow's own noise and shapes and dtypes (also for an
unconditional flow, sampled without text, and for a batch of one video), determinism (also after a call
with other inputs), the caller's noise, text, prefix and flow left as given, streaming (plain and guided),
``last_stats`` as JSON values, and clear errors. A failure says what the sampler did wrong.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch

from flowvid.flows.global_local import GlobalLocalFlow
from flowvid.flows.guidance import guided_affine
from flowvid.sampling.base import GuidedText, Sampler, encode_shallow
from flowvid.sampling.sequential import SequentialSampler
from flowvid.testing.block_conformance import perturb_parameters
from flowvid.text.base import TextEmbedding

#: The requests every sampler meets (``conditioned``, ``batch``): a text-conditioned flow, an
#: unconditional one (sampled with ``text=None``) and a batch of one video.
REQUESTS = [pytest.param(True, 2, id="text"), pytest.param(False, 2, id="unconditional"),
            pytest.param(True, 1, id="one_video")]


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).norm() / reference.norm()).item()


def check_close(x: torch.Tensor, reference: torch.Tensor, tolerance: float, what: str) -> None:
    """Fail, naming ``what`` was compared, unless ``x`` is within ``tolerance`` (relative L2) of ``reference``."""
    error = relative_error(x, reference)
    assert error <= tolerance, (f"{what}: relative L2 error {error:.3g} exceeds the tolerance {tolerance:g} the "
                                "sampler promises (its class's `tolerance`; raise it, or tighten the sampler's own)")


def inputs_of(z: torch.Tensor, text: Any, prefix: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tensors a caller hands a sampler, by the name the message gives each."""
    tensors = {"noise z": z}
    if isinstance(text, GuidedText):
        tensors.update({"text.cond.tokens": text.cond.tokens, "text.uncond.tokens": text.uncond.tokens})
    elif text is not None:
        tensors["text.tokens"] = text.tokens
    if prefix is not None:
        tensors["prefix"] = prefix
    return tensors


def changes_to(flow: torch.nn.Module, weights: dict[str, torch.Tensor], shown: int = 3) -> list[str]:
    """The first ``shown`` weights of ``flow`` that differ from ``weights`` (in value or dtype), and its
    training mode if it left eval mode."""
    changed = [name for name, tensor in flow.state_dict().items()
               if name not in weights or tensor.dtype != weights[name].dtype or not torch.equal(tensor, weights[name])]
    return changed[:shown] + (["training mode"] if flow.training else [])


class SamplerConformance:
    """Mixin of tests every Sampler must pass. Set ``sampler_class`` (and ``sampler_kwargs``, ``tolerance``)."""

    sampler_class: ClassVar[Any]
    sampler_kwargs: ClassVar[dict] = {}
    tolerance: ClassVar[float] = 1e-4
    text_width: ClassVar[int] = 8
    frames: ClassVar[int] = 4

    @pytest.fixture(autouse=True)
    def _one_thread(self):
        """Tiny flows run fastest on one thread, and do not stall when other processes load the CPU."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)

    def make_sampler(self) -> Sampler:
        return self.sampler_class(**self.sampler_kwargs)

    def make_flow(self, conditioned: bool = True) -> GlobalLocalFlow:
        torch.manual_seed(0)
        flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3),
                                           text_width=self.text_width if conditioned else None)
        perturb_parameters(flow, std=0.05)
        return flow.eval()

    def make_text(self, batch: int = 2) -> GuidedText:
        """The captions, and the unconditional text as text encoders give it: the empty caption's own
        (real) token, batch 1, of another length than the captions."""
        generator = torch.Generator().manual_seed(1)
        mask = torch.ones(batch, 4, dtype=torch.bool)
        mask[0, 2:] = False
        cond = TextEmbedding(torch.randn(batch, 4, self.text_width, generator=generator) * mask[..., None], mask)
        uncond_mask = torch.tensor([[True, False]])
        uncond = TextEmbedding(torch.randn(1, 2, self.text_width, generator=generator) * uncond_mask[..., None],
                               uncond_mask)
        return GuidedText(cond, uncond)

    def make_noise(self, batch: int = 2, seed: int = 2) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.frames, 2, 3, 3, generator=generator)

    def request_text(self, conditioned: bool, batch: int) -> TextEmbedding | None:
        return self.make_text(batch).cond if conditioned else None

    @pytest.mark.parametrize("conditioned, batch", REQUESTS)
    def test_output_shape_and_dtype(self, conditioned, batch):
        flow, z = self.make_flow(conditioned), self.make_noise(batch)
        x = self.make_sampler().sample(flow, z, self.request_text(conditioned, batch))
        assert isinstance(x, torch.Tensor) and x.shape == z.shape and x.dtype == torch.float32, (
            f"sample returned {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}; a sample "
            f"is float32 latents of the noise's shape {tuple(z.shape)}")
        assert torch.isfinite(x).all(), "sample returned NaN or infinite latents for finite noise"

    @pytest.mark.parametrize("conditioned, batch", REQUESTS)
    def test_inverts_the_flow(self, conditioned, batch):
        flow, text = self.make_flow(conditioned), self.request_text(conditioned, batch)
        x = self.make_noise(batch, seed=3)
        with torch.no_grad():
            z, _ = flow(x, text)
        check_close(self.make_sampler().sample(flow, z, text), x, self.tolerance,
                    "the sample of the noise flow(x) is not x")

    @pytest.mark.parametrize("guidance", [0.0, 2.0])
    def test_agrees_with_sequential_sampler(self, guidance):
        flow, z, text = self.make_flow(), self.make_noise(), self.make_text()
        reference = SequentialSampler().sample(flow, z, text, guidance=guidance)
        check_close(self.make_sampler().sample(flow, z, text, guidance=guidance), reference, self.tolerance,
                    f"the sample differs from SequentialSampler's at guidance {guidance}")

    def test_a_guided_sample_is_the_guided_inverse(self):
        """Checked without another sampler: encoded again, every token the deep block reads is its guided
        update, ``mu + sigma * z`` with both branches reading the guided sample."""
        flow, z, text = self.make_flow(), self.make_noise(), self.make_text()
        x = self.make_sampler().sample(flow, z, text, guidance=2.0)
        batch = z.shape[0]
        uncond = TextEmbedding(text.uncond.tokens.expand(batch, -1, -1), text.uncond.mask.expand(batch, -1))
        with torch.no_grad():
            tokens = encode_shallow(flow, x)
            (z_cond, logdet_cond), (z_uncond, logdet_uncond) = flow.deep(tokens, text.cond), flow.deep(tokens, uncond)
        sigma_cond, sigma_uncond = logdet_cond.neg().exp(), logdet_uncond.neg().exp()
        mu, sigma = guided_affine(tokens - sigma_cond * z_cond, sigma_cond, tokens - sigma_uncond * z_uncond,
                                  sigma_uncond, 2.0)
        check_close(mu + sigma * z.reshape_as(tokens), tokens, self.tolerance,
                    "the guided sample is not the guided inverse (mu + sigma * z, both branches reading the sample)")

    def test_guidance_zero_equals_unguided_sampling(self):
        flow, z, text = self.make_flow(), self.make_noise(), self.make_text()
        sampler = self.make_sampler()
        assert torch.equal(sampler.sample(flow, z, text, guidance=0.0), sampler.sample(flow, z, text.cond)), (
            "at guidance 0 a GuidedText gave another sample than its conditional text alone: guidance 0 must "
            "leave the unconditional branch out")

    @pytest.mark.parametrize("guidance", [0.0, 2.0])
    def test_prefix_is_reproduced_exactly_and_continued(self, guidance):
        flow, z, text = self.make_flow(), self.make_noise(), self.make_text()
        text = text if guidance else text.cond
        prefix = self.make_noise(seed=4)[:, :2]
        x = self.make_sampler().sample(flow, z, text, guidance, prefix)
        assert torch.equal(x[:, :2], prefix), ("the sample's first frames are not the prefix as given: return "
                                               "the prefix itself as x[:, :P], not its inverse or a copy in "
                                               "another precision")
        reference = SequentialSampler().sample(flow, z, text, guidance, prefix)
        check_close(x, reference, self.tolerance,
                    f"the continuation of a prefix differs from SequentialSampler's at guidance {guidance}")

    def test_same_inputs_give_the_same_sample(self):
        """Also after a call with other inputs: a sampler used for one video after another must sample each
        as a fresh sampler would."""
        flow, z, text = self.make_flow(), self.make_noise(), self.make_text().cond
        sampler = self.make_sampler()
        first = sampler.sample(flow, z, text)
        assert torch.equal(first, sampler.sample(flow, z, text)), (
            "two calls with the same inputs gave different samples: a sample may depend on its inputs only "
            "(no random numbers drawn, no state carried from one call to the next)")
        other = (self.make_noise(seed=5), TextEmbedding(text.tokens.flip(0), text.mask.flip(0)))
        assert torch.equal(sampler.sample(flow, *other), self.make_sampler().sample(flow, *other)), (
            "a sampler that had sampled other noise and text gave another sample than a fresh one: it carries "
            "state (a cache, the last text or solution) from one call to the next")

    @pytest.mark.parametrize("guidance, prefix_frames", [(0.0, 0), (2.0, 1)])
    def test_the_callers_inputs_are_left_as_given(self, guidance, prefix_frames):
        """A caller keeps its tensors (a windowed rollout hands each window a view of the video's noise; a
        caller may sample the same noise again): a sampler must not write into them."""
        flow, z, text = self.make_flow(), self.make_noise(), self.make_text()
        text = text if guidance else text.cond
        prefix = self.make_noise(seed=4)[:, :prefix_frames] if prefix_frames else None
        sampler = self.make_sampler()
        weights = {name: tensor.clone() for name, tensor in flow.state_dict().items()}
        for call in ("sample", "stream"):
            given = inputs_of(z, text, prefix)
            before = {name: tensor.clone() for name, tensor in given.items()}
            result = getattr(sampler, call)(flow, z, text, guidance, prefix)
            if call == "stream":
                list(result)
            for name, tensor in given.items():
                assert torch.equal(tensor, before[name]), (
                    f"{type(sampler).__name__}.{call} changed the caller's {name} in place; work on a copy "
                    f"(e.g. {name.split()[-1]}.clone()) or out-of-place operations: callers reuse their tensors")
            changed = changes_to(flow, weights)
            assert not changed, (f"{type(sampler).__name__}.{call} changed the caller's flow ({', '.join(changed)}): "
                                 "sample with the flow as given (another dtype or mode on a copy of it)")

    @pytest.mark.parametrize("guidance", [0.0, 2.0])
    def test_stream_yields_the_sampled_frames_in_order(self, guidance):
        flow, z, text = self.make_flow(), self.make_noise(), self.make_text()
        text = text if guidance else text.cond
        prefix = self.make_noise(seed=4)[:, :1]
        sampler = self.make_sampler()
        frames = list(sampler.stream(flow, z, text, guidance, prefix))
        shapes = [tuple(frame.shape) for frame in frames]
        assert shapes == [tuple(z[:, 0].shape)] * (self.frames - 1), (
            f"stream with a 1-frame prefix yielded frames of shapes {shapes}; expected the {self.frames - 1} "
            f"sampled frames (the prefix is not yielded again), each {tuple(z[:, 0].shape)}")
        x = sampler.sample(flow, z, text, guidance, prefix)
        check_close(torch.stack(frames, dim=1), x[:, 1:], self.tolerance,
                    f"the streamed frames differ from sample's at guidance {guidance}")

    def test_last_stats_are_json_ready(self):
        """``sampler.last_stats`` (written to generate's records) holds JSON values after a call."""
        flow, z, text = self.make_flow(), self.make_noise(), self.make_text()
        sampler = self.make_sampler()
        sampler.sample(flow, z, text.cond)
        stats = sampler.last_stats
        assert isinstance(stats, dict), f"last_stats is a {type(stats).__name__}, not a dict"
        assert json.loads(json.dumps(stats)) == stats, (
            f"last_stats {stats!r} is not JSON-ready: keep plain numbers, strings, lists and dicts with string keys")

    def test_bad_input_is_rejected_before_sampling(self):
        flow, z, text = self.make_flow(), self.make_noise(), self.make_text()
        sampler = self.make_sampler()
        with pytest.raises(ValueError, match="nothing to sample"):
            sampler.sample(flow, z, text.cond, prefix=torch.zeros(2, self.frames + 1, 2, 3, 3))
        with pytest.raises(ValueError, match="prefix"):
            sampler.sample(flow, z, text.cond, prefix=torch.zeros(2, 1, 3, 2, 3))
        with pytest.raises(ValueError, match="unconditional"):
            sampler.sample(flow, z, text.cond, guidance=1.0)
        with pytest.raises(ValueError, match="guidance"):  # a bool is no weight: True would run as 1.0
            sampler.sample(flow, z, text, guidance=True)
        with pytest.raises(ValueError, match="latents"):
            sampler.sample(flow, z[..., :2], text.cond)
