"""Resuming and reloading training checkpoints: a run resumed with another accumulation size steps on
whole windows, a resumed run with skipped windows ends as the uninterrupted one, and a LoRA run's
checkpoint loads into the model it adapted."""

from types import SimpleNamespace

import lightning as L
import torch
from torch.utils.data import DataLoader

from flowvid.codecs.pixel import PixelCodec
from flowvid.flows import GlobalLocalFlow
from flowvid.lit import FlowModule
from flowvid.lit.checkpointing import RunCheckpoint
from flowvid.lit.finetune import LoRA
from flowvid.lit.step_seed import StepSeed
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


class NaNLatentsInBatches(FlowModule):
    """Non-finite latents in the batches of the given indices, counted over the whole run from 1."""

    poisoned: tuple[int, ...] = ()

    def latents_of(self, batch, key=""):
        latents = super().latents_of(batch, key)
        if self.trainer.fit_loop.epoch_loop.batch_progress.total.ready in self.poisoned:
            return latents * float("nan")
        return latents


def fit_accumulating(max_steps: int, run_dir, resume=None) -> FlowModule:
    """Windows of 2 batches, an EMA, seeded noise; the 2nd and 5th windows skipped (batches 3 and 9)."""
    module = make_module(accumulate_grad_batches=2, ema_decay=0.5, warmup_steps=2, schedule_steps=5, lr=1e-2)
    module.__class__ = NaNLatentsInBatches
    module.poisoned = (3, 9)
    perturb_parameters(module.flow, std=0.05, seed=1)  # zero output layers would pass no gradient to the rest
    run = trainer(max_steps=max_steps, default_root_dir=run_dir, enable_checkpointing=True,
                  callbacks=[StepSeed(0), RunCheckpoint(every_n_train_steps=2, keep_last_k=-1)])
    same_batch = next(iter(batches(1)))  # the data position is the data module's to restore, not this test's
    run.fit(module, DataLoader([same_batch] * 16, batch_size=None), ckpt_path=resume)
    return module


def test_a_resumed_accumulating_run_with_skipped_windows_ends_as_the_uninterrupted_one(tmp_path):
    whole = fit_accumulating(4, tmp_path / "whole")
    fit_accumulating(2, tmp_path / "stopped")
    step2 = tmp_path / "stopped" / "checkpoints" / "step=00000002.ckpt"
    resumed = fit_accumulating(4, tmp_path / "stopped", resume=step2)
    assert whole.skipped_steps == resumed.skipped_steps == 2
    assert [g["lr"] for g in resumed.optimizers().param_groups] == [g["lr"] for g in whole.optimizers().param_groups]
    for name, weight in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], weight), name
    whole_ema, resumed_ema = whole.ema.state_dict(), resumed.ema.state_dict()
    assert whole_ema.keys() == resumed_ema.keys() and whole_ema
    for name, average in whole_ema.items():
        assert torch.equal(resumed_ema[name], average), name
