"""The Sampler contract: invert a flow, like a diffusers scheduler stands apart from its model.

A sampler turns noise ``z`` (B, T, h, w, c) into latents ``x`` with ``flow(x) == z``. The block
samplers invert the deep block first (causal over the whole video, the only block that sees the text
and is guided), then the shallow blocks of every frame. ``check_request`` validates a call before
any computation, so every sampler rejects bad input the same way.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Union

import torch

from flowvid.registry import SAMPLERS, accepted_arguments, check_arguments
from flowvid.sampling.inversion import BlockInversion
from flowvid.text.base import TextEmbedding


@dataclass(frozen=True)
class GuidedText:
    """The caption's text states and the unconditional ones (the empty caption), for guidance.

    ``uncond`` may have batch 1 (one empty caption for every sample) and a different length than
    ``cond``; the shorter one is padded.
    """

    cond: TextEmbedding
    uncond: TextEmbedding


TextInput = Union[TextEmbedding, GuidedText, None]


@dataclass(frozen=True)
class SamplingRequest:
    """A checked sampling request: everything a sampler needs, nothing left to validate."""

    flow: Any
    z: torch.Tensor
    text: TextEmbedding | None
    uncond: TextEmbedding | None
    guidance: float
    prefix: torch.Tensor | None

    @property
    def prefix_frames(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    def deep_inversion(self) -> BlockInversion:
        """The deep block's inversion with the prefix (if any) encoded into its cache."""
        flow, z = self.flow, self.z
        batch, frames = z.shape[:2]
        tokens = z.reshape(batch, frames * flow.tokens_per_frame, flow.latent_channels)
        inversion = BlockInversion(flow.deep, tokens, self.text, self.uncond, self.guidance)
        if self.prefix is not None:
            inversion.prefill(encode_shallow(flow, self.prefix))
        return inversion


def encode_shallow(flow, frames: torch.Tensor) -> torch.Tensor:
    """Latent frames (B, P, h, w, c) through the shallow blocks: the deep block's input (B, P*h*w, c)."""
    batch, count = frames.shape[:2]
    tokens = frames.float().reshape(batch * count, flow.tokens_per_frame, flow.latent_channels)
    for block in flow.shallow:
        tokens, _ = block(tokens)
    return tokens.reshape(batch, count * flow.tokens_per_frame, flow.latent_channels)


def check_request(flow, z: torch.Tensor, text: TextInput = None, guidance: float = 0.0,
                  prefix: torch.Tensor | None = None) -> SamplingRequest:
    """Validate a ``sample`` call before any computation; ValueErrors name expected and actual."""
    for name, value in (("z", z), ("prefix", prefix)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of latent frames (B, T, h, w, c), "
                            f"got {type(value).__name__}")
    cond, uncond = (text.cond, text.uncond) if isinstance(text, GuidedText) else (text, None)
    if cond is None and flow.text_width is not None:  # a path the flow never trained on
        raise ValueError("this flow is text-conditioned: pass the caption's text states (for an unconditional "
                         "sample, the text encoder's embedding of the empty caption)")
    cond = flow.check_input(z, cond)  # its tokens now in the flow's dtype
    if isinstance(guidance, bool):  # True would run as weight 1
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r} (a bool)")
    guidance = float(guidance)
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
    if guidance > 0:
        if cond is None or uncond is None:
            raise ValueError(
                f"guidance={guidance} needs the caption and the unconditional text: pass "
                "text=GuidedText(cond, uncond), with uncond the text encoder's embedding of the empty caption"
            )
        uncond = _check_uncond(flow, cond, uncond)
    if prefix is not None:
        _check_prefix(flow, z, prefix)
    _check_frame_order(flow)
    return SamplingRequest(flow, z, cond, uncond if guidance > 0 else None, guidance, prefix)


def _check_uncond(flow, cond: TextEmbedding, uncond: TextEmbedding) -> TextEmbedding:
    tokens, mask = uncond
    batch = cond.tokens.shape[0]
    if tokens.dim() != 3 or tokens.shape[-1] != flow.text_width or tokens.shape[0] not in (1, batch):
        raise ValueError(f"expected unconditional text tokens of shape (1 or {batch}, L, {flow.text_width}), "
                         f"got {tuple(tokens.shape)}")
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"unconditional text mask shape {tuple(mask.shape)} does not match tokens "
                         f"{tuple(tokens.shape)}")
    return TextEmbedding(flow.check_text_tokens(tokens, "unconditional text tokens"), mask)


