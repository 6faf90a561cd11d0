"""Tiny end-to-end training runs: shards to samples, overfitting, golden losses, skipped steps."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from flowvid.codecs.pixel import PixelCodec
from flowvid.data import VideoShardDataModule, write_synthetic_dataset
from flowvid.denoise import CausalDenoiser
from flowvid.denoise.score import flow_score_target
from flowvid.flows import GlobalLocalFlow
from flowvid.lit import FlowModule
from flowvid.lit.activation_checkpointing import ActivationCheckpointing
from flowvid.testing import perturb_parameters
from flowvid.text import LearnedTextEncoder

VIDEO = (4, 8, 8)  # frames, height, width -> PixelCodec(2): latents (4, 4, 4, 12)
CAPTIONS = ["a red circle moves left", "a blue square moves up"]


def tiny_module(video_shape=VIDEO, **overrides) -> FlowModule:
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(4, 4), text_width=16)
    return FlowModule(
        flow,
        PixelCodec(patch_size=2),
        LearnedTextEncoder(width=16, max_length=12, depth=1, head_dim=8),
        CausalDenoiser(12, (4, 4), width=16, depth=1, head_dim=8, text_width=16),
        video_shape=video_shape,
        **{"warmup_steps": 1, "schedule_steps": 100, **overrides},
    )


def trainer(**overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**settings, **overrides})


def fixed_batches(steps: int) -> DataLoader:
    """The same two videos (smooth gradients, so there is something to learn) in every batch."""
    ramp = torch.linspace(0, 255, VIDEO[2]).round().to(torch.uint8)
    video = ramp.view(1, 1, 1, -1, 1).expand(2, VIDEO[0], VIDEO[1], VIDEO[2], 3).clone()
    video[1] = video[1].flip(2)
    batch = {"video": video, "caption": CAPTIONS, "key": ["0", "1"]}
    return DataLoader([batch] * steps, batch_size=None)


class RecordLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(trainer.callback_metrics["train/loss"].item())


@pytest.fixture(scope="module")
def overfit_run():
    """50 steps on one fixed batch, seeded."""
    L.seed_everything(0)
    module = tiny_module(lr=3e-3, denoiser_lr=3e-3, text_dropout=0.0)
    record = RecordLosses()
    trainer(max_steps=50, callbacks=[record]).fit(module, fixed_batches(50))
    return module, record.losses


def test_loss_goes_down_on_a_fixed_batch(overfit_run):
    _, losses = overfit_run
    assert len(losses) == 50 and all(math.isfinite(v) for v in losses)
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < start - 0.3, (start, end)


def test_golden_losses_of_the_first_steps(overfit_run):
    # Regenerate after an intended change of the model, the loss or the step: run
    #   pytest tests/integration/test_train_loop.py -k golden -s
    # with the print below uncommented and paste the first five losses.
    _, losses = overfit_run
    # print(losses[:5])
    golden = [0.25652224, 0.21343815, 0.14820527, 0.10501570, 0.02866188]
    assert losses[:5] == pytest.approx(golden, abs=2e-4)


def test_the_denoiser_learns_the_flows_score_alongside(overfit_run):
    """On a noisy batch of the training videos, the denoiser predicts the trained flow's own score
    clearly better than the zero initialisation does (a denoiser trained towards anything else does not)."""
    module, _ = overfit_run
    torch.manual_seed(5)
    x, text = module.training_inputs(next(iter(fixed_batches(1))))
    x = x.detach().requires_grad_(True)
    module.likelihood_terms(x, text)["loss"].backward()
    target = flow_score_target(x.grad, module.noise_std)
    with torch.no_grad():
        prediction = module.denoiser_prediction(x.detach(), text)
    assert F.mse_loss(prediction, target) < 0.9 * target.square().mean()  # 0.79 against 1.03


def test_validation_logs_the_denoiser_bringing_noisy_latents_closer_to_the_clean_ones(overfit_run):
    """val/denoiser_mse is the denoised latents' error, not a value merely logged: after training it is
    clearly below the error of the noisy latents themselves (a step the wrong way lands farther off)."""
    module, _ = overfit_run
    (metrics,) = trainer(limit_val_batches=1).validate(module, fixed_batches(1), verbose=False)
    assert metrics["val/denoiser_mse"] < 0.9 * metrics["val/noisy_mse"]  # 0.070 against 0.093


def test_bf16_mixed_training_on_the_cpu_follows_fp32_with_a_bf16_network_and_fp32_weights(overfit_run):
    L.seed_everything(0)
    module = tiny_module(lr=3e-3, denoiser_lr=3e-3, text_dropout=0.0)
    record = RecordLosses()
    dtypes = set()
    module.flow.deep.layers[0].register_forward_hook(lambda layer, args, out: dtypes.add(out.dtype))
    trainer(max_steps=5, precision="bf16-mixed", callbacks=[record]).fit(module, fixed_batches(5))
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in module.parameters())
    _, fp32_losses = overfit_run
    assert record.losses != fp32_losses[:5]
    assert record.losses == pytest.approx(fp32_losses[:5], abs=0.02)


def test_a_nan_step_is_skipped_counted_and_training_goes_on():
    L.seed_everything(0)
    module = tiny_module()
    calls = {"n": 0}

    def poison_second_forward(block, inputs, output):
        calls["n"] += 1
        if calls["n"] == 2:
            return output[0] * float("nan"), output[1]
        return output

    module.flow.deep.register_forward_hook(poison_second_forward)
    record = RecordLosses()
    run = trainer(max_steps=3, callbacks=[record])
    run.fit(module, fixed_batches(5))
    # The skipped batch logs no loss of its own: not the batch before it's, as Lightning would show.
    assert math.isnan(record.losses[1]) and all(math.isfinite(loss) for loss in record.losses[::2])
    assert module.skipped_steps == 1
    assert run.global_step == 3  # three real updates, from four batches
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert run.callback_metrics["train/skipped_steps"].item() == 1.0


def zero_run_with_a_skipped_window(stage: int) -> None:
    """Two steps of two batches under ZeRO, the first batch of the second window poisoned; prints what
    the module and the engine counted (run in a process of its own: DeepSpeed keeps its process group)."""
    from flowvid.lit.strategies import ZeroStrategy

    L.seed_everything(0)
    module = tiny_module(accumulate_grad_batches=2, grad_clip=5.0, text_dropout=0.0)
    calls = {"n": 0}

    def poison_third_forward(block, inputs, output):
        calls["n"] += 1
        return (output[0] * float("nan"), output[1]) if calls["n"] == 3 else output

    module.flow.deep.register_forward_hook(poison_third_forward)
    run = trainer(max_steps=2, strategy=ZeroStrategy(stage=stage, logging_batch_size_per_gpu=2))
    run.fit(module, fixed_batches(6))
    engine = run.strategy.deepspeed_engine
    print(json.dumps({"skipped": module.skipped_steps, "steps": run.global_step, "engine_skipped": engine.skipped_steps,
                      "norm": float(engine.get_global_grad_norm()), "clipping": engine.gradient_clipping()}))


@pytest.mark.parametrize("stage", [2, 3])
def test_under_zero_a_skipped_window_leaves_no_gradient_behind_and_grad_clip_reaches_the_engine(stage):
    """DeepSpeed's engine holds the gradients of a window's backward passes; left there, a skipped window's
    NaN gradients made the engine throw away the next window's step too (while it was counted as taken)."""
    pytest.importorskip("deepspeed")
    script = f"import test_train_loop as t; t.zero_run_with_a_skipped_window({stage})"
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    counted = json.loads(done.stdout.strip().splitlines()[-1])
    assert counted["skipped"] == 1 and counted["steps"] == 2
    assert counted["engine_skipped"] == 0 and math.isfinite(counted["norm"])  # the engine stepped twice
    assert counted["clipping"] == 5.0


