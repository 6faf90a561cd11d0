"""Samplers: invert a flow from noise to latents, for every generation task, of any length.

    from flowvid.sampling import SequentialSampler, JacobiSampler
    x = SequentialSampler().sample(flow, z, text)          # exact inverse of flow(x) -> z
    x = JacobiSampler(tol=1e-2).sample(flow, z, text)      # the same within tolerance, in parallel
"""

from flowvid.sampling.base import (BlockSampler, GuidedText, Sampler, SamplingRequest, build_sampler,
                                   check_request, sampler_class)
from flowvid.sampling.inversion import BlockInversion
from flowvid.sampling.jacobi import JacobiSampler, JacobiStats
from flowvid.sampling.rollout import WindowedSampler, windows
from flowvid.sampling.sequential import SequentialSampler, invert_block_sequential
from flowvid.sampling.tasks import (TASKS, TaskInputs, encode_text, initial_noise, sample_task, task_caption,
                                    task_inputs)

__all__ = [
    "BlockInversion", "BlockSampler", "GuidedText", "JacobiSampler", "JacobiStats", "Sampler", "SamplingRequest",
    "SequentialSampler", "TASKS", "TaskInputs", "WindowedSampler", "build_sampler", "check_request", "encode_text",
    "initial_noise", "invert_block_sequential", "sample_task", "sampler_class", "task_caption", "task_inputs",
    "windows",
]
