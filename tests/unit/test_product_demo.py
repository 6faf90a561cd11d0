"""The demo's training step starts a fresh run in its output folder and reports how fast it trained."""

import pytest

from flowvid import demo


def test_a_second_demo_run_replaces_the_checkpoints_of_the_first(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    old = run_dir / "checkpoints" / "step=00000640.ckpt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"first run")

    def fake_fit(command):
        # Lightning writes a -v1 name next to a checkpoint of the same step.
        name = "step=00000640-v1.ckpt" if old.exists() else "step=00000640.ckpt"
        (run_dir / "checkpoints" / name).write_bytes(b"second run")

    monkeypatch.setattr(demo, "run_to_the_end", fake_fit)
    checkpoint = demo.train(demo.RECIPE, run_dir, [])
    assert checkpoint == old and checkpoint.read_bytes() == b"second run"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step=00000640.ckpt"]


def test_the_demo_reports_the_median_speed_of_its_newest_training_run(tmp_path):
    import os

    from torch.utils.tensorboard import SummaryWriter

    for version, tokens in ((0, [1.0, 2.0, 3.0]), (1, [10.0, 40.0, 20.0])):
        folder = tmp_path / "lightning_logs" / f"version_{version}"
        writer = SummaryWriter(str(folder))
        for step, value in enumerate(tokens):
            writer.add_scalar("throughput/tokens_per_sec", value, step)
            writer.add_scalar("throughput/mfu", value / 100, step)
            writer.add_scalar("memory/peak_gb", value / 10, step)
        writer.close()
        [log] = folder.glob("events.out.tfevents.*")
        os.utime(log, (version, version))  # version_1 is the newer run
    assert demo.training_speed(tmp_path) == pytest.approx({"train_tokens_per_sec": 20.0, "train_mfu": 0.2,
                                                           "train_peak_memory_gb": 4.0})
    assert demo.training_speed(tmp_path / "nothing") == {}


def test_the_demo_reports_bits_per_dim_of_every_frame_whose_mean_is_the_videos():
    import numpy as np
    import torch

    from flowvid.codecs.pixel import PixelCodec
    from flowvid.flows import GlobalLocalFlow
    from flowvid.lit import FlowModule
    from flowvid.testing import perturb_parameters

    torch.manual_seed(0)
    flow = GlobalLocalFlow.from_preset("tiny", latent_channels=12, frame_size=(4, 4))
    perturb_parameters(flow, std=0.05)
    module = FlowModule(flow, PixelCodec(patch_size=2), video_shape=(3, 8, 8)).eval()
    rng = np.random.default_rng(0)
    samples = [{"video": rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), "caption": ""} for _ in range(2)]
    video, frames = demo.bits_per_dim(module, samples)
    assert len(frames) == 3 and len(set(frames)) == 3
    assert video == pytest.approx(sum(frames) / 3, rel=1e-6)


@pytest.mark.parametrize("argv, refused", [
    (["--real", "--guidance", "2"], "--real fine-tunes the demo model in --out"),
    (["--checkpoint", "model.ckpt", "--trainer.max_steps=3"], "--trainer.max_steps=3 would be ignored"),
])
def test_options_the_demo_would_ignore_are_refused(argv, refused, capsys):
    with pytest.raises(SystemExit) as stopped:
        demo.main(argv)
    assert stopped.value.code == 2 and refused in capsys.readouterr().err