def test_a_step_whose_text_states_are_nan_is_skipped_counted_and_training_goes_on():
    L.seed_everything(0)
    module = tiny_module()
    encode_text, calls = module.encode_text, {"n": 0}

    def nan_on_the_second_call(captions):
        calls["n"] += 1
        text = encode_text(captions)
        return text._replace(tokens=text.tokens * float("nan")) if calls["n"] == 2 else text

    module.encode_text = nan_on_the_second_call
    run = trainer(max_steps=3)
    run.fit(module, fixed_batches(5))
    assert module.skipped_steps == 1 and run.global_step == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_synthetic_dataset(root, num_videos=16, frames=VIDEO[0], size=VIDEO[1], val_videos=4, shard_samples=8)
    return root


def shard_data(root, **overrides) -> VideoShardDataModule:
    return VideoShardDataModule(str(root / "train"), **{"val_dir": str(root / "val"), "batch_size": 4,
                                                       "batches_per_epoch": 2, "val_batches": 1, **overrides})


def test_fast_dev_run_from_shards_to_videos(shapes_shards):
    L.seed_everything(0)
    module = tiny_module()
    run = trainer(fast_dev_run=True, limit_val_batches=None)
    run.fit(module, datamodule=shard_data(shapes_shards))
    metrics = run.callback_metrics
    for name in ("train/loss", "train/bits_per_dim", "val/bits_per_dim", "val/denoiser_mse", "val/tweedie_mse"):
        assert math.isfinite(metrics[name].item()), name

    videos = module.generate_videos(CAPTIONS, seed=3)
    assert videos.dtype == torch.uint8 and tuple(videos.shape) == (2, *VIDEO, 3)
    assert torch.equal(module.generate_videos(CAPTIONS, seed=3), videos)
    assert not torch.equal(module.generate_videos(CAPTIONS, seed=4), videos)


def test_each_validation_folder_logs_what_it_would_alone(shapes_shards):
    L.seed_everything(0)
    module = tiny_module()
    folders = [str(shapes_shards / "val"), str(shapes_shards / "train")]
    both = trainer(limit_val_batches=None).validate(module, datamodule=shard_data(shapes_shards, val_dir=folders),
                                                   verbose=False)
    assert shard_data(shapes_shards, val_dir=folders).val_names == ["", "train"]
    assert set(both[0]) >= {"val/bits_per_dim", "val/denoiser_mse"} and not any("train/" in k for k in both[0])
    assert set(both[1]) >= {"val/train/bits_per_dim", "val/train/denoiser_mse"}
    assert both[0]["val/bits_per_dim"] != both[1]["val/train/bits_per_dim"]
    # Each latent frame's bits/dim given the frames before it; the video's is their mean.
    frames = [both[1][f"val/train/bits_per_dim/frame_{t:02d}"] for t in range(VIDEO[0])]
    assert len(set(frames)) == VIDEO[0]
    assert sum(frames) / len(frames) == pytest.approx(both[1]["val/train/bits_per_dim"])
    alone = trainer(limit_val_batches=None).validate(module, datamodule=shard_data(shapes_shards, val_dir=folders[1]),
                                                    verbose=False)
    assert alone[0]["val/bits_per_dim"] == pytest.approx(both[1]["val/train/bits_per_dim"], rel=1e-6)


def test_shards_of_another_clip_shape_fail_before_the_first_step(shapes_shards):
    module = tiny_module(video_shape=(2, 8, 8))  # the same flow fits, the data does not
    run = trainer(max_steps=1)
    with pytest.raises(ValueError, match=r"clips of \(frames, height, width\) \(4, 8, 8\)"):
        run.fit(module, datamodule=shard_data(shapes_shards))
    assert run.global_step == 0


