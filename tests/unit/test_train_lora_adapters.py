"""LoRA adapter files applied to a model of another architecture than the one their run adapted."""

import copy

import pytest

from flowvid.adapters import export_adapters
from flowvid.export import export_checkpoint
from flowvid.loading import load_model
from test_lora import ADAPTED_CONFIG, base_and_adapted, save_run_checkpoint


def test_adapters_applied_to_a_deeper_model_are_refused_naming_a_weight_the_adapted_model_lacks(tmp_path):
    """Every layer of the adapters fits a model with one more transformer layer, which they would leave
    unadapted: that model was applied with no more than the warning for other weights of the same shapes."""
    _, base_export, tuned = base_and_adapted(ADAPTED_CONFIG, tmp_path)
    adapters = export_adapters(save_run_checkpoint(tuned, ADAPTED_CONFIG, tmp_path / "tuned.ckpt"),
                               tmp_path / "lora" / "style.safetensors")
    deeper_config = copy.deepcopy(ADAPTED_CONFIG)
    deeper_config["model"]["init_args"]["flow"]["init_args"]["deep_depth"] = 2
    (tmp_path / "deeper").mkdir()
    deeper, _, _ = base_and_adapted(deeper_config, tmp_path / "deeper")
    deeper_export = export_checkpoint(save_run_checkpoint(deeper, deeper_config, tmp_path / "deeper.ckpt"),
                                      tmp_path / "deeper" / "export" / "model.safetensors")
    with pytest.raises(ValueError, match=r"trained on a model of another architecture: the model has "
                                         r"flow\.deep\.layers\.1\.\S+, the model adapted had not"):
        load_model(deeper_export, adapters=adapters)
    load_model(base_export, adapters=adapters)  # the model they were trained on
