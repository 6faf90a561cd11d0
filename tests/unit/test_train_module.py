"""FlowModule pieces: gradient isolation, task conditioning, size checks, EMA and the schedule."""

import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from flowvid.codecs.base import CodecMismatchError
from flowvid.codecs.pixel import PixelCodec
from flowvid.denoise import CausalDenoiser, flow_score_target, score_matching_tap
from flowvid.flows import GlobalLocalFlow
from flowvid.lit import EMA, FlowModule, warmup_cosine
from flowvid.lit.schedule import warmup_cosine_scheduler
from flowvid.lit.step_seed import StepSeed
from flowvid.sampling import JacobiSampler, SequentialSampler
from flowvid.text import LearnedTextEncoder

TEXT_WIDTH = 16
VIDEO = (3, 4, 6)  # frames, height, width -> PixelCodec(2): latents (3, 2, 3, 12)


def make_module(text=True, denoiser=True, **overrides) -> FlowModule:
    torch.manual_seed(0)
    width = TEXT_WIDTH if text else None
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(2, 3), text_width=width)
    return FlowModule(
        flow,
        PixelCodec(patch_size=2),
        LearnedTextEncoder(width=TEXT_WIDTH, max_length=12, depth=1, head_dim=8) if text else None,
        CausalDenoiser(12, (2, 3), width=16, depth=1, head_dim=8, text_width=width) if denoiser else None,
        video_shape=VIDEO,
        **overrides,
    )


def video_batch(batch=2, seed=0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (batch, *VIDEO, 3), generator=generator, dtype=torch.uint8)
    captions = ["a red circle moves left", "a blue square moves up", "a green triangle moves down"][:batch]
    return {"video": video, "caption": captions, "key": [str(i) for i in range(batch)]}


def test_one_backward_pass_trains_the_denoiser_by_fsm_and_the_flow_by_likelihood_alone():
    module = make_module()
    x, text = module.training_inputs(video_batch())
    upstream = [*module.flow.parameters(), *module.text_encoder.parameters()]

    # Two passes, spelled out: the likelihood, then the MSE to the target read off its input gradient.
    x.requires_grad_(True)
    module.likelihood_terms(x, text)["loss"].backward(retain_graph=True)
    target = flow_score_target(x.grad, module.noise_std)
    flow_grads = [p.grad.clone() for p in upstream]
    module.zero_grad(set_to_none=True)
    F.mse_loss(module.denoiser_prediction(x, text), target).backward()
    assert all(p.grad is None for p in upstream)  # the denoiser's loss reaches neither flow nor text
    denoiser_grads = [p.grad.clone() for p in module.denoiser.parameters()]
    assert any(g.abs().sum() > 0 for g in denoiser_grads)

    # One pass through the tap: the same gradients for both.
    module.zero_grad(set_to_none=True)
    x.grad = None
    tapped = score_matching_tap(x, module.denoiser_prediction(x, text), module.noise_std)
    module.likelihood_terms(tapped, text)["loss"].backward()
    for expected, p in zip(flow_grads + denoiser_grads, upstream + list(module.denoiser.parameters())):
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flow_score_target(x.grad, module.noise_std), target)


def test_noise_augmentation_has_the_configured_sigma():
    module = make_module(text=False, denoiser=False, noise_std=0.25)
    batch = video_batch(batch=3)
    clean = module.latents_of(batch)
    noisy, _ = module.training_inputs(batch)
    assert (noisy - clean).std().item() == pytest.approx(0.25, rel=0.1)


def test_extension_drops_the_first_frame_and_prefixes_the_caption(monkeypatch):
    module = make_module(extend_prob=1.0, text_dropout=0.0)
    seen = []
    monkeypatch.setattr(module, "encode_text", lambda captions: seen.append(captions) or None)
    batch = video_batch()
    noisy, _ = module.training_inputs(batch)
    assert noisy.shape[1] == VIDEO[0] - 1
    assert seen == [["(extend) " + c for c in batch["caption"]]]


def test_a_frozen_text_encoder_and_the_codec_stay_in_eval_mode_in_training():
    module = make_module()
    module.text_encoder.trainable = False  # as a frozen encoder that forgot to keep itself in eval mode
    module.train()
    assert module.flow.training and not module.codec.training and not module.text_encoder.training
    assert make_module().train().text_encoder.training  # a trainable one trains


