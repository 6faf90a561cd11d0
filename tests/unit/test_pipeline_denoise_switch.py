"""Sampling with and without the final denoising step, and the messages of `flowvid generate` and `score` for
options given wrongly."""

import json

import numpy as np
import pytest
import torch

from flowvid.cli import main
from flowvid.loading import load_model
from flowvid.pipeline import GenerateError, VideoPipeline
from flowvid.sampling import SequentialSampler
from test_product_generate_score import (  # noqa: F401 (fixtures)
    CountingSampler,
    checkpoint,
    model_with_a_denoiser,
    read_record,
)

PROMPTS = ["a red circle moves left", "a blue square"]


def test_a_prompt_that_is_a_number_is_a_generate_error(checkpoint):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu", sampler=SequentialSampler())
    with pytest.raises(GenerateError, match=r"^prompts must be strings, got 5 \(int\)"):
        pipe(5)
    with pytest.raises(GenerateError, match=r"^prompts must be strings, got 5 \(int\)"):
        next(pipe.stream(5))


def test_without_denoising_the_sampled_latents_are_decoded_as_they_are():
    model = model_with_a_denoiser(1)
    pipe = VideoPipeline(model, SequentialSampler())
    denoised = pipe(PROMPTS, seed=2)
    raw = pipe(PROMPTS, seed=2, denoise=False)
    with torch.no_grad():
        again = model.denoise(torch.from_numpy(raw.latents), model.encode_text(PROMPTS))
        decoded = model.codec.decode(torch.from_numpy(raw.latents)).numpy()
    assert not np.allclose(raw.latents, denoised.latents, atol=1e-3)  # the denoiser changes them
    np.testing.assert_allclose(again.numpy(), denoised.latents, atol=1e-5)  # and is the only difference
    np.testing.assert_array_equal(raw.videos, decoded)


def test_streaming_without_denoising_gives_each_frame_as_soon_as_it_is_sampled():
    pipe = VideoPipeline(model_with_a_denoiser(2), CountingSampler())
    whole = pipe(PROMPTS, seed=2, denoise=False)
    streamed = []
    for index, frames in enumerate(pipe.stream(PROMPTS, seed=2, denoise=False)):
        assert pipe.sampler.handed_out == index + 1  # not the denoiser's lookahead behind
        streamed.append(frames)
    assert np.abs(np.stack(streamed, axis=1).astype(int) - whole.videos.astype(int)).max() <= 1


@pytest.mark.parametrize("denoise", ["tweedie", None, 0])
def test_denoise_is_a_switch(checkpoint, denoise):
    pipe = VideoPipeline.from_pretrained(checkpoint, device="cpu", sampler=SequentialSampler())
    with pytest.raises(GenerateError, match=r"^denoise must be True or False"):
        pipe("a red circle", denoise=denoise)


def test_the_model_denoises_to_a_detached_tensor_outside_no_grad(checkpoint):
    latents = torch.randn(1, 4, 4, 4, 12, generator=torch.Generator().manual_seed(0))
    for model in (model_with_a_denoiser(1), load_model(checkpoint)):  # learned, and the Tweedie step
        denoised = model.denoise(latents, model.encode_text(["a red circle"]))
        assert not denoised.requires_grad
        assert denoised.numpy().shape == latents.shape


def test_the_models_own_sampling_skips_the_denoiser_on_request():
    model = model_with_a_denoiser(1)
    raw = model.sample_latents(PROMPTS, seed=1, denoise=False)
    with torch.no_grad():
        denoised = model.denoise(raw, model.encode_text(PROMPTS))
    torch.testing.assert_close(model.sample_latents(PROMPTS, seed=1), denoised, atol=1e-5, rtol=0)
    assert torch.equal(model.generate_videos(PROMPTS, seed=1, denoise=False), model.codec.decode(raw))


