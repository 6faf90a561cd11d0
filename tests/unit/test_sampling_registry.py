"""Samplers are plugins: registered by name, built from a recipe's YAML."""

import pytest
import torch
import yaml

from flowvid.registry import SAMPLERS
from flowvid.sampling import JacobiSampler, SequentialSampler, WindowedSampler, build_sampler


class HalfStepSampler(SequentialSampler):
    """A plugin sampler with a setting of its own."""

    def __init__(self, label: str = "x"):
        self.label = label


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.setattr(SAMPLERS, "_entries", dict(SAMPLERS._entries))  # leave the global registry as it was
    SAMPLERS.add("half-step", HalfStepSampler)
    return HalfStepSampler


def test_builtin_samplers_are_registered():
    assert {"sequential", "jacobi", "windowed"} <= set(SAMPLERS.names())
    assert SAMPLERS.get("jacobi") is JacobiSampler


def test_a_registered_plugin_is_selected_by_name_and_from_yaml(plugin):
    assert isinstance(build_sampler("half-step"), plugin)
    recipe = yaml.safe_load("""
    sampler:
      name: half-step
      init_args: {label: chosen}
    """)
    sampler = build_sampler(recipe["sampler"])
    assert isinstance(sampler, plugin) and sampler.label == "chosen"
    by_path = build_sampler({"class_path": f"{__name__}.HalfStepSampler", "init_args": {"label": "y"}})
    assert by_path.label == "y"
    z = torch.zeros(1, 1, 2, 3, 3)
    assert build_sampler("half-step").sample(_identity_flow(), z).shape == z.shape


def test_recipe_settings_reach_the_sampler():
    recipe = yaml.safe_load("""
    sampler:
      name: windowed
      init_args: {sampler: jacobi, window: 6, context: 2}
    """)
    sampler = build_sampler(recipe["sampler"])
    assert isinstance(sampler, WindowedSampler) and isinstance(sampler.sampler, JacobiSampler)
    assert (sampler.window, sampler.context) == (6, 2)
    jacobi = build_sampler({"name": "jacobi", "init_args": {"tol": 1e-4, "block_size": 32}})
    assert (jacobi.tol, jacobi.block_size) == (1e-4, 32)


def test_bad_sampler_specs_are_rejected():
    with pytest.raises(KeyError, match="sequential"):
        build_sampler("no-such-sampler")
    with pytest.raises(ValueError, match="name"):
        build_sampler({"init_args": {}})
    with pytest.raises(TypeError, match="not a Sampler"):
        build_sampler({"class_path": "collections.OrderedDict"})


def _identity_flow():
    from flowvid.flows import GlobalLocalFlow

    return GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(2, 3)).eval()


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "jacobi", "init_arg": {"tol": 1e-4}}, "unknown keys init_arg"),
        ({"class_path": "JacobiSampler"}, "'package.module.Class', got 'JacobiSampler'"),
        ({"class_path": "flowvid.no_such_module.JacobiSampler"}, "cannot import 'flowvid.no_such_module'"),
        ({"class_path": "flowvid.sampling.NoSuchSampler"}, "has no 'NoSuchSampler'"),
        ({"name": "jacobi", "init_args": [1e-4]}, "init_args .* must be a mapping"),
        ({"name": "jacobi", "init_args": {"tols": 1e-4}}, "'JacobiSampler'.*'tols'"),
    ],
)
def test_a_spec_that_cannot_work_is_a_value_error_naming_it(spec, message):
    with pytest.raises(ValueError, match=message) as raised:
        build_sampler(spec)
    assert repr(spec) in str(raised.value) or spec["class_path"] in str(raised.value)


CALLS = []


def make_something():
    """Stands for any callable a class_path may name, like ``os.getcwd``."""
    CALLS.append("called")
    return HalfStepSampler()


def test_a_class_path_that_is_not_a_sampler_class_is_refused_before_it_is_called():
    CALLS.clear()
    with pytest.raises(TypeError, match="names <function make_something.*which is not a Sampler class"):
        build_sampler({"class_path": f"{__name__}.make_something"})
    assert CALLS == []


def test_a_registered_name_that_is_not_a_sampler_class_is_refused(plugin):
    SAMPLERS.add("identity", torch.nn.Identity)
    with pytest.raises(TypeError, match="names <class 'torch.nn.modules.linear.Identity'>, which is not a Sampler"):
        build_sampler("identity")