def _check_prefix(flow, z: torch.Tensor, prefix: torch.Tensor) -> None:
    batch, frames = z.shape[:2]
    expected = f"({batch}, P, {', '.join(str(s) for s in z.shape[2:])}) with 1 <= P < {frames}"
    if prefix.dim() != 5 or prefix.shape[0] != batch or prefix.shape[2:] != z.shape[2:]:
        raise ValueError(f"expected prefix latent frames of shape {expected}, got {tuple(prefix.shape)}")
    if prefix.shape[1] < 1:
        raise ValueError(f"a prefix of 0 frames is no prefix (leave it out: None); expected {expected}")
    if prefix.shape[1] >= frames:
        raise ValueError(f"a prefix of {prefix.shape[1]} frames leaves nothing to sample in a video of {frames} "
                         f"frames; expected {expected}")
    if not prefix.is_floating_point() or not torch.isfinite(prefix).all():
        raise ValueError("prefix latents must be finite floating-point values")


def _check_frame_order(flow) -> None:
    """Frame-by-frame inversion needs a deep block whose token order keeps every frame in place."""
    per_frame = flow.tokens_per_frame
    slots = flow.deep.permutation.index(2 * per_frame)
    if not torch.equal(slots // per_frame, torch.arange(2 * per_frame) // per_frame):
        raise ValueError(f"the deep block's permutation {flow.deep.permutation!r} moves tokens across frames; "
                         "samplers need a frame-causal deep block")


class Sampler(ABC):
    """Inverts a GlobalLocalFlow: noise ``z`` (B, T, h, w, c) -> latents ``x`` with ``flow(x) == z``.

    ``text`` is the caption's ``TextEmbedding``, or a ``GuidedText`` when ``guidance > 0``.
    ``prefix`` (B, P, h, w, c) are known first frames (an image, a source clip): they are encoded
    into the deep block's cache and returned unchanged as ``x[:, :P]`` (in float32, like every sample);
    ``z[:, :P]`` is not used (but must be finite, as all of ``z``).
    """

    @abstractmethod
    def sample(self, flow, z: torch.Tensor, text: TextInput = None, guidance: float = 0.0,
               prefix: torch.Tensor | None = None) -> torch.Tensor:
        """The latents (B, T, h, w, c) whose noise is ``z``."""

    def stream(self, flow, z: torch.Tensor, text: TextInput = None, guidance: float = 0.0,
               prefix: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield each sampled latent frame (B, h, w, c) in order; prefix frames are not yielded again.

        This fallback yields them once the whole video is done; block samplers yield each frame as
        soon as it is ready.
        """
        x = self.sample(flow, z, text, guidance, prefix)
        yield from x[:, 0 if prefix is None else prefix.shape[1]:].unbind(1)

    def __repr__(self) -> str:
        """The class and the settings its constructor took, as a diffusers scheduler shows its config: each
        argument the instance keeps under the same name, those its constructor passes on to a base's too."""
        names = [name for name in accepted_arguments(type(self)) if hasattr(self, name)]
        return f"{type(self).__name__}({', '.join(f'{name}={getattr(self, name)!r}' for name in names)})"

    @property
    def last_stats(self) -> dict:
        """Statistics of the last ``sample`` / ``stream`` call as JSON-ready values ({} if none kept).

        A sampler keeps its own by assigning ``self.last_stats = {...}`` in each call; until one does, they
        are ``call_stats()``, those the built-ins gather. A subclass of a built-in that assigns its own
        replaces the built-in's; ``self.last_stats = {**self.call_stats(), ...}`` keeps both."""
        assigned = self.__dict__.get("_last_stats")
        return self.call_stats() if assigned is None else assigned

    @last_stats.setter
    def last_stats(self, stats: dict) -> None:
        self.__dict__["_last_stats"] = stats

    def call_stats(self) -> dict:
        """The statistics the sampler gathers itself in a call, as JSON-ready values ({}: none)."""
        return {}


class BlockSampler(Sampler):
    """A sampler that inverts the deep block, then the shallow blocks of every frame.

    Subclasses say how one block is inverted: ``deep_frames`` (the deep block, yielding frames as
    they become final) and ``invert_frames`` (a shallow block on a batch of frames). This class
    validates the request, encodes the prefix and puts the frames together, for a whole video
    (``sample``) or frame by frame (``stream``).
    """

    #: The state of the call in progress (statistics, warm starts), made by ``new_call``.
    call: Any = None

    @torch.no_grad()
    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        request = check_request(flow, z, text, guidance, prefix)
        self.call = self.new_call()
        deep = self.invert_deep(request.deep_inversion(), flow.tokens_per_frame)
        batch, frames = z.shape[:2]
        new_frames = frames - request.prefix_frames
        tokens = deep[:, request.prefix_frames * flow.tokens_per_frame:]
        tokens = tokens.reshape(batch * new_frames, flow.tokens_per_frame, flow.latent_channels)
        sampled = self.invert_shallow(flow, tokens).view(batch, new_frames, *z.shape[2:])
        return sampled if prefix is None else torch.cat([prefix.to(sampled.dtype), sampled], dim=1)

    @torch.no_grad()
    def stream(self, flow, z, text=None, guidance=0.0, prefix=None):
        """Yield each sampled latent frame (B, h, w, c) as soon as its deep and shallow inverses are done.

        The frames equal ``sample``'s, up to the sampler's tolerance.
        """
        request = check_request(flow, z, text, guidance, prefix)
        call = self.new_call()
        batch = z.shape[0]
        frames = self.deep_frames(request.deep_inversion(), flow.tokens_per_frame)
        while True:
            self.call = call  # another stream of this sampler may have run while this one waited
            tokens = next(frames, None)
            if tokens is None:
                return
            yield self.invert_shallow(flow, tokens).view(batch, *z.shape[2:])

    def invert_shallow(self, flow, frames: torch.Tensor) -> torch.Tensor:
        """Frames (F, tokens_per_frame, c) after the deep block back to latents, every frame at once."""
        for index in reversed(range(len(flow.shallow))):
            frames = self.invert_frames(flow.shallow[index], frames, index)
        return frames

    def invert_deep(self, inversion: BlockInversion, tokens_per_frame: int) -> torch.Tensor:
        """Run the deep inversion to the end; the deep block's input (B, N, c), natural order."""
        for _ in self.deep_frames(inversion, tokens_per_frame):
            pass
        return inversion.result()

    @abstractmethod
    def deep_frames(self, inversion: BlockInversion, tokens_per_frame: int) -> Iterator[torch.Tensor]:
        """Invert the deep block, yielding each new frame's tokens (B, tokens_per_frame, c) once final."""

    @abstractmethod
    def invert_frames(self, block, frames: torch.Tensor, index: int) -> torch.Tensor:
        """Invert shallow block number ``index`` on a batch of frames (F, tokens_per_frame, c)."""

    def new_call(self) -> Any:
        """Fresh state for one ``sample`` or ``stream`` call, held in ``self.call`` while it runs, so that
        streams interleaved on one sampler each keep their own (samplers that keep any override this)."""
        return None


#: The keys of a sampler spec in a recipe.
SPEC_KEYS = ("name", "class_path", "init_args")


def build_sampler(spec: "str | Mapping[str, Any] | Sampler") -> Sampler:
    """A sampler from what a recipe writes: a registered name (``jacobi``), a mapping with ``name`` or
    ``class_path`` and optional ``init_args``, or an instance (returned as is).

    A spec that cannot work is a ValueError naming it, raised before anything is called (a misspelled
    key would otherwise leave the sampler's defaults in place without a word).
    """
    if isinstance(spec, Sampler):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    _check_spec(spec)
    cls = sampler_class(spec)
    init_args = dict(spec.get("init_args") or {})
    check_arguments(f"sampler {cls.__name__!r}", cls, init_args, f"the init_args of {spec!r}")
    return cls(**init_args)


def sampler_class(spec: "str | Mapping[str, Any]") -> type[Sampler]:
    """The Sampler class a registered name, a ``package.module.Class`` path or a recipe's mapping names."""
    if isinstance(spec, str):
        spec = {"class_path" if "." in spec else "name": spec}
    cls = SAMPLERS.get(spec["name"]) if "name" in spec else _import_sampler_class(spec["class_path"])
    if not (isinstance(cls, type) and issubclass(cls, Sampler)):
        raise TypeError(f"sampler {spec!r} names {cls!r}, which is not a Sampler class")
    return cls


def _check_spec(spec: Any) -> None:
    if not isinstance(spec, Mapping) or ("name" in spec) == ("class_path" in spec):
        raise ValueError(f"a sampler is a registered name or a mapping with 'name' or 'class_path' "
                         f"(and 'init_args'), got {spec!r}")
    unknown = sorted(str(key) for key in spec if key not in SPEC_KEYS)
    if unknown:
        raise ValueError(f"sampler spec {spec!r} has unknown keys {', '.join(unknown)}; "
                         f"expected {', '.join(SPEC_KEYS)}")
    if not isinstance(spec.get("init_args") or {}, Mapping):
        raise ValueError(f"the init_args of sampler spec {spec!r} must be a mapping of settings, "
                         f"got {type(spec['init_args']).__name__}")


def _import_sampler_class(class_path: Any) -> Any:
    """What ``module.Class`` names (``build_sampler`` checks that it is a Sampler class)."""
    module_name, _, name = class_path.rpartition(".") if isinstance(class_path, str) else ("", "", "")
    if not module_name or not name:
        raise ValueError(f"a sampler class_path is 'package.module.Class', got {class_path!r}")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except ImportError as err:
        raise ValueError(f"sampler class_path {class_path!r}: cannot import {module_name!r}: {err}") from err
    except AttributeError:
        raise ValueError(f"sampler class_path {class_path!r}: module {module_name!r} has no {name!r}") from None
    return cls
