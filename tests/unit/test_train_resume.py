"""Resuming and reloading training checkpoints: a run resumed with another accumulation size steps on
whole windows, and a LoRA run's checkpoint loads into the model it adapted."""

from types import SimpleNamespace

import lightning as L
import torch
from torch.utils.data import DataLoader

from flowvid.codecs.pixel import PixelCodec
from flowvid.flows import GlobalLocalFlow
from flowvid.lit import FlowModule
from flowvid.lit.checkpointing import RunCheckpoint
from flowvid.lit.finetune import LoRA
from flowvid.testing import perturb_parameters

VIDEO = (3, 4, 6)  # frames, height, width -> PixelCodec(2): latents (3, 2, 3, 12)


def tiny_flow() -> GlobalLocalFlow:
    torch.manual_seed(0)
    return GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(2, 3))


def make_module(**overrides) -> FlowModule:
    return FlowModule(tiny_flow(), PixelCodec(patch_size=2), video_shape=VIDEO,
                      **{"warmup_steps": 1, "schedule_steps": 100, **overrides})


def batches(count: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    videos = torch.randint(0, 256, (count, 2, *VIDEO, 3), generator=generator, dtype=torch.uint8)
    return DataLoader([{"video": video} for video in videos], batch_size=None)


def trainer(**overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**settings, **overrides})


class StepAfterEachBatch(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, *args):
        self.steps.append(trainer.global_step)


def test_a_run_resumed_with_more_batches_per_step_takes_whole_windows_from_its_first_batch(tmp_path):
    """Windows counted over the whole run made the first step after the resume (4 batches in, windows of 3)
    a step of 2 batches, each weighted 1/3."""
    first = trainer(max_steps=2, default_root_dir=tmp_path, enable_checkpointing=True,
                    callbacks=[RunCheckpoint(every_n_train_steps=1, keep_last_k=-1)])
    first.fit(make_module(accumulate_grad_batches=2), batches(12))
    steps, saved = StepAfterEachBatch(), RunCheckpoint(dirpath=tmp_path / "resumed", every_n_train_steps=1)
    resumed = trainer(max_steps=4, default_root_dir=tmp_path, enable_checkpointing=True, callbacks=[steps, saved])
    resumed.fit(make_module(accumulate_grad_batches=3), batches(12),
                ckpt_path=tmp_path / "checkpoints" / "step=00000002.ckpt")
    assert steps.steps == [2, 2, 3, 3, 3, 4]
    # Saved where each window ends, so that a resume of the resumed run starts at a window's start too.
    saved_names = sorted(path.name for path in (tmp_path / "resumed").iterdir())
    assert saved_names == ["step=00000003.ckpt", "step=00000004.ckpt"]


def test_a_lora_runs_checkpoint_loads_into_the_model_it_adapted_with_the_adapters_merged(tmp_path):
    """``load_from_checkpoint`` builds the model without the LoRA callback: it refused the adapters (the
    moving average's, then the weights') instead of giving the fine-tuned model that ``flowvid export`` gives."""
    module = make_module(ema_decay=0.5, lr=1e-2)
    perturb_parameters(module.flow, std=0.05, seed=1)  # a trained flow: a new one's zero output layers pass no gradient
    LoRA(rank=2).setup(SimpleNamespace(), module, "fit")
    run = trainer(max_steps=3)
    run.fit(module, batches(3))
    assert all(layer.abs().max() > 0 for name, layer in module.named_parameters() if name.endswith("lora_b"))
    run.save_checkpoint(tmp_path / "lora.ckpt")

    loaded = FlowModule.load_from_checkpoint(tmp_path / "lora.ckpt", flow=tiny_flow(), codec=PixelCodec(patch_size=2))
    assert not any("lora" in name for name in loaded.state_dict())  # the architecture of the model adapted
    x = torch.rand(2, *module.latent_shape, generator=torch.Generator().manual_seed(1))
    module.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.flow.nll(x), module.flow.nll(x), rtol=1e-5, atol=1e-6)
        with module.averaged_weights(), loaded.averaged_weights():
            averaged = module.flow.nll(x)
            torch.testing.assert_close(loaded.flow.nll(x), averaged, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(averaged, module.flow.nll(x))  # the average is not the trained weights
