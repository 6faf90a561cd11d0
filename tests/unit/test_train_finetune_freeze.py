"""Freeze in training: the optimiser holds only the parameter groups left with something to train (also
under DeepSpeed, which drops empty groups), and the moving average holds only the weights that train."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from flowvid.codecs.pixel import PixelCodec
from flowvid.denoise import CausalDenoiser
from flowvid.export import checkpoint_weights
from flowvid.flows import GlobalLocalFlow
from flowvid.lit import FlowModule
from flowvid.lit.checkpointing import METADATA_KEY
from flowvid.lit.finetune import Freeze
from flowvid.text import LearnedTextEncoder

HERE = Path(__file__).resolve().parent
VIDEO = (3, 4, 6)  # frames, height, width -> PixelCodec(2): latents (3, 2, 3, 12)


def tiny_module(**overrides) -> FlowModule:
    """A text-conditioned flow with a denoiser and a moving average of the weights."""
    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(2, 3), text_width=16)
    return FlowModule(
        flow,
        PixelCodec(patch_size=2),
        LearnedTextEncoder(width=16, max_length=12, depth=1, head_dim=8),
        CausalDenoiser(12, (2, 3), width=16, depth=1, head_dim=8, text_width=16),
        video_shape=VIDEO,
        **{"ema_decay": 0.5, "warmup_steps": 1, "schedule_steps": 10, **overrides},
    )


def batches(count: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (2, *VIDEO, 3), generator=generator, dtype=torch.uint8)
    batch = {"video": video, "caption": ["a red circle moves left", "a blue square moves up"], "key": ["0", "1"]}
    return DataLoader([batch] * count, batch_size=None)


def trainable(module: FlowModule) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def weights(module: FlowModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def move_trainable_weights(module: FlowModule, seed: int) -> None:
    """What an optimiser step does to the weights that train."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


# --- the optimiser --------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen, groups", [("denoiser_only", ["denoiser"]), (["denoiser"], ["flow"])])
def test_the_optimiser_and_its_schedule_leave_out_the_groups_that_freezing_empties(frozen, groups):
    module = tiny_module()
    Freeze(frozen).setup(None, module, "fit")
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert [group["name"] for group in optimizer.param_groups] == groups
    assert len(scheduler.lr_lambdas) == len(optimizer.param_groups)  # one rate function per group
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == \
        {id(p) for p in module.parameters() if p.requires_grad}


def test_a_frozen_flow_trains_its_denoiser_with_a_skip_threshold_on_the_flows_norm():
    module = tiny_module(skip_threshold=1e3)  # the threshold holds the flow's norm, and a frozen flow has none
    before = weights(module)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Freeze("denoiser_only")])
    trainer.fit(module, batches(2))
    assert trainer.global_step == 2 and module.skipped_steps == 0
    changed = {name for name, p in module.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if name.startswith("denoiser.")}


@pytest.mark.slow
def test_zero2_trains_the_denoiser_of_a_frozen_flow():
    """DeepSpeed drops parameter groups without parameters; a schedule with a rate function for each
    group of the model stopped the first step ("zip() argument 2 is longer than argument 1")."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs DeepSpeed: pip install 'flowvid[deepspeed]'")
    child = """
import json, torch, lightning as L
from flowvid.lit.finetune import Freeze
from flowvid.lit.strategies import ZeroStrategy, finish_distributed
from test_train_finetune_freeze import batches, tiny_module, weights
module = tiny_module()
before = weights(module)
zero2 = ZeroStrategy(stage=2, logging_batch_size_per_gpu=2)  # DeepSpeed cannot read it off unbatched loaders
trainer = L.Trainer(accelerator="cpu", devices=1, strategy=zero2, precision="32-true", max_steps=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[Freeze("denoiser_only")])
trainer.fit(module, batches(2))
print(json.dumps(sorted(name for name, p in module.named_parameters() if not torch.equal(p.cpu(), before[name]))))
finish_distributed()
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    changed = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(changed) == {name for name, _ in tiny_module().denoiser.named_parameters(prefix="denoiser")}


# --- the moving average ---------------------------------------------------------------------------


def test_after_freeze_the_moving_average_holds_exactly_the_weights_that_train():
    module = tiny_module()
    Freeze("denoiser_only").setup(None, module, "fit")
    assert set(module.ema.parameters) == trainable(module) == {
        name for name, _ in module.denoiser.named_parameters(prefix="denoiser")}
    module.ema.update()
    assert set(module.ema.shadow) == set(module.ema.state_dict()) == trainable(module)


def averaged_module_and_expected_weights() -> tuple[FlowModule, dict[str, torch.Tensor]]:
    """A module whose flow is frozen and whose other weights moved after the average started, and the
    weights of its averaged model: the frozen ones as trained, the others half-way (decay 0.5)."""
    module = tiny_module()
    Freeze(["flow"]).setup(None, module, "fit")
    move_trainable_weights(module, seed=1)
    start = weights(module)
    module.ema.update()
    move_trainable_weights(module, seed=2)
    module.ema.update()
    now = weights(module)
    expected = {name: (start[name] + now[name]) / 2 if name in trainable(module) else now[name] for name in now}
    return module, expected


def test_the_averaged_model_for_sampling_and_export_is_the_frozen_weights_and_the_averaged_rest(tmp_path):
    module, expected = averaged_module_and_expected_weights()
    trained = weights(module)
    with module.averaged_weights():
        for name, weight in weights(module).items():
            torch.testing.assert_close(weight, expected[name], msg=name)
    assert all(torch.equal(weight, trained[name]) for name, weight in weights(module).items())

    checkpoint = {"state_dict": module.state_dict(), METADATA_KEY: {"config": {"model": {}}}}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "run.ckpt")
    exported, _, _ = checkpoint_weights(tmp_path / "run.ckpt", weights="ema")
    for name, weight in expected.items():
        torch.testing.assert_close(exported[name], weight, msg=name)


def test_averages_of_frozen_weights_in_checkpoints_of_earlier_runs_are_passed_over():
    """Earlier versions averaged frozen weights too: their checkpoints resume into a frozen model."""
    module, expected = averaged_module_and_expected_weights()
    earlier = {name: weight.clone() for name, weight in expected.items()}  # an average of everything
    resumed = tiny_module()
    Freeze(["flow"]).setup(None, resumed, "fit")
    resumed.load_state_dict(module.state_dict())
    resumed.ema.load_state_dict(earlier)
    assert set(resumed.ema.shadow) == trainable(resumed)
    with resumed.averaged_weights():
        for name, weight in weights(resumed).items():
            torch.testing.assert_close(weight, expected[name], msg=name)


def test_the_average_of_a_frozen_run_loads_into_a_model_that_trains_everything():
    """``FlowModule.load_from_checkpoint`` builds the model without the run's Freeze; resuming without it
    trains the flow again, whose average starts from its weights at the next update."""
    module, expected = averaged_module_and_expected_weights()
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    unfrozen = tiny_module()
    unfrozen.on_load_checkpoint(checkpoint)
    unfrozen.load_state_dict(module.state_dict())
    with unfrozen.averaged_weights():
        for name, weight in weights(unfrozen).items():
            torch.testing.assert_close(weight, expected[name], msg=name)
    unfrozen.ema.update()
    assert set(unfrozen.ema.shadow) == trainable(unfrozen) == set(weights(unfrozen))