def test_generate_no_denoise_is_recorded_and_kept_apart_by_skip_existing(checkpoint, tmp_path, capsys):
    args = ["generate", "--ckpt", str(checkpoint), "--prompt", "a red circle", "--sampler", "sequential"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--no-denoise", "--out", str(tmp_path / "raw")]) == 0
    assert "denoise" not in read_record(tmp_path / "plain", "t2v")
    assert read_record(tmp_path / "raw", "t2v")["denoise"] is False
    [plain, raw] = [np.load(next((tmp_path / name).glob("*.latent.npy"))) for name in ("plain", "raw")]
    assert not np.allclose(plain, raw, atol=1e-4)
    capsys.readouterr()
    assert main([*args, "--no-denoise", "--skip-existing", "--out", str(tmp_path / "raw")]) == 0
    assert "1 of 1 samples are in" in capsys.readouterr().err
    assert main([*args, "--no-denoise", "--skip-existing", "--out", str(tmp_path / "plain")]) == 2
    assert "(denoise: written without --no-denoise, now with it)" in capsys.readouterr().err


def test_a_mismatch_names_a_tolerance_the_user_did_not_give_as_the_default(checkpoint, tmp_path, capsys):
    args = ["generate", "--ckpt", str(checkpoint), "--prompt", "a red circle", "--out", str(tmp_path)]
    assert main([*args, "--sampler", "sequential"]) == 0
    capsys.readouterr()
    assert main([*args, "--sampler", "jacobi", "--skip-existing"]) == 2
    assert "tol not given, not 0.001 (the default in 32-true)" in capsys.readouterr().err
    assert main([*args, "--sampler", "jacobi", "--tol", "0.01", "--skip-existing"]) == 2
    assert "tol not given, not 0.01)" in capsys.readouterr().err  # a tolerance given is no default


@pytest.mark.parametrize("command", ["generate", "score"])
def test_a_misspelt_option_gets_a_suggestion(command, checkpoint, tmp_path, capsys):
    args = [command, "--ckpt", str(checkpoint), "--out", str(tmp_path / "o")]
    given = {"generate": [], "score": ["--input", "x"]}[command]
    misspelt = {"generate": ["--gudiance", "3"], "score": ["--captoin=a"]}[command]
    with pytest.raises(SystemExit) as exit_:
        main([*args, *given, *misspelt])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    suggested = {"generate": "--guidance", "score": "--caption"}[command]
    assert error.endswith(f"unrecognized arguments: {' '.join(misspelt)} (did you mean {suggested}?)")


@pytest.mark.parametrize("command, cut_short, option", [("generate", "--guid", "--guidance"),
                                                         ("score", "--lora-str", "--lora-strength")])
def test_a_cut_short_option_is_refused_not_taken_for_the_option_it_begins(command, cut_short, option, checkpoint,
                                                                          tmp_path, capsys):
    """argparse would read --guid as --guidance: the day an option --guide came, it would mean something else."""
    args = [command, "--ckpt", str(checkpoint), "--out", str(tmp_path / "o"), cut_short, "2"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, *{"generate": [], "score": ["--input", "x"]}[command]])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(f"unrecognized arguments: {cut_short} 2 (did you mean {option}?)")


@pytest.mark.parametrize("options, message", [
    (["--guidance", "-1"], "--guidance must be a finite number >= 0, got -1"),
    (["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (["--sampler", "jacobl"], "--sampler: unknown sampler 'jacobl'; generate takes jacobi, sequential or a plugin's "
                              "class path (did you mean 'jacobi'?)"),
    (["--tol", "0.01", "--sampler-args", json.dumps({"tol": 0.001})],
     "--sampler-args: tol is set by --tol already; leave it out of --sampler-args"),
])
def test_generate_names_options_as_typed_and_offers_only_usable_samplers(checkpoint, tmp_path, capsys, options,
                                                                         message):
    out = tmp_path / "o"
    assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "a", *options, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"flowvid generate: error: {message}"
    assert not out.exists()
