"""A model loads only with the plugin parts it was made with: a part whose registered name another package
now provides is refused, naming both, before any weight is read into it."""

import pytest
from torch import nn

from flowvid.export import check_plugin_packages
from flowvid.lit.checkpointing import CheckpointMismatchError
from flowvid.registry import BLOCKS, distribution_of


class ImpostorBlock(nn.Module):
    """Stands for a block another package registers under the name the model was trained with."""


def module_with_impostor(monkeypatch) -> nn.Module:
    monkeypatch.setattr(BLOCKS, "_entries", dict(BLOCKS._entries))  # restored after the test
    BLOCKS.add("wide-mlp", ImpostorBlock)
    return nn.Sequential(nn.Linear(1, 1), ImpostorBlock())


def test_a_block_of_a_package_the_model_was_not_made_with_is_refused(monkeypatch):
    module = module_with_impostor(monkeypatch)
    package = distribution_of(ImpostorBlock)
    recorded = {"flowvid_version": "0.1.0", "plugins": {"my-blocks": "0.1.0"}}
    with pytest.raises(CheckpointMismatchError) as refused:
        check_plugin_packages(module, recorded, "checkpoint c.ckpt", "trained")
    assert str(refused.value) == (
        f"checkpoint c.ckpt: its block 'wide-mlp' is {__name__}.ImpostorBlock of the package {package} here, "
        f"which the model was not trained with: another package registers the name now; uninstall {package}, "
        "or install the one the model was trained with\n"
        "It was trained with flowvid 0.1.0 and the plugin packages my-blocks 0.1.0")


def test_the_packages_it_was_made_with_and_files_written_elsewhere_load(monkeypatch):
    module = module_with_impostor(monkeypatch)
    package = distribution_of(ImpostorBlock)
    check_plugin_packages(module, {"flowvid_version": "0.1.0", "plugins": {package: "1.0"}}, "c.ckpt", "trained")
    check_plugin_packages(module, {}, "c.ckpt", "trained")  # no record of what made it: nothing to compare
    BLOCKS._entries.pop("wide-mlp")
    check_plugin_packages(module, {"flowvid_version": "0.1.0", "plugins": {}}, "c.ckpt", "trained")  # unnamed


def test_built_in_parts_need_no_plugin_package():
    from flowvid.flows.global_local import GlobalLocalFlow

    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=4, frame_size=(2, 2))
    assert distribution_of(type(flow)) == "flowvid"
    check_plugin_packages(flow, {"flowvid_version": "0.1.0", "plugins": {}}, "c.ckpt", "trained")
