"""Training callbacks of the scale area: activation checkpointing, step seeding, fine-tuning."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule
from safetensors.torch import save_file

from flowvid.codecs import PixelCodec
from flowvid.codecs.base import CodecMismatchError
from flowvid.denoise import CausalDenoiser
from flowvid.flows.global_local import GlobalLocalFlow
from flowvid.lit.activation_checkpointing import ActivationCheckpointing, checkpoint_flow_layers
from flowvid.lit.checkpointing import CorruptCheckpointError
from flowvid.lit.finetune import Freeze, InitFromExport
from flowvid.lit.step_seed import StepSeed, mixed_seed


def tiny_flow(seed: int = 0) -> GlobalLocalFlow:
    torch.manual_seed(seed)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=3, frame_size=(4, 4))
    with torch.no_grad():  # leave the identity initialisation so that gradients reach every layer
        for parameter in flow.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return flow


class Parts(LightningModule):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.flow = tiny_flow(seed)
        self.denoiser = CausalDenoiser(3, (4, 4), width=16, depth=1, head_dim=16)


# --- activation checkpointing --------------------------------------------------------------------


def test_checkpointed_deep_layers_recompute_in_backward_and_give_identical_gradients():
    x = torch.randn(2, 2, 4, 4, 3, generator=torch.Generator().manual_seed(0))
    plain, checkpointed = tiny_flow(), tiny_flow()
    assert checkpoint_flow_layers(checkpointed, "deep") == len(checkpointed.deep.layers)
    calls = {"deep": 0, "shallow": 0}
    # The first module of a layer: the recomputation stops early, once the last saved tensor is back.
    checkpointed.deep.layers[0].norm_attn.register_forward_hook(
        lambda *_: calls.__setitem__("deep", calls["deep"] + 1))
    checkpointed.shallow[0].layers[0].norm_attn.register_forward_hook(
        lambda *_: calls.__setitem__("shallow", calls["shallow"] + 1))

    for flow in (plain, checkpointed):
        flow.nll(x).mean().backward()
    assert calls == {"deep": 2, "shallow": 1}  # the deep layer ran again in the backward pass
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
    with torch.no_grad():
        checkpointed.nll(x)
    assert calls["deep"] == 3  # no recomputation without gradients


def test_activation_checkpointing_needs_a_flow_and_a_known_block_choice():
    with pytest.raises(ValueError, match="found no GlobalLocalFlow"):
        ActivationCheckpointing().setup(None, LightningModule(), "fit")
    with pytest.raises(ValueError, match="blocks must be one of"):
        checkpoint_flow_layers(tiny_flow(), "middle")


# --- step seeding --------------------------------------------------------------------------------


def fake_trainer(batch_index: int, rank: int) -> SimpleNamespace:
    progress = SimpleNamespace(total=SimpleNamespace(ready=batch_index))
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    return SimpleNamespace(global_rank=rank, fit_loop=loop)


def draws_at(batch_index: int, rank: int = 0, seed: int = 7) -> torch.Tensor:
    torch.rand(5)  # whatever was drawn before must not matter
    StepSeed(seed).on_train_batch_start(fake_trainer(batch_index, rank), None, None, 0)
    return torch.rand(3)


def test_step_seed_makes_the_random_numbers_a_function_of_seed_batch_and_rank():
    assert torch.equal(draws_at(4), draws_at(4))
    assert not torch.equal(draws_at(4), draws_at(5))
    assert not torch.equal(draws_at(4, rank=0), draws_at(4, rank=1))
    assert not torch.equal(draws_at(4, seed=7), draws_at(4, seed=8))
    assert mixed_seed(1, 2) != mixed_seed(2, 1) and 0 <= mixed_seed(1, 2) < 2**63


# --- fine-tuning ---------------------------------------------------------------------------------


def test_init_from_export_loads_weights_only_when_not_resuming(tmp_path):
    source = Parts(seed=1)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    fresh = Parts(seed=2)
    resuming = InitFromExport(str(tmp_path / "moved-away.safetensors"))
    resuming.resuming = True  # what FlowvidCLI sets when the run resumes from a checkpoint
    resuming.setup(SimpleNamespace(ckpt_path=None), fresh, "fit")
    assert not torch.equal(fresh.flow.deep.proj_in.weight, source.flow.deep.proj_in.weight)  # resuming: untouched
    InitFromExport(str(path)).setup(SimpleNamespace(ckpt_path=None), fresh, "fit")
    for (name, a), (_, b) in zip(source.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_init_from_a_flow_only_file_needs_strict_false_and_refuses_foreign_weights(tmp_path):
    flow_only = tmp_path / "flow.safetensors"
    save_file({f"flow.{k}": v.contiguous() for k, v in tiny_flow(1).state_dict().items()}, str(flow_only))
    with pytest.raises(ValueError, match="missing: denoiser"):
        InitFromExport(str(flow_only)).setup(SimpleNamespace(ckpt_path=None), Parts(), "fit")
    model = Parts()
    InitFromExport(str(flow_only), strict=False).setup(SimpleNamespace(ckpt_path=None), model, "fit")
    assert torch.equal(model.flow.deep.sos, tiny_flow(1).deep.sos)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"vae.encoder.weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="does not have: vae.encoder.weight"):
        InitFromExport(str(foreign), strict=False).setup(SimpleNamespace(ckpt_path=None), Parts(), "fit")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        InitFromExport(str(tmp_path / "missing.safetensors")).setup(SimpleNamespace(ckpt_path=None), Parts(), "fit")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(flow_only.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match=f"cannot read exported model {truncated}"):
        InitFromExport(str(truncated)).setup(SimpleNamespace(ckpt_path=None), Parts(), "fit")


def test_init_from_export_takes_an_export_folder_and_refuses_other_latents_and_checkpoints(tmp_path):
    source = Parts(seed=1)
    folder = tmp_path / "exported"
    folder.mkdir()
    codec = json.dumps(PixelCodec(patch_size=1).identity())
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "flowvid", "codec": codec})
    (folder / "config.yaml").write_text("model: {}\n")

    model = Parts(seed=2)
    model.codec = PixelCodec(patch_size=1)
    InitFromExport(str(folder)).setup(SimpleNamespace(ckpt_path=None), model, "fit")
    assert torch.equal(model.flow.deep.sos, source.flow.deep.sos)

    model.codec = PixelCodec(patch_size=2)  # latents of another codec: the weights would mean nothing
    with pytest.raises(CodecMismatchError, match="patch_size"):
        InitFromExport(str(folder)).setup(SimpleNamespace(ckpt_path=None), model, "fit")
    checkpoint = tmp_path / "step=00000010.ckpt"
    checkpoint.write_bytes(b"not an export")
    with pytest.raises(ValueError, match="not an export .* flowvid export --ckpt"):
        InitFromExport(str(checkpoint)).setup(SimpleNamespace(ckpt_path=None), Parts(), "fit")
    with pytest.raises(ValueError, match="folder without an export"):
        InitFromExport(str(tmp_path)).setup(SimpleNamespace(ckpt_path=None), Parts(), "fit")


def test_freeze_stops_exactly_the_named_parts_from_training():
    model = Parts()
    Freeze(["flow.deep"]).setup(None, model, "fit")
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (not name.startswith("flow.deep.")), name

    model = Parts()
    Freeze("denoiser_only").setup(None, model, "fit")  # no text encoder here: the preset skips it
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"denoiser"}

    with pytest.raises(ValueError, match="no sub-module flow.middle"):
        Freeze(["flow.middle"]).setup(None, Parts(), "fit")
    with pytest.raises(ValueError, match="leaves nothing to train"):
        Freeze(["flow", "denoiser"]).setup(None, Parts(), "fit")
    with pytest.raises(ValueError, match="unknown Freeze preset"):
        Freeze("everything")