def test_video_to_video_puts_the_source_clip_first(monkeypatch):
    module = make_module(v2v_prob=1.0, text_dropout=0.0, noise_std=1e-6)
    seen = []
    monkeypatch.setattr(module, "encode_text", lambda captions: seen.append(captions) or None)
    batch = video_batch()
    batch["source_video"] = video_batch(seed=1)["video"]
    noisy, _ = module.training_inputs(batch)
    torch.testing.assert_close(noisy, torch.cat([module.latents_of(batch, "source_"), module.latents_of(batch)], 1),
                               atol=1e-4, rtol=0)
    assert seen == [["(v2v) " + c for c in batch["caption"]]]

    del batch["source_video"]
    with pytest.raises(ValueError, match="source clip"):
        module.training_inputs(batch)
    # However rare the task, the first batch says the shards cannot serve it.
    rare = make_module(v2v_prob=1e-9)
    with pytest.raises(ValueError, match="source clip"):
        rare.training_inputs(batch)


def test_caption_dropout_drops_the_caption_but_keeps_the_task(monkeypatch):
    module = make_module(extend_prob=1.0, text_dropout=1.0)
    seen = []
    monkeypatch.setattr(module, "encode_text", lambda captions: seen.append(captions) or None)
    module.training_inputs(video_batch())
    assert seen == [["(extend) ", "(extend) "]]


def test_cached_text_states_are_used_and_dropped_rows_become_the_empty_caption():
    module = make_module(text_dropout=0.5)
    batch = video_batch(batch=3)
    cached = module.text_encoder.encode(batch["caption"])
    batch["text_tokens"], batch["text_mask"] = cached.tokens.detach() + 7.0, cached.mask
    torch.manual_seed(3)
    _, text = module.training_inputs(batch)
    empty = module.text_encoder.encode([""])
    kept = [bool(torch.equal(row, cached_row)) for row, cached_row in zip(text.tokens, batch["text_tokens"])]
    dropped = [bool(torch.allclose(row, empty.tokens[0])) for row in text.tokens]
    assert all(k != d for k, d in zip(kept, dropped)) and any(kept) and any(dropped)


def test_a_conditioned_model_without_captions_is_a_clear_error():
    module = make_module()
    batch = video_batch()
    batch["caption"] = ["", ""]
    with pytest.raises(ValueError, match="no captions"):
        module.training_inputs(batch)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(video_shape=(3, 8, 6)), "flow models frames"),
        (dict(text_encoder=None), "needs a text_encoder"),
        (dict(text_encoder=LearnedTextEncoder(width=8, depth=1, head_dim=8)), "text_width=16"),
        (dict(denoiser=CausalDenoiser(12, (3, 2), width=16, depth=1, head_dim=8)), "denoiser works on frames"),
        (dict(denoiser=CausalDenoiser(12, (2, 3), width=16, depth=1, head_dim=8, noise_std=0.1)), "noise_std=0.1"),
        (dict(noise_std=0.0), "noise_std must be > 0"),
        (dict(text_dropout=1.5), "text_dropout must be a probability"),
        (dict(grad_clip=-1.0), r"grad_clip must be > 0, or null for none, got -1.0"),
        (dict(grad_clip=0.0), r"grad_clip must be > 0"),
        (dict(skip_threshold=0.0), r"skip_threshold must be > 0"),
        (dict(min_lr=-1e-6), r"min_lr must be in \[0, lr=0.0001\], got -1e-06"),
        (dict(text_encoder=None, guidance=3.0), "guidance=3.0 needs a text encoder"),
    ],
)
def test_parts_that_do_not_fit_are_clear_errors(change, message):
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(2, 3), text_width=TEXT_WIDTH)
    arguments = dict(flow=flow, codec=PixelCodec(patch_size=2),
                     text_encoder=LearnedTextEncoder(width=TEXT_WIDTH, depth=1, head_dim=8), video_shape=VIDEO)
    with pytest.raises(ValueError, match=message):
        FlowModule(**{**arguments, **change})


def test_a_checkpoint_of_another_codec_is_refused():
    module = make_module()
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    other = make_module()
    other.codec = PixelCodec(patch_size=1)
    with pytest.raises(CodecMismatchError):
        other.on_load_checkpoint(checkpoint)


def test_ema_averages_and_swaps_weights_back():
    layer = torch.nn.Linear(2, 2)
    ema = EMA(layer, decay=0.75)
    start = layer.weight.detach().clone()
    ema.update()  # the average starts at the weights of the first update
    with torch.no_grad():
        layer.weight.add_(4.0)
    ema.update()
    torch.testing.assert_close(ema.shadow["weight"], start + 1.0)  # 0.75 * w0 + 0.25 * (w0 + 4)
    with ema.averaged():
        torch.testing.assert_close(layer.weight, start + 1.0)
    torch.testing.assert_close(layer.weight, start + 4.0)
    restored = EMA(layer, decay=0.75)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.shadow["weight"], start + 1.0)


