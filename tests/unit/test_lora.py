"""LoRA adapters: an adapted block is still an exact flow, starts as the block it adapts, and merges
into plain weights that give the adapted model's outputs."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule
from safetensors.torch import save_file

from flowvid.denoise import CausalDenoiser
from flowvid.flows import AffineBlock, GlobalLocalFlow
from flowvid.lit.checkpointing import METADATA_KEY, CheckpointMismatchError, check_resumable, run_metadata
from flowvid.lit.ema import EMA
from flowvid.lit.finetune import InitFromExport, LoRA
from flowvid.nn.lora import LoRALinear, add_lora, merge_lora
from flowvid.testing import FlowBlockConformance, perturb_parameters
from flowvid_plugins.blocks import GatedAffineBlock


def adapted_affine_block(spec):
    block = AffineBlock(spec)
    add_lora(block, rank=2, alpha=4.0)
    return block  # the kit perturbs every parameter, the adapters' B included: the adapters are not zero


def adapted_gated_block(spec):
    block = GatedAffineBlock(spec)
    add_lora(block, rank=2)
    return block


class TestAdaptedAffineBlock(FlowBlockConformance):
    block_class = staticmethod(adapted_affine_block)


class TestAdaptedGatedBlock(FlowBlockConformance):
    block_class = staticmethod(adapted_gated_block)


def test_an_adapted_layer_starts_as_the_layer_and_merges_into_it():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    x = torch.randn(4, 6)
    adapted = LoRALinear(linear, rank=2, alpha=3.0)
    assert torch.equal(adapted(x), linear(x))  # B starts at zero
    assert adapted.weight is linear.weight and not adapted.weight.requires_grad
    assert [name for name, p in adapted.named_parameters() if p.requires_grad] == ["lora_a", "lora_b"]

    with torch.no_grad():
        adapted.lora_b.normal_()
    expected = linear(x) + 1.5 * x @ adapted.lora_a.T @ adapted.lora_b.T
    torch.testing.assert_close(adapted(x), expected)
    merged = torch.nn.Linear(6, 5)
    merged.load_state_dict(merge_lora(adapted.state_dict()))
    torch.testing.assert_close(merged(x), adapted(x), rtol=1e-6, atol=1e-6)


def test_adapters_trained_at_another_scale_are_refused():
    trained = LoRALinear(torch.nn.Linear(6, 5), rank=2, alpha=2.0)
    state = trained.state_dict()
    LoRALinear(torch.nn.Linear(6, 5), rank=2, alpha=2.0).load_state_dict(state)
    # Resumed with another alpha, the forward pass and a merge would use different scales.
    with pytest.raises(ValueError, match=r"trained at scale 1 \(alpha / rank\), this model is configured for 2"):
        LoRALinear(torch.nn.Linear(6, 5), rank=2, alpha=4.0).load_state_dict(state)


def tiny_flow(seed: int = 0) -> GlobalLocalFlow:
    torch.manual_seed(seed)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(4, 4))
    perturb_parameters(flow, std=0.05, seed=seed)
    return flow


def test_add_lora_adapts_every_transformer_linear_and_refuses_the_rest():
    flow = tiny_flow()
    layers = sum(len(block.layers) for block in flow.blocks)
    names = add_lora(flow, rank=2)
    assert len(names) == 4 * layers  # qkv, attention output, and the MLP's two
    assert all(".layers." in name for name in names)
    with pytest.raises(ValueError, match="outside them"):
        add_lora(tiny_flow(), rank=2, targets=["proj_out"])  # read directly in fp32: an adapter would be skipped
    with pytest.raises(ValueError, match="found no linear layer named mlp.up"):
        add_lora(tiny_flow(), rank=2, targets=["mlp.up"])
    for rank in (0, -1, 2.5):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            add_lora(tiny_flow(), rank=rank)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        LoRA(rank=4, alpha=0.0)


class Parts(LightningModule):
    def __init__(self, ema_decay: float | None = None):
        super().__init__()
        self.flow = tiny_flow()
        self.denoiser = CausalDenoiser(3, (4, 4), width=16, depth=1, head_dim=16)
        self.ema = EMA(self, ema_decay) if ema_decay else None


def test_the_callback_trains_only_the_adapters_of_the_flow_and_keeps_its_outputs():
    model = Parts(ema_decay=0.9)
    x = torch.randn(2, 2, 4, 4, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.flow.nll(x)
    LoRA(rank=2).setup(SimpleNamespace(), model, "fit")
    with torch.no_grad():
        assert torch.equal(model.flow.nll(x), before)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    flow_trainable = {name for name in trainable if name.startswith("flow.")}
    assert flow_trainable and all(name.endswith(("lora_a", "lora_b")) for name in flow_trainable)
    assert {name for name, _ in model.denoiser.named_parameters(prefix="denoiser")} <= trainable
    assert set(model.ema.parameters) == trainable  # the average follows what trains

    LoRA(rank=2).setup(SimpleNamespace(), model, "validate")  # a later stage of the same run adapts nothing twice
    assert sum(isinstance(layer, LoRALinear) for layer in model.modules()) == len(add_lora(tiny_flow(), rank=2))
    LoRA(rank=2, modules=["denoiser"]).setup(SimpleNamespace(), model, "fit")  # a second callback, other parts
    assert any(isinstance(layer, LoRALinear) for layer in model.denoiser.modules())
    with pytest.raises(ValueError, match="has no sub-module flow.middle"):
        LoRA(modules=["flow.middle"]).setup(SimpleNamespace(), Parts(), "fit")


def test_a_lora_checkpoint_loaded_without_the_lora_callback_says_to_add_the_overlay():
    adapted = Parts()
    LoRA(rank=2).setup(SimpleNamespace(), adapted, "fit")
    saved = {"hyper_parameters": {"lr": 2e-4}, METADATA_KEY: run_metadata(adapted)}
    with pytest.raises(CheckpointMismatchError, match=r"holds LoRA adapters .* recipes/finetune/lora\.yaml") as err:
        check_resumable(saved, Parts(), "checkpoint c")
    assert "different model configuration" not in str(err.value)
    check_resumable(saved, adapted, "checkpoint c")  # with the callback it resumes


def test_plain_weights_load_into_an_adapted_model_whatever_the_callback_order(tmp_path):
    source = Parts()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    adapted = Parts()
    with torch.no_grad():
        for parameter in adapted.parameters():
            parameter.zero_()
    LoRA(rank=2).setup(SimpleNamespace(), adapted, "fit")  # listed before InitFromExport
    InitFromExport(str(path)).setup(SimpleNamespace(ckpt_path=None), adapted, "fit")
    x = torch.randn(2, 2, 4, 4, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(adapted.flow.nll(x), source.flow.nll(x))


def test_merged_weights_give_the_adapted_flow():
    adapted = tiny_flow()
    add_lora(adapted, rank=3, alpha=6.0)
    perturb_parameters(adapted, std=0.05, seed=3)
    plain = tiny_flow()
    merged = merge_lora(adapted.state_dict())
    assert not any("lora" in key for key in merged)
    plain.load_state_dict(merged)
    x = torch.randn(2, 2, 4, 4, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        (z_adapted, logdet_adapted), (z_plain, logdet_plain) = adapted(x), plain(x)
        assert not torch.allclose(z_adapted, tiny_flow()(x)[0], atol=1e-3)  # the adapters do change the flow
    torch.testing.assert_close(z_plain, z_adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logdet_plain, logdet_adapted, rtol=1e-5, atol=1e-5)


# --- adapter files ------------------------------------------------------------------------------------


ADAPTED_CONFIG = {"model": {"class_path": "flowvid.lit.FlowModule", "init_args": {
    "flow": {"class_path": "flowvid.flows.global_local.GlobalLocalFlow",
             "init_args": {"latent_channels": 3, "frame_size": [4, 4], "num_shallow": 1, "shallow_width": 32,
                           "shallow_depth": 1, "deep_width": 32, "deep_depth": 1, "head_dim": 16}},
    "codec": {"class_path": "flowvid.codecs.pixel.PixelCodec"}, "video_shape": [2, 4, 4]}}}


def save_run_checkpoint(module, config, path):
    """A checkpoint as ``flowvid fit`` writes it: weights, the run's metadata and flowvid's own section."""
    from flowvid.lit.checkpointing import METADATA_KEY, run_metadata

    saved = {"state_dict": module.state_dict(), "global_step": 3, METADATA_KEY: run_metadata(module, config=config)}
    module.on_save_checkpoint(saved)
    torch.save(saved, path)
    return path


def base_and_adapted(config, tmp_path):
    """A perturbed model, its export, and a copy of it given LoRA adapters whose updates are not zero."""
    from flowvid.export import build_module, export_checkpoint

    base = build_module(config)
    perturb_parameters(base, std=0.05, seed=1)
    base_export = export_checkpoint(save_run_checkpoint(base, config, tmp_path / "base.ckpt"),
                                    tmp_path / "base" / "model.safetensors")
    tuned = build_module(config)
    tuned.load_state_dict(base.state_dict())
    LoRA(rank=2).setup(SimpleNamespace(), tuned, "fit")
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_b" in name:
                parameter.normal_(std=0.05)
    return base, base_export, tuned


def test_adapters_alone_turn_the_base_model_into_the_fine_tuned_one_at_any_strength(tmp_path, capsys):
    from flowvid.adapters import export_adapters, read_adapters
    from flowvid.cli import main
    from flowvid.export import build_module
    from flowvid.loading import load_model

    config = ADAPTED_CONFIG
    base, base_export, tuned = base_and_adapted(config, tmp_path)
    adapters = export_adapters(save_run_checkpoint(tuned, config, tmp_path / "tuned.ckpt"),
                               tmp_path / "lora" / "style.safetensors")
    assert read_adapters(adapters) and all(name.rpartition(".")[2].startswith("lora_") for name in read_adapters(adapters))

    x = torch.rand(2, 2, 4, 4, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tuned.flow.nll(x)
        assert not torch.allclose(expected, base.flow.nll(x))
        torch.testing.assert_close(load_model(base_export, adapters=adapters).flow.nll(x), expected,
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(load_model(base_export, adapters=adapters, adapter_strength=0.0).flow.nll(x),
                           base.flow.nll(x))
        half = load_model(base_export, adapters=adapters, adapter_strength=0.5).flow.nll(x)
        assert not torch.allclose(half, expected) and not torch.allclose(half, base.flow.nll(x))

    with pytest.raises(ValueError, match="holds no LoRA adapters"):
        export_adapters(tmp_path / "base.ckpt", tmp_path / "none.safetensors")
    bf16 = ["export", "--ckpt", str(tmp_path / "tuned.ckpt"), "--out", str(tmp_path / "bf16.safetensors"),
            "--adapters-only", "--dtype", "bf16"]
    assert main(bf16) == 2 and "--adapters-only writes fp32 adapters" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not a LoRA adapter file"):
        read_adapters(base_export)
    wider = copy.deepcopy(config)
    wider["model"]["init_args"]["flow"]["init_args"].update(deep_width=64, shallow_width=64)
    from flowvid.adapters import apply_adapters
    with pytest.raises(ValueError, match="do not fit this model"):
        apply_adapters(build_module(wider), adapters)
    assert main(["generate", "--ckpt", str(base_export), "--lora-strength", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "--lora-strength needs --lora" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(base_export), "--lora", str(adapters), "--out", str(tmp_path / "o")]) == 0
    record = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert record["lora"] == str(adapters) and record["lora_strength"] == 1.0


def test_adapters_applied_to_other_weights_than_their_runs_are_applied_with_a_warning(tmp_path):
    import warnings

    from flowvid.adapters import export_adapters
    from flowvid.export import export_checkpoint
    from flowvid.loading import load_model

    config = ADAPTED_CONFIG
    _, base_export, tuned = base_and_adapted(config, tmp_path)
    tuned_checkpoint = save_run_checkpoint(tuned, config, tmp_path / "tuned.ckpt")
    adapters = export_adapters(tuned_checkpoint, tmp_path / "lora" / "style.safetensors")
    base_bf16 = export_checkpoint(tmp_path / "base.ckpt", tmp_path / "bf16" / "model.safetensors", dtype="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model the run started from, in either precision: no warning
        load_model(base_export, adapters=adapters)
        load_model(base_bf16, adapters=adapters)
    merged = export_checkpoint(tuned_checkpoint, tmp_path / "merged" / "model.safetensors")  # adapters in already
    with pytest.warns(UserWarning, match="were trained on other weights than this model's"):
        load_model(merged, adapters=adapters)


def test_an_adapter_file_carries_what_the_run_trained_in_full_beside_the_adapters(tmp_path):
    """The LoRA recipe trains the text encoder and the denoiser in full: the file must bring them too."""
    from flowvid.adapters import export_adapters, read_adapters
    from flowvid.loading import load_model

    config = copy.deepcopy(ADAPTED_CONFIG)
    config["model"]["init_args"]["flow"]["init_args"]["text_width"] = 16
    config["model"]["init_args"]["text_encoder"] = {"class_path": "flowvid.text.LearnedTextEncoder",
                                                    "init_args": {"width": 16, "depth": 1, "head_dim": 8}}
    base, base_export, tuned = base_and_adapted(config, tmp_path)
    perturb_parameters(tuned.text_encoder, std=0.05, seed=2)  # trained in full
    adapters = export_adapters(save_run_checkpoint(tuned, config, tmp_path / "tuned.ckpt"),
                               tmp_path / "lora" / "style.safetensors")
    stored = read_adapters(adapters)
    assert {name for name in stored if not name.rpartition(".")[2].startswith("lora_")} == \
        {name for name, _ in tuned.text_encoder.named_parameters(prefix="text_encoder")}

    expected = merge_lora(tuned.state_dict())
    for strength, target in ((1.0, expected), (0.0, base.state_dict())):
        applied = load_model(base_export, adapters=adapters, adapter_strength=strength).state_dict()
        assert applied.keys() == target.keys()
        for name in target:
            torch.testing.assert_close(applied[name], target[name], rtol=1e-5, atol=1e-6, msg=name)
    half = load_model(base_export, adapters=adapters, adapter_strength=0.5).text_encoder.state_dict()
    for name, weight in half.items():
        torch.testing.assert_close(weight, (base.text_encoder.state_dict()[name] +
                                            tuned.text_encoder.state_dict()[name]) / 2, msg=name)
