"""The built-in samplers, and a sampler written against the bare contract, pass the conformance kit."""

from flowvid.sampling import JacobiSampler, Sampler, SequentialSampler, WindowedSampler
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


class TestWindowedSamplerWithinOneWindow(SamplerConformance):
    sampler_class = WindowedSampler
    sampler_kwargs = {"sampler": {"name": "jacobi", "init_args": {"tol": 1e-5}}, "window": 8, "context": 2}
    tolerance = 1e-4


class WholeVideoSampler(Sampler):
    """A plugin written against the bare contract: only ``sample``; ``stream`` is the fallback."""

    def sample(self, flow, z, text=None, guidance=0.0, prefix=None):
        return SequentialSampler().sample(flow, z, text, guidance, prefix)


class TestBareContractSampler(SamplerConformance):
    sampler_class = WholeVideoSampler
    tolerance = 1e-5