def test_ema_of_bf16_weights_averages_in_fp32_and_keeps_every_small_step():
    """DeepSpeed under bf16 keeps the weights in bf16: an average in bf16 with decay 0.999 would round
    every update away and stay at the first weights."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(layer, decay=0.999)
    ema.update()
    expected = layer.weight.double()
    for _ in range(100):
        with torch.no_grad():
            layer.weight.add_(0.01)
        ema.update()
        expected = 0.999 * expected + 0.001 * layer.weight.double()
    assert ema.state_dict()["weight"].dtype == torch.float32
    torch.testing.assert_close(ema.shadow["weight"].double(), expected, rtol=0, atol=1e-5)
    with ema.averaged():
        assert layer.weight.dtype == torch.bfloat16
        torch.testing.assert_close(layer.weight.double(), expected, rtol=1e-2, atol=0)


def test_ema_starts_from_weights_loaded_after_construction():
    layer = torch.nn.Linear(2, 2)
    ema = EMA(layer, decay=0.5)
    loaded = {"weight": torch.full((2, 2), 3.0), "bias": torch.zeros(2)}
    layer.load_state_dict(loaded)
    with ema.averaged():  # nothing averaged yet: the loaded weights, not the initial ones
        torch.testing.assert_close(layer.weight, loaded["weight"])
    assert ema.state_dict() == {}
    ema.load_state_dict({})
    ema.update()
    torch.testing.assert_close(ema.shadow["weight"], loaded["weight"])


def test_warmup_then_cosine_to_the_floor():
    lrs = [warmup_cosine(step, 4, 14, 1.0, 0.1) for step in range(16)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14:] == pytest.approx([0.1, 0.1])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_each_parameter_group_follows_the_shape_from_its_own_peak():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-4}]
    optimizer = torch.optim.AdamW(groups)
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=2, total_steps=10, min_lr=1e-6)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 5e-5])
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-6, 1e-6])


def fit_to(max_steps: int, checkpoint, resume=None, **overrides) -> tuple[FlowModule, list[str]]:
    """Train to ``max_steps`` (from ``resume``), save ``checkpoint``; the module and the schedule's warnings."""
    module = make_module(text=False, denoiser=False, warmup_steps=1, lr=1e-3, **overrides)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[StepSeed()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader([video_batch()] * 8, batch_size=None), ckpt_path=resume)
    trainer.save_checkpoint(checkpoint)
    return module, [str(w.message) for w in caught if "learning-rate schedule" in str(w.message)]


def test_a_finished_run_continued_further_warns_that_its_schedule_stretches_unless_its_length_is_set(tmp_path):
    fit_to(2, tmp_path / "sized.ckpt")
    _, warned = fit_to(4, tmp_path / "sized4.ckpt", resume=tmp_path / "sized.ckpt")
    assert len(warned) == 1
    assert "from the checkpoint's 2 optimiser steps to 4" in warned[0]
    assert "--model.init_args.schedule_steps 2 keeps the original schedule" in warned[0]

    uninterrupted, _ = fit_to(4, tmp_path / "whole.ckpt", schedule_steps=4)
    fit_to(2, tmp_path / "set.ckpt", schedule_steps=4)
    continued, warned = fit_to(4, tmp_path / "set4.ckpt", resume=tmp_path / "set.ckpt", schedule_steps=4)
    assert warned == []
    expected = uninterrupted.state_dict()
    assert all(torch.equal(weight, expected[name]) for name, weight in continued.state_dict().items())


def test_a_checkpoint_of_a_module_built_in_python_asks_for_its_sub_modules_again(tmp_path):
    """Its sub-modules are objects, kept as weights but not as settings: Lightning failed with a bare
    ``__init__() missing 1 required positional argument: 'flow'``."""
    trained, _ = fit_to(1, tmp_path / "python.ckpt")
    with pytest.raises(TypeError, match=r"built in Python.*: pass them again, "
                                        r"FlowModule\.load_from_checkpoint\(path, flow=\.\.\., codec=\.\.\."):
        FlowModule.load_from_checkpoint(tmp_path / "python.ckpt")
    parts = make_module(text=False, denoiser=False)
    loaded = FlowModule.load_from_checkpoint(tmp_path / "python.ckpt", flow=parts.flow, codec=parts.codec)
    assert all(torch.equal(weight, trained.state_dict()[name]) for name, weight in loaded.state_dict().items())
    with pytest.raises(TypeError, match="cannot be called on an instance"):  # Lightning's guard is kept
        loaded.load_from_checkpoint(tmp_path / "python.ckpt", flow=parts.flow, codec=parts.codec)


def test_an_averaged_model_samples_with_its_averaged_text_encoder_too():
    module = make_module(ema_decay=0.5, guidance=2.0).eval()
    with torch.no_grad():
        for p in module.parameters():  # a flow that is not the identity, so the caption matters
            p.add_(0.05 * torch.randn_like(p))
    module.ema.update()  # the average: the weights as they are now
    averaged = {name: p.detach().clone() for name, p in module.named_parameters()}
    with torch.no_grad():
        for p in module.text_encoder.parameters():  # training moved on; the average did not
            p.add_(0.5 * torch.randn_like(p))
    plain = make_module(guidance=2.0).eval()
    plain.load_state_dict(averaged, strict=False)
    captions = ["a red circle moves left", "a blue square moves up"]
    assert torch.equal(module.generate_videos(captions, seed=3), plain.generate_videos(captions, seed=3))


