"""Fine-tuning settings that would otherwise train something else than asked without a word: a Freeze that
freezes nothing, a partial export load, LoRA targets that adapt nothing, a strength that is not a number."""

import logging
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from flowvid.adapters import apply_adapters, export_adapters
from flowvid.export import build_module
from flowvid.flows import GlobalLocalFlow
from flowvid.lit.finetune import Freeze, InitFromExport, LoRA
from flowvid.nn.lora import LoRALinear
from test_lora import ADAPTED_CONFIG, base_and_adapted, save_run_checkpoint
from test_train_finetune_freeze import tiny_module, trainable


def test_a_freeze_of_a_part_the_model_lacks_names_it_and_lists_the_models_parts():
    with pytest.raises(ValueError, match=r"no sub-module flow\.middle; its parts are flow, codec, text_encoder, "
                                         r"denoiser"):
        Freeze(["flow.middle"]).setup(None, tiny_module(), "fit")


@pytest.mark.parametrize("modules", [[], ["codec"]], ids=["no-names", "a-part-without-weights"])
def test_a_freeze_that_freezes_no_parameter_is_refused_instead_of_training_everything(modules):
    module = tiny_module()
    everything = trainable(module)
    with pytest.raises(ValueError, match=r"freezes no parameter.*its parts are flow, codec, text_encoder, denoiser"):
        Freeze(modules).setup(None, module, "fit")
    assert trainable(module) == everything


def test_a_preset_whose_parts_hold_no_weights_is_refused():
    module = tiny_module()
    module.flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(2, 3), text_width=16,
                                              num_shallow=0)
    with pytest.raises(ValueError, match=r"Freeze\(\['flow\.shallow'\]\) freezes no parameter"):
        Freeze("shallow").setup(None, module, "fit")


def test_a_partial_export_load_reports_what_keeps_its_initialisation(tmp_path, caplog):
    source = tiny_module()
    flow_only = {name: weight.contiguous() for name, weight in source.state_dict().items() if name.startswith("flow.")}
    save_file(flow_only, str(tmp_path / "flow.safetensors"))
    module = tiny_module()
    left = [name for name in module.state_dict() if not name.startswith("flow.")]
    parts = Counter(name.partition(".")[0] for name in left)
    assert set(parts) == {"text_encoder", "denoiser"}
    with caplog.at_level(logging.INFO):
        InitFromExport(str(tmp_path / "flow.safetensors"), strict=False).setup(
            SimpleNamespace(ckpt_path=None), module, "fit")
    listed = ", ".join(f"{part} ({count})" for part, count in sorted(parts.items()))
    assert f"{len(left)} tensors are not in it and keep their initialisation: {listed}" in caplog.text


def test_init_from_export_of_another_shape_is_an_error_even_with_strict_false(tmp_path):
    state = {name: weight.contiguous() for name, weight in tiny_module().state_dict().items()}
    state["flow.deep.sos"] = torch.zeros(1, 1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"different shape: flow\.deep\.sos"):
        InitFromExport(str(tmp_path / "model.safetensors"), strict=False).setup(
            SimpleNamespace(ckpt_path=None), tiny_module(), "fit")


def test_lora_targets_given_that_name_no_layer_are_refused_before_anything_is_adapted():
    module = tiny_module()
    with pytest.raises(ValueError, match=r"LoRA targets attn\.qvk name no linear layer; .* end in .*attn\.qkv"):
        LoRA(rank=2, targets=["attn.qkv", "attn.qvk"]).setup(SimpleNamespace(), module, "fit")
    assert not any(isinstance(layer, LoRALinear) for layer in module.modules())
    # The default targets name both feed-forward kinds, given or not: the recipe lists them all.
    LoRA(rank=2, targets=["attn.qkv", "attn.proj", "mlp.fc", "mlp.gate_up", "mlp.proj"]).setup(
        SimpleNamespace(), module, "fit")


def test_an_infinite_lora_alpha_and_a_boolean_rank_are_refused():
    with pytest.raises(ValueError, match="alpha must be > 0 and finite, got inf"):
        LoRA(rank=4, alpha=float("inf"))  # scale inf: every adapted output NaN
    with pytest.raises(ValueError, match="rank must be a positive integer, got True"):
        LoRA(rank=True)


@pytest.mark.parametrize("strength", [float("nan"), float("inf")])
def test_a_strength_that_is_not_a_finite_number_is_refused_naming_the_strength(tmp_path, strength):
    _, _, tuned = base_and_adapted(ADAPTED_CONFIG, tmp_path)
    adapters = export_adapters(save_run_checkpoint(tuned, ADAPTED_CONFIG, tmp_path / "tuned.ckpt"),
                               tmp_path / "lora" / "style.safetensors")
    with pytest.raises(ValueError, match=f"LoRA strength must be a finite number .* got {strength}"):
        apply_adapters(build_module(ADAPTED_CONFIG), adapters, strength)
