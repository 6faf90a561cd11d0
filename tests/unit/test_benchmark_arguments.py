"""The benchmark scripts refuse bad option values in one line, and ``run_all.py`` keeps its report whole.

Every check here stops before anything is measured or a model is loaded, so the tests are fast.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from flowvid.data import write_synthetic_dataset
from flowvid.demo import validation_samples

from test_perf_benchmarks import (adherence, finetune, memory, negative_prompt, reference, run_all, sampling,
                                  streaming, train_throughput)

ROOT = Path(__file__).resolve().parents[2]
attention_kernels = importlib.import_module("attention_kernels")  # on the path test_perf_benchmarks gives


def refusal(script, argv: list[str], capsys) -> str:
    """The last line a script's ``main`` prints when argparse stops it (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("script, argv, option", [
    (train_throughput, ["--rounds", "0"], "--rounds"),
    (train_throughput, ["--threads", "0"], "--threads"),
    (train_throughput, ["--batch", "0"], "--batch"),
    (train_throughput, ["--frames", "-1"], "--frames"),
    (finetune, ["--rounds", "0"], "--rounds"),
    (finetune, ["--rank", "0"], "--rank"),
    (streaming, ["--rounds", "0"], "--rounds"),
    (streaming, ["--frames", "8", "0"], "--frames"),
    (sampling, ["--repeats", "0"], "--repeats"),
    (sampling, ["--batch", "0"], "--batch"),
    (attention_kernels, ["--lengths", "16", "0"], "--lengths"),
    (memory, ["--steps", "0"], "--steps"),
    (reference, ["--reference", "x", "--rounds", "0"], "--rounds"),
    (adherence, ["--samples", "0"], "--samples"),
    (negative_prompt, ["--samples", "-3"], "--samples"),
])
def test_a_count_below_one_is_refused_in_one_line_naming_the_option(script, argv, option, capsys):
    assert refusal(script, argv, capsys).endswith(f"argument {option}: must be an integer >= 1, got {argv[-1]}")


@pytest.mark.parametrize("argv", [["--tolerances", "0"], ["--tolerances", "1e-3", "-1"], ["--tolerances", "nan"]])
def test_a_tolerance_that_is_not_positive_is_refused(argv, capsys):
    assert "argument --tolerances: must be a number > 0" in refusal(sampling, argv, capsys)


@pytest.mark.parametrize("script, step", [(train_throughput, 64), (finetune, 32)])
def test_a_width_that_is_no_multiple_of_the_head_width_is_refused(script, step, capsys):
    last_line = refusal(script, ["--widths", str(step), "100"], capsys)
    assert f"argument --widths: must be a multiple of {step}" in last_line and last_line.endswith("got 100")


@pytest.mark.parametrize("script, step", [(train_throughput, 64), (finetune, 32)])
def test_the_widths_help_says_the_rule(script, step, capsys):
    with pytest.raises(SystemExit):
        script.main(["--help"])
    assert f"multiples of {step}" in " ".join(capsys.readouterr().out.split())


def test_validation_samples_refuse_a_count_below_one(tmp_path):
    # 0 used to read every clip of the folder.
    with pytest.raises(ValueError, match="count must be an integer >= 1"):
        validation_samples(tmp_path, 0)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_synthetic_dataset(root, num_videos=4, frames=4, size=8, val_videos=3, shard_samples=8)
    return root / "val"


@pytest.mark.parametrize("script", [adherence, negative_prompt])
def test_a_missing_data_folder_stops_before_the_model_loads(script, tmp_path, capsys):
    model = tmp_path / "model.ckpt"
    model.write_text("not loaded: the data are read first")
    last_line = refusal(script, ["--ckpt", str(model), "--data", str(tmp_path / "val")], capsys)
    assert f"error: --data {tmp_path / 'val'}: " in last_line
    assert "manifest.json not found" in last_line


def test_fewer_clips_than_asked_for_are_used_and_said(held_out, capsys):
    parser = run_all.argparse.ArgumentParser()
    samples = run_all.held_out_samples(parser, str(held_out), 16)
    assert len(samples) == 3
    assert capsys.readouterr().err == f"--samples 16: {held_out} holds only 3 clips; using those\n"
    assert len(run_all.held_out_samples(parser, str(held_out), 2)) == 2
    assert capsys.readouterr().err == ""


@pytest.fixture
def recorded_runs(monkeypatch) -> list[tuple[str, list[str], Path]]:
    """run_all's benchmarks, recorded instead of run: each returns a one-line table."""
    runs = []

    def run(script, arguments, json_path, env=None, timeout_s=run_all.TIMEOUT_S):
        runs.append((script, arguments, json_path))
        return f"{script} measured"

    monkeypatch.setattr(run_all, "run", run)
    monkeypatch.setattr(run_all, "FAILURES", [])
    monkeypatch.setattr(run_all, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(run_all, "thread_settings", lambda out, cycles: "thread settings measured")
    return runs


def test_a_relative_out_dir_is_where_the_caller_means_not_under_the_repository(recorded_runs, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_all.main(["--quick", "--out-dir", "results"]) == 0
    # The benchmarks run with the repository root as their working folder: they need a whole path.
    assert recorded_runs and all(path.is_absolute() and path.parent == tmp_path / "results"
                                 for _, _, path in recorded_runs)
    assert "## GPU\n\ngpu.py measured" in (tmp_path / "results" / "report.md").read_text()


def test_ctrl_c_keeps_a_report_of_the_benchmarks_that_finished(recorded_runs, tmp_path, monkeypatch, capsys):
    measured = run_all.run

    def interrupted_at_sampling(script, arguments, json_path, **kwargs):
        if script == "sampling.py":
            raise KeyboardInterrupt
        return measured(script, arguments, json_path, **kwargs)

    monkeypatch.setattr(run_all, "run", interrupted_at_sampling)
    try:
        status = run_all.main(["--quick", "--out-dir", str(tmp_path)])
    except KeyboardInterrupt:  # escaping, it would stop the test session rather than fail this test
        pytest.fail("Ctrl-C escaped run_all.main as a traceback")
    assert status == 130
    report = (tmp_path / "report.md").read_text()
    assert "## Training throughput\n\ntrain_throughput.py measured" in report
    assert "## Sampling" not in report and "* interrupted (Ctrl-C)" in report
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted: the benchmarks that finished are in {tmp_path / 'report.md'}"]


def test_make_bench_runs_the_fine_tuning_command_the_documentation_quotes(recorded_runs, tmp_path):
    assert run_all.main(["--out-dir", str(tmp_path)]) == 0
    [arguments] = [arguments for script, arguments, _ in recorded_runs if script == "finetune.py"]
    command = " ".join(["python benchmarks/finetune.py", *arguments])
    assert command in (ROOT / "docs" / "benchmarks.md").read_text()