class RecordRates(L.Callback):
    def __init__(self):
        self.logged, self.used = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.used.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(trainer.callback_metrics["train/flow_lr"].item())


def test_the_logged_learning_rate_is_the_one_the_step_used():
    record = RecordRates()
    trainer(max_steps=3, callbacks=[record]).fit(tiny_module(lr=1e-3, warmup_steps=4), fixed_batches(3))
    assert record.used == pytest.approx([2.5e-4, 5e-4, 7.5e-4])  # warm-up: peak * (step + 1) / 4
    assert record.logged == pytest.approx(record.used)


def test_bf16_mixed_on_a_cpu_without_native_bf16_warns_before_the_first_step(monkeypatch):
    import flowvid.placement as placement

    monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="runs emulated"):
        trainer(max_steps=1, precision="bf16-mixed").fit(tiny_module(), fixed_batches(1))


# --- gradient accumulation ---------------------------------------------------------------------------


class FixedNoise(FlowModule):
    """Noise that belongs to each video, not to its batch: how videos are batched then changes nothing."""

    def training_inputs(self, batch):
        return self.latents_of(batch) + self.noise_std * batch["noise"], self.encode_text(batch["caption"])


def four_videos() -> dict:
    generator = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (4, *VIDEO, 3), generator=generator, dtype=torch.uint8)
    noise = torch.randn(4, VIDEO[0], 4, 4, 12, generator=generator)
    return {"video": video, "noise": noise, "caption": CAPTIONS * 2}


def halves(batch: dict) -> list[dict]:
    return [{key: value[part] for key, value in batch.items()} for part in (slice(0, 2), slice(2, 4))]


class RecordGradientNorms(L.Callback):
    """The flow's gradient norm of every optimiser step."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.norms):
            self.norms.append(trainer.callback_metrics["train/flow_grad_norm"].item())


def trained_weights(accumulate: int, batches: list[dict], steps: int) -> tuple[dict[str, torch.Tensor], dict, list]:
    """Weights, EMA and the flow's gradient norm at each step (AdamW's first steps barely depend on the
    gradients' scale; the norms do)."""
    torch.manual_seed(0)
    module = tiny_module(accumulate_grad_batches=accumulate, ema_decay=0.9, text_dropout=0.0)
    module.__class__ = FixedNoise
    norms = RecordGradientNorms()
    trainer(max_steps=steps, callbacks=[norms]).fit(module, DataLoader(batches, batch_size=None))
    return {k: v.clone() for k, v in module.state_dict().items()}, module.ema.state_dict(), norms.norms