def test_the_sampler_of_logged_samples_is_a_name_or_a_mapping_checked_when_the_module_is_built():
    assert isinstance(make_module(sampler="sequential").sampler(), SequentialSampler)
    jacobi = make_module(sampler={"name": "jacobi", "init_args": {"tol": 1e-3}}).sampler()
    assert isinstance(jacobi, JacobiSampler) and jacobi.tol == 1e-3
    by_path = make_module(sampler={"class_path": "flowvid.sampling.JacobiSampler", "init_args": {"block_size": 3}})
    assert by_path.sampler().block_size == 3
    with pytest.raises(ValueError, match="tol must be a number in"):
        make_module(sampler={"name": "jacobi", "init_args": {"tol": 2.0}})
    with pytest.raises(KeyError, match="unknown sampler 'jacobbi'"):
        make_module(sampler="jacobbi")


def test_a_negative_latent_norm_penalty_is_refused():
    with pytest.raises(ValueError, match="latent_norm_penalty must be a finite number >= 0, got -1"):
        make_module(latent_norm_penalty=-1.0)


def test_model_flops_leave_out_the_gradients_of_frozen_weights():
    module = make_module()
    counts = {name: sum(p.numel() for p in part.parameters())
              for name, part in (("flow", module.flow), ("denoiser", module.denoiser), ("shallow", module.flow.shallow))}
    assert module.model_flops_per_token == 6 * (counts["flow"] + counts["denoiser"])
    module.flow.shallow.requires_grad_(False)  # frozen: forward and input gradient only
    assert module.model_flops_per_token == 6 * (counts["flow"] + counts["denoiser"]) - 2 * counts["shallow"]
    module.denoiser.requires_grad_(False)  # its input is detached: the forward pass alone
    assert module.model_flops_per_token == 6 * counts["flow"] - 2 * counts["shallow"] + 2 * counts["denoiser"]
    module.denoiser = None  # no gradient on the latents: the frozen shallow blocks before the deep one see none
    assert module.model_flops_per_token == 6 * counts["flow"] - 4 * counts["shallow"]


def test_trainer_predict_is_refused_in_one_line_that_names_the_sampling_api():
    """Lightning asked for a forward method, or for the data module's predict_dataloader."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(NotImplementedError, match=r"does not run under trainer\.predict: .*generate_videos"):
        trainer.predict(make_module(), DataLoader([video_batch()], batch_size=None))


def test_a_subclass_whose_optimiser_is_not_flowmodules_is_refused_before_its_first_step():
    """The step clips and logs the groups 'flow' and 'denoiser' and steps the schedule: a plain optimiser
    failed with "'<' not supported between instances of 'int' and 'NoneType'"."""

    class WithSGD(FlowModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    plain = make_module()
    module = WithSGD(plain.flow, plain.codec, plain.text_encoder, plain.denoiser, video_shape=VIDEO)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(TypeError, match=r"WithSGD\.configure_optimizers must return what "
                                        r"FlowModule\.configure_optimizers returns \(call super\(\)"):
        trainer.fit(module, DataLoader([video_batch()] * 2, batch_size=None))
    assert module.global_step == 0


@pytest.mark.parametrize("option, value, own", [("accumulate_grad_batches", 4, "accumulate_grad_batches"),
                                                ("gradient_clip_val", 1.0, "grad_clip")])
def test_trainer_options_of_automatic_optimisation_are_refused_naming_the_modules_own(option, value, own):
    """Lightning's refusal said to switch to automatic optimisation, which a FlowModule cannot do."""
    module = make_module()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **{option: value})
    with pytest.raises(ValueError, match=rf"trainer\.{option}={value} applies only to automatic optimisation; "
                                         rf"FlowModule optimises itself: set model\.init_args\.{own} "
                                         rf"\(FlowModule\({own}={value}\) in Python\)"):
        trainer.fit(module, DataLoader([video_batch()] * 2, batch_size=None))
    assert module.global_step == 0
    trainer.validate(module, DataLoader([video_batch()], batch_size=None))  # validation takes no optimiser step


def test_validate_returns_and_prints_the_validation_metrics(capsys):
    """What ``flowvid validate`` shows: Lightning prints and returns only the values given to its logger."""
    module = make_module()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    results = trainer.validate(module, DataLoader([video_batch()], batch_size=None))
    assert math.isfinite(results[0]["val/bits_per_dim"]) and results[0]["val/noisy_mse"] > 0
    assert "val/bits_per_dim" in capsys.readouterr().out
