"""The built-in samplers pass the sampler conformance kit."""

from flowvid.sampling import JacobiSampler, SequentialSampler
from flowvid.testing import SamplerConformance


class TestSequentialSampler(SamplerConformance):
    sampler_class = SequentialSampler
    tolerance = 1e-5


class TestJacobiSampler(SamplerConformance):
    sampler_class = JacobiSampler
    sampler_kwargs = {"tol": 1e-5, "first_block_size": 4}
    tolerance = 1e-4


class TestJacobiSamplerWithoutWarmStart(SamplerConformance):
    sampler_class = JacobiSampler
    sampler_kwargs = {"tol": 1e-5, "block_size": 12, "warm_start": "noise"}
    tolerance = 1e-4


class TestJacobiSamplerWithValueWarmStart(SamplerConformance):
    sampler_class = JacobiSampler
    sampler_kwargs = {"tol": 1e-5, "first_block_size": 3, "warm_start": "values"}
    tolerance = 1e-4