def test_accumulating_two_half_batches_takes_the_step_of_the_whole_batch():
    whole = four_videos()
    at_once, at_once_ema, norms = trained_weights(1, [whole] * 3, steps=3)
    accumulated, accumulated_ema, accumulated_norms = trained_weights(2, halves(whole) * 3, steps=3)
    assert len(norms) == len(accumulated_norms) == 3  # max_steps counts optimiser steps, not batches
    assert accumulated_norms == pytest.approx(norms, rel=1e-5)  # the mean gradient, not the sum
    for name, weight in at_once.items():
        torch.testing.assert_close(accumulated[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    for name, weight in at_once_ema.items():
        torch.testing.assert_close(accumulated_ema[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    single_half, _, _ = trained_weights(1, halves(whole)[:1] * 3, steps=3)
    assert not torch.allclose(single_half["flow.deep.proj_out.weight"], at_once["flow.deep.proj_out.weight"], atol=1e-6)


def test_a_bad_batch_skips_its_whole_window_and_the_next_window_steps():
    module = tiny_module(accumulate_grad_batches=2)
    module.__class__ = FixedNoise
    poisoned = halves(four_videos())
    poisoned[0] = {**poisoned[0], "noise": poisoned[0]["noise"] * float("nan")}
    batches = [poisoned[1], poisoned[0], *halves(four_videos())]  # the first window holds the bad batch
    before = {k: v.clone() for k, v in module.state_dict().items()}
    run = trainer(max_steps=1)
    run.fit(module, DataLoader(batches, batch_size=None))
    assert module.skipped_steps == 1 and run.global_step == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(module.state_dict()[k], v) for k, v in before.items())


def test_the_schedule_of_an_accumulating_run_spans_its_optimiser_steps():
    module = tiny_module(accumulate_grad_batches=2, warmup_steps=1, schedule_steps=None, lr=1e-3, min_lr=1e-5)
    run = trainer(max_epochs=1)
    run.fit(module, fixed_batches(6))  # 6 batches: 3 optimiser steps, so the cosine ends after the third
    assert run.global_step == 3
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(1e-5)
    # The epoch ends before max_steps optimiser steps: the cosine still ends with the run.
    module = tiny_module(accumulate_grad_batches=4, warmup_steps=1, schedule_steps=None, lr=1e-3, min_lr=1e-5)
    run = trainer(max_epochs=1, max_steps=10)
    run.fit(module, fixed_batches(12))
    assert run.global_step == 3
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(1e-5)


def test_batches_left_over_after_the_last_whole_window_take_no_step_and_the_schedule_counts_none():
    """5 batches in windows of 2 make 2 steps, not 3: the cosine must reach its floor at the second."""
    module = tiny_module(accumulate_grad_batches=2, warmup_steps=1, schedule_steps=None, lr=1e-3, min_lr=1e-5)
    run = trainer(max_epochs=1)
    run.fit(module, fixed_batches(5))
    assert run.global_step == module.schedule_length == 2
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(1e-5)
    # Windows run on across epochs: 3 epochs of 3 batches are 4 windows of 2, and a batch left over.
    module = tiny_module(accumulate_grad_batches=2, warmup_steps=1, schedule_steps=None, lr=1e-3, min_lr=1e-5)
    run = trainer(max_epochs=3)
    run.fit(module, fixed_batches(3))
    assert run.global_step == module.schedule_length == 4
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(1e-5)


@pytest.mark.parametrize("schedule_steps", [None, 100])
def test_a_run_of_fewer_batches_than_one_accumulation_window_is_refused_before_training(schedule_steps):
    module = tiny_module(accumulate_grad_batches=4, schedule_steps=schedule_steps)
    before = {name: value.clone() for name, value in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"^the run has 3 training batches, fewer than one accumulation window of "
                                         r"accumulate_grad_batches=4, so it would take no optimiser step: lower "
                                         r"accumulate_grad_batches to 3 or less, or give it 4 batches \(more data "
                                         r"or epochs\)$"):
        trainer(max_epochs=1).fit(module, fixed_batches(3))
    assert all(torch.equal(module.state_dict()[name], value) for name, value in before.items())
    # A window runs on across epochs: two epochs of three batches take a step.
    module = tiny_module(accumulate_grad_batches=4, schedule_steps=schedule_steps)
    run = trainer(max_epochs=2)
    run.fit(module, fixed_batches(3))
    assert run.global_step == 1


def test_a_fast_dev_run_shorter_than_one_accumulation_window_says_how_many_batches_it_needs():
    with pytest.raises(ValueError, match=r"give it 2 batches \(--trainer.fast_dev_run 2\)$"):
        trainer(fast_dev_run=True).fit(tiny_module(accumulate_grad_batches=2), fixed_batches(3))


def test_a_warm_up_that_fills_a_fixed_schedule_is_refused_before_training():
    module = tiny_module(warmup_steps=100, schedule_steps=100)
    with pytest.raises(ValueError, match=r"^warmup_steps=100 is not shorter than schedule_steps=100: the learning rate "
                                         r"would climb to its peak and then drop straight to min_lr; lower warmup_steps "
                                         r"below 100 or raise schedule_steps above 100$"):
        trainer(max_steps=2).fit(module, fixed_batches(2))
    assert module.global_step == 0


def test_a_run_shorter_than_its_warm_up_is_warned_of_and_trains():
    """A recipe's run cut short (``--trainer.max_steps 3``) only never leaves its warm-up: a trial run."""
    module = tiny_module(warmup_steps=5, schedule_steps=None, lr=1e-3)
    run = trainer(max_steps=3)
    with pytest.warns(UserWarning, match=r"the run takes 3 optimiser steps, no more than warmup_steps=5: the learning "
                                         r"rate stays in its warm-up and never decays \(fine for a trial run\); for a "
                                         r"real run make it longer than 5 steps or lower warmup_steps below 3"):
        run.fit(module, fixed_batches(3))
    assert run.global_step == 3
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(1e-3 * 4 / 5)  # the rate of a 4th step
    with warnings.catch_warnings(record=True) as caught:  # a fast_dev_run is a trial run by definition
        warnings.simplefilter("always")
        trainer(fast_dev_run=True).fit(tiny_module(warmup_steps=5, schedule_steps=None), fixed_batches(3))
    assert not any("no more than warmup_steps" in str(warning.message) for warning in caught)


class RecordStepWeights(L.Callback):
    """The module's weights after every optimiser step."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.weights):
            self.weights.append({name: p.detach().clone() for name, p in pl_module.named_parameters()})


def test_the_ema_averages_the_weights_of_the_steps_taken_and_passes_over_skipped_windows():
    module = tiny_module(accumulate_grad_batches=2, ema_decay=0.5)
    module.__class__ = FixedNoise
    poisoned = halves(four_videos())
    poisoned[0] = {**poisoned[0], "noise": poisoned[0]["noise"] * float("nan")}
    good = halves(four_videos())
    steps = RecordStepWeights()
    run = trainer(max_steps=3, callbacks=[steps])
    run.fit(module, DataLoader([*good, *poisoned, *good, *good], batch_size=None))  # the second window is skipped
    assert module.skipped_steps == 1 and len(steps.weights) == 3
    expected = dict(steps.weights[0])  # the average starts at the weights of the first step
    for weights in steps.weights[1:]:
        expected = {name: 0.5 * average + 0.5 * weights[name] for name, average in expected.items()}
    for name, average in module.ema.state_dict().items():
        torch.testing.assert_close(average, expected[name], rtol=0, atol=1e-7, msg=name)


def validate_and_sample(module: FlowModule, **trainer_settings) -> tuple[dict, torch.Tensor]:
    metrics = trainer(limit_val_batches=None, **trainer_settings).validate(module, fixed_batches(1), verbose=False)[0]
    return metrics, module.generate_videos(CAPTIONS, seed=0)


def test_validation_and_sampling_use_the_ema_and_give_the_trained_weights_back_bit_for_bit():
    module = tiny_module(ema_decay=0.5, lr=3e-3)
    trainer(max_steps=3).fit(module, fixed_batches(3))
    trained = {name: p.detach().clone() for name, p in module.named_parameters()}
    averaged = tiny_module()
    averaged.load_state_dict({**module.state_dict(), **module.ema.state_dict()})
    metrics, videos = validate_and_sample(module)
    assert all(torch.equal(p, trained[name]) for name, p in module.named_parameters())
    expected_metrics, expected_videos = validate_and_sample(averaged)
    assert metrics == expected_metrics and torch.equal(videos, expected_videos)
    assert not all(torch.equal(module.ema.shadow[name], trained[name]) for name in module.ema.shadow)


def one_step_gradients(checkpointed: bool, precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and the gradients of every weight (flow, text encoder, denoiser) of one training step."""
    L.seed_everything(0)
    module = tiny_module(text_dropout=0.0)
    gradients = {}

    class Keep(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            gradients.update({name: p.grad.clone() for name, p in pl_module.named_parameters() if p.grad is not None})

    record = RecordLosses()
    callbacks = [record, Keep()] + ([ActivationCheckpointing("all")] if checkpointed else [])
    trainer(max_steps=1, precision=precision, callbacks=callbacks).fit(module, fixed_batches(1))
    return record.losses[0], gradients


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_activation_checkpointing_leaves_the_loss_and_every_gradient_of_a_step_unchanged(precision):
    loss, gradients = one_step_gradients(False, precision)
    checkpointed_loss, checkpointed_gradients = one_step_gradients(True, precision)
    assert checkpointed_loss == loss
    assert gradients.keys() == checkpointed_gradients.keys() and any(name.startswith("denoiser.") for name in gradients)
    for name, gradient in gradients.items():
        assert torch.equal(checkpointed_gradients[name], gradient), name


def test_checkpointed_layers_validate_under_inference_mode_and_train_afterwards():
    """``trainer.validate`` runs under inference mode, which a Tweedie step leaves for its backward pass;
    the flow's rotary tables cached meanwhile are inference tensors, which a checkpoint cannot keep."""
    results = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        module = tiny_module()
        perturb_parameters(module, std=0.02)  # a flow that is not the identity: the Tweedie step moves the latents
        callbacks = [ActivationCheckpointing("all")] if checkpointed else []
        results[checkpointed] = validate_and_sample(module, callbacks=callbacks)
        trainer(max_steps=1, callbacks=callbacks).fit(module, fixed_batches(1))  # after the validation
    (metrics, videos), (checkpointed_metrics, checkpointed_videos) = results[False], results[True]
    assert checkpointed_metrics == metrics and torch.equal(checkpointed_videos, videos)


def train_eager_and_compiled(checkpointed: str | None = None, precision: str = "32-true") -> dict:
    """Three seeded steps with and without ``compile_flow``: {compiled: (module, losses)}."""
    runs = {}
    for compiled in (False, True):
        L.seed_everything(0)
        module = tiny_module(lr=3e-3, denoiser_lr=3e-3, text_dropout=0.0, compile_flow=compiled)
        record = RecordLosses()
        callbacks = [record] + ([ActivationCheckpointing(checkpointed)] if checkpointed else [])
        trainer(max_steps=3, callbacks=callbacks, precision=precision).fit(module, fixed_batches(3))
        runs[compiled] = module, record.losses
    return runs


@pytest.mark.parametrize("checkpointed", [None, "all"], ids=["plain", "with-activation-checkpointing"])
def test_compiled_flow_blocks_train_like_eager_ones(checkpointed):
    """``compile_flow``: the same losses and weights as eager training (the eager fallback is the default),
    also through the layers that activation checkpointing wraps."""
    runs = train_eager_and_compiled(checkpointed)
    (eager, eager_losses), (compiled, compiled_losses) = runs[False], runs[True]
    assert all(block._compiled_call_impl is not None for block in compiled.flow.blocks)
    assert all(block._compiled_call_impl is None for block in eager.flow.blocks)
    first = [block._compiled_call_impl for block in compiled.flow.blocks]
    compiled.setup("validate")  # a later stage keeps the compiled blocks instead of compiling anew
    assert [block._compiled_call_impl for block in compiled.flow.blocks] == first
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    for (name, a), (_, b) in zip(eager.flow.state_dict().items(), compiled.flow.state_dict().items()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_flow_blocks_under_bf16_autocast_keep_the_fp32_affine_step():
    """Fused bf16 kernels round differently, so the losses agree to 1e-3 (Adam's normalised steps turn
    such differences in tiny gradients into lr-sized weight differences: weights are not compared)."""
    runs = train_eager_and_compiled(precision="bf16-mixed")
    assert runs[True][1] == pytest.approx(runs[False][1], abs=1e-3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = runs[True][0].flow(torch.randn(2, 4, 4, 4, 12))
    assert z.dtype == logdet.dtype == torch.float32


def test_compiling_the_flow_under_zero3_is_refused():
    pytest.importorskip("deepspeed")
    from flowvid.lit.module import check_compilable
    from flowvid.lit.strategies import ZeroStrategy

    check_compilable(ZeroStrategy(stage=2))
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_compilable(ZeroStrategy(stage=3))


def test_zero3_on_several_processes_needs_a_fixed_number_of_validation_batches(tmp_path):
    """Each ZeRO-3 forward pass gathers the weights from every process: a process with a validation batch
    more than the others would wait for them forever, and shards hold different numbers of clips."""
    pytest.importorskip("deepspeed")
    from flowvid.lit.module import check_validation_in_step
    from flowvid.lit.strategies import ZeroStrategy

    write_synthetic_dataset(tmp_path, num_videos=4, frames=2, size=8, val_videos=3, shard_samples=2)
    folders = {"train_dir": str(tmp_path / "train"), "val_dir": str(tmp_path / "val"), "batch_size": 2}
    unfixed, fixed = VideoShardDataModule(**folders), VideoShardDataModule(**folders, val_batches=2)
    with pytest.raises(ValueError, match="set data.init_args.val_batches"):
        check_validation_in_step(ZeroStrategy(stage=3), 2, unfixed)
    check_validation_in_step(ZeroStrategy(stage=3), 2, fixed)
    check_validation_in_step(ZeroStrategy(stage=3), 1, unfixed)
    check_validation_in_step(ZeroStrategy(stage=2), 2, unfixed)  # its forward passes gather nothing


# --- throughput in the logs ------------------------------------------------------------------------


class FakeClock:
    """``time`` for flowvid.lit.throughput: a training batch takes 0.5 s, a validation batch 30 s."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class AdvanceClock(L.Callback):
    def __init__(self, clock: FakeClock):
        self.clock = clock

    def on_train_batch_start(self, *args):
        self.clock.now += 0.5

    def on_validation_batch_start(self, *args):
        self.clock.now += 30.0


def test_throughput_is_tokens_over_training_time_with_validation_left_out(monkeypatch):
    from flowvid.lit import throughput

    clock = FakeClock()
    monkeypatch.setattr(throughput, "time", clock)
    module = tiny_module(accumulate_grad_batches=2)
    monitor = throughput.TrainingThroughput(window=3, peak_flops=1e9)
    run = trainer(max_steps=6, limit_val_batches=1, val_check_interval=4, log_every_n_steps=1,
                  callbacks=[AdvanceClock(clock), monitor])
    run.fit(module, fixed_batches(12), val_dataloaders=fixed_batches(1))
    assert run.global_step == 6
    tokens_per_batch = 2 * 4 * 4 * 4  # videos x latent frames x 4 x 4 tokens
    assert module.tokens_seen == 12 * tokens_per_batch and module.videos_seen == 24
    logged = {name: value.item() for name, value in run.callback_metrics.items()}
    # Two batches of 0.5 s per optimiser step; the last window spans a validation (after batch 8).
    assert logged["throughput/step_seconds"] == pytest.approx(1.0)
    assert logged["throughput/tokens_per_sec"] == pytest.approx(2 * tokens_per_batch)
    assert logged["throughput/tokens_per_sec_per_device"] == pytest.approx(2 * tokens_per_batch)
    assert logged["throughput/videos_per_sec"] == pytest.approx(4.0)
    flow_and_denoiser = sum(p.numel() for p in [*module.flow.parameters(), *module.denoiser.parameters()])
    flops_per_sec = 6 * flow_and_denoiser * 2 * tokens_per_batch
    assert logged["throughput/model_tflops_per_device"] == pytest.approx(flops_per_sec / 1e12)
    assert logged["throughput/mfu"] == pytest.approx(flops_per_sec / 1e9)
    assert logged["train/tokens_seen"] == 12 * tokens_per_batch
    # The process's peak resident size so far: above what torch alone takes, below the peak after the run.
    peak_now = throughput.peak_memory_gb(torch.device("cpu"))["memory/peak_gb"]
    assert 0.1 < logged["memory/peak_gb"] <= peak_now * (1 + 1e-6)  # logged as float32


class RecordStepSeconds(L.Callback):
    def __init__(self):
        self.logged: list[float] = []

    def on_train_batch_end(self, trainer, *args):
        if "throughput/step_seconds" in trainer.callback_metrics:
            self.logged.append(trainer.callback_metrics["throughput/step_seconds"].item())


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resumed"])
def test_step_time_spans_whole_optimiser_steps_and_leaves_out_measuring_the_peak(monkeypatch, tmp_path, resume):
    """The first batch of an accumulation window is not the end of a step (nor on resuming), and the
    matmul that re-measures a CPU's peak is not training time."""
    from flowvid.lit import throughput

    clock = FakeClock()
    monkeypatch.setattr(throughput, "time", clock)

    def slow_measurement(device, dtype):
        clock.now += 10.0
        return 1e9

    monkeypatch.setattr(throughput, "measured_matmul_flops", slow_measurement)
    monkeypatch.setattr(throughput, "REMEASURE_STEPS", 2)
    ckpt = None
    if resume:
        first = trainer(max_steps=2, enable_checkpointing=False)
        first.fit(tiny_module(accumulate_grad_batches=2), fixed_batches(4))
        first.save_checkpoint(tmp_path / "step2.ckpt")
        ckpt = tmp_path / "step2.ckpt"
    record = RecordStepSeconds()
    run = trainer(max_steps=6, log_every_n_steps=1, callbacks=[AdvanceClock(clock), throughput.TrainingThroughput(window=2),
                                                               record])
    run.fit(tiny_module(accumulate_grad_batches=2), fixed_batches(12), ckpt_path=ckpt)
    assert record.logged and all(seconds == pytest.approx(1.0) for seconds in record.logged), record.logged


class StepDurations(L.Callback):
    """Advances a FakeClock by ``seconds[i]`` in the i-th training batch of the run."""

    def __init__(self, clock: FakeClock, seconds: list[float]):
        self.clock, self.seconds, self.batches = clock, seconds, 0

    def on_train_batch_start(self, *args):
        self.clock.now += self.seconds[self.batches]
        self.batches += 1


class RecordSpeed(L.Callback):
    """The step time and tokens/s that TrainingThroughput logged at each step (None before its first rates)."""

    def __init__(self):
        self.step_seconds: list[float | None] = []
        self.tokens_per_sec: list[float | None] = []

    def on_train_batch_end(self, trainer, *args):
        metrics = trainer.callback_metrics
        for name, values in (("step_seconds", self.step_seconds), ("tokens_per_sec", self.tokens_per_sec)):
            values.append(metrics[f"throughput/{name}"].item() if f"throughput/{name}" in metrics else None)


def test_rates_average_the_last_window_steps_and_leave_out_the_first(monkeypatch):
    """The first step (compilation, data workers starting) is not in the rates, which come after the
    second step, and a window of 3 averages 3 steps."""
    from flowvid.lit import throughput

    clock = FakeClock()
    monkeypatch.setattr(throughput, "time", clock)
    record = RecordSpeed()
    run = trainer(max_steps=5, log_every_n_steps=1,
                  callbacks=[StepDurations(clock, [20.0, 2.0, 3.0, 4.0, 5.0]),
                             throughput.TrainingThroughput(window=3, peak_flops=1e9), record])
    run.fit(tiny_module(), fixed_batches(5))
    assert record.step_seconds == [None, 2.0, 2.5, 3.0, 4.0]


def test_a_skipped_step_counts_as_a_step_in_the_rates(monkeypatch):
    """Its batch ran forward and backward and is in tokens_seen: its time is one step's, not the next
    optimiser step's as well."""
    from flowvid.lit import throughput

    class SkipThirdBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.hparams.skip_threshold = 0.0 if batch_idx == 2 else None

    clock = FakeClock()
    monkeypatch.setattr(throughput, "time", clock)
    module, monitor, record = tiny_module(), throughput.TrainingThroughput(window=2, peak_flops=1e9), RecordSpeed()
    run = trainer(max_steps=4, log_every_n_steps=1, callbacks=[SkipThirdBatch(), AdvanceClock(clock), monitor, record])
    run.fit(module, fixed_batches(5))
    assert module.skipped_steps == 1 and run.global_step == 4
    tokens_per_batch = 2 * 4 * 4 * 4
    assert record.step_seconds[1:] == [0.5] * 4
    assert record.tokens_per_sec[1:] == [tokens_per_batch / 0.5] * 4


@pytest.mark.parametrize("sampler_first", [False, True], ids=["sampler-after", "sampler-before"])
def test_sampling_between_steps_is_left_out_of_the_step_time(monkeypatch, sampler_first):
    from flowvid.lit import throughput
    from flowvid.lit.callbacks import _EveryNSteps

    clock = FakeClock()
    monkeypatch.setattr(throughput, "time", clock)

    class SlowSampler(_EveryNSteps):
        def run(self, trainer, pl_module):
            clock.now += 30.0

    monitor, sampler, record = throughput.TrainingThroughput(window=2, peak_flops=1e9), SlowSampler(2), RecordSpeed()
    callbacks = [sampler, monitor] if sampler_first else [monitor, sampler]
    durations = StepDurations(clock, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    run = trainer(max_steps=6, log_every_n_steps=1, callbacks=[durations, *callbacks, record])
    run.fit(tiny_module(), fixed_batches(6))
    # Samples after steps 2 and 4; each rate still averages the last two steps.
    assert record.step_seconds == [None, 2.0, 2.5, 3.5, 4.5, 5.5]


def test_a_resumed_run_does_not_sample_again_at_the_step_it_starts_at(tmp_path):
    from flowvid.lit.callbacks import _EveryNSteps

    class Steps(_EveryNSteps):
        def __init__(self):
            super().__init__(every_n_steps=2)
            self.steps = []

        def run(self, trainer, pl_module):
            self.steps.append(trainer.global_step)

    first, resumed = Steps(), Steps()
    run = trainer(max_steps=2, callbacks=[first])
    run.fit(tiny_module(accumulate_grad_batches=2), fixed_batches(4))
    run.save_checkpoint(tmp_path / "step2.ckpt")
    trainer(max_steps=4, callbacks=[resumed]).fit(tiny_module(accumulate_grad_batches=2), fixed_batches(8),
                                                  ckpt_path=tmp_path / "step2.ckpt")
    assert first.steps == [2] and resumed.steps == [4]


def test_samples_of_an_accumulating_run_are_logged_at_its_optimizer_step(tmp_path):
    """The step that names the checkpoint of the same weights; the losses are on the same axis of steps."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowvid.lit.callbacks import SampleVideoLogger

    run = trainer(max_steps=2, log_every_n_steps=1, logger=TensorBoardLogger(tmp_path, name="run"),
                  callbacks=[SampleVideoLogger(every_n_steps=2, captions=[CAPTIONS[0]])])
    run.fit(tiny_module(accumulate_grad_batches=2), fixed_batches(4))  # 4 batches, 2 optimiser steps
    events = EventAccumulator(run.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    (video,) = events.Images("samples/video")
    assert video.step == run.global_step == 2
    # One point per optimiser step, each at the step count before it, as without accumulation.
    assert [event.step for event in events.Scalars("train/loss")] == [0, 1]


def test_on_a_gpu_the_peak_memory_is_the_allocators(monkeypatch):
    from flowvid.lit.throughput import peak_memory_gb

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3.5e9 if device.index == 1 else 0.0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 4e9 if device.index == 1 else 0.0)
    assert peak_memory_gb(torch.device("cuda", 1)) == {"memory/peak_gb": 3.5, "memory/peak_reserved_gb": 4.0}


def test_tokens_seen_carry_over_a_resume(tmp_path):
    def fit(steps: int, ckpt_path=None) -> FlowModule:
        L.seed_everything(0)
        module = tiny_module()
        run = trainer(max_steps=steps, callbacks=[TrainingThroughput()])
        run.fit(module, fixed_batches(steps), ckpt_path=ckpt_path)
        run.save_checkpoint(tmp_path / f"step{steps}.ckpt")
        return module

    from flowvid.lit.throughput import TrainingThroughput

    uninterrupted = fit(4)
    fit(2)
    resumed = fit(4, ckpt_path=tmp_path / "step2.ckpt")
    assert resumed.tokens_seen == uninterrupted.tokens_seen == 4 * 2 * 4 * 16
    assert resumed.videos_seen == uninterrupted.videos_seen == 8


def test_a_run_resumed_with_other_rates_and_weight_decay_trains_with_them(tmp_path):
    def fit(steps: int, ckpt_path=None, **rates) -> L.Trainer:
        L.seed_everything(0)
        run = trainer(max_steps=steps)
        run.fit(tiny_module(**rates), fixed_batches(steps), ckpt_path=ckpt_path)
        run.save_checkpoint(tmp_path / f"step{steps}.ckpt")
        return run

    changed = dict(lr=2e-4, denoiser_lr=5e-4, weight_decay=0.5)
    fit(2, lr=1e-3, denoiser_lr=1e-3)
    with pytest.warns(UserWarning, match="the resumed run trains with this run's lr"):
        resumed = fit(4, ckpt_path=tmp_path / "step2.ckpt", **changed)
    fresh = fit(4, **changed)  # the learning rates a run configured so from the start has at step 4
    for ours, theirs in zip(resumed.optimizers[0].param_groups, fresh.optimizers[0].param_groups, strict=True):
        assert ours["name"] == theirs["name"]
        assert ours["lr"] == pytest.approx(theirs["lr"], rel=1e-12) and ours["weight_decay"] == 0.5
        assert ours["initial_lr"] == changed["lr" if ours["name"] == "flow" else "denoiser_lr"]


def test_a_run_resumed_with_a_longer_schedule_takes_its_first_step_at_the_new_schedules_rate(tmp_path):
    def fit(steps: int, ckpt_path=None) -> list[float]:
        record = RecordRates()
        run = trainer(max_steps=steps, callbacks=[record])
        run.fit(tiny_module(lr=1e-3, min_lr=1e-5, warmup_steps=1, schedule_steps=None), fixed_batches(steps),
                ckpt_path=ckpt_path)
        run.save_checkpoint(tmp_path / f"step{steps}.ckpt")
        return record.used

    fit(2)  # its schedule ends at min_lr after step 2
    with pytest.warns(UserWarning, match="the learning-rate schedule changes length"):
        resumed = fit(6, ckpt_path=tmp_path / "step2.ckpt")
    assert resumed == pytest.approx(fit(6)[2:], rel=1e-12)


def test_throughput_measures_a_cpu_and_reads_a_known_gpus_datasheet(monkeypatch):
    from flowvid.lit import throughput

    for dtype in (torch.float32, torch.bfloat16):
        assert 1e8 < throughput.measured_matmul_flops(torch.device("cpu"), dtype) < 1e15
    assert throughput.datasheet_flops(torch.device("cpu"), "32-true") is None
    asked = []
    monkeypatch.setattr(throughput, "get_available_flops", lambda device, dtype: asked.append(dtype) or 123e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    assert throughput.datasheet_flops(torch.device("cuda", 0), "bf16-mixed") == 123e12
    assert asked == [torch.bfloat16]
    # Hopper cards at their dense bf16 peak, whatever Lightning's table says of them.
    for name, peak in (("NVIDIA H200", 989.4e12), ("NVIDIA H200 NVL", 835.5e12), ("NVIDIA H100 NVL", 835.5e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert throughput.datasheet_flops(torch.device("cuda", 0), "bf16-mixed") == peak
    assert throughput.datasheet_flops(torch.device("cuda", 0), "32-true") == 123e12


def test_the_measured_peak_grows_its_matmul_only_while_a_product_stays_quick(monkeypatch):
    """bf16 on a CPU without native bf16 is measured on a smaller matmul, in a second rather than minutes."""
    from flowvid.lit import throughput

    slow, quick = 2 * throughput.MATMUL_SECONDS, throughput.MATMUL_SECONDS / 10
    for slow_from, sides_timed, flops in ((1024, [256, 512, 1024, 1024], 2 * 1024**3 / slow),  # stops there
                                          (4096, [256, 512, 1024, 2048], 2 * 2048**3 / quick)):  # the largest side
        sides = []
        monkeypatch.setattr(throughput, "matmul_seconds", lambda device, dtype, side, repeats:
                            sides.append(side) or (slow if side >= slow_from else quick))
        assert throughput.measured_matmul_flops(torch.device("cpu"), torch.bfloat16) == flops
        assert sides == sides_timed


def test_a_cpu_peak_measured_on_a_busy_machine_is_raised_by_later_measurements(monkeypatch):
    from flowvid.lit import throughput

    measured = iter([1e9, 4e9, 2e9, 3e9])  # at setup, then after steps 2, 4 and 6
    monkeypatch.setattr(throughput, "measured_matmul_flops", lambda device, dtype: next(measured))
    monkeypatch.setattr(throughput, "REMEASURE_STEPS", 2)
    monitor = throughput.TrainingThroughput(window=2)
    run = trainer(max_steps=6, log_every_n_steps=1, callbacks=[monitor])
    run.fit(tiny_module(), fixed_batches(6))
    assert monitor.device_peak == 4e9 and next(measured, None) is None
    flops_per_sec = run.callback_metrics["throughput/model_tflops_per_device"].item() * 1e12
    assert run.callback_metrics["throughput/mfu"].item() == pytest.approx(flops_per_sec / 4e9, rel=1e-5)


@pytest.mark.parametrize("arguments, message", [
    ({"window": 0}, "window must be a whole number of steps >= 1"),
    ({"peak_flops": 0}, "peak_flops must be"),
    ({"peak_flops": "fast"}, "peak_flops must be"),
])
def test_bad_throughput_settings_are_clear_errors(arguments, message):
    from flowvid.lit.throughput import TrainingThroughput

    with pytest.raises(ValueError, match=message):
        TrainingThroughput(**arguments)


def test_throughput_names_what_another_module_lacks():
    from flowvid.lit.throughput import TrainingThroughput

    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="tokens_seen, videos_seen, model_flops_per_token"):
        trainer(max_steps=1, callbacks=[TrainingThroughput()]).fit(Plain(), DataLoader(torch.randn(4, 2), batch_size=2))
