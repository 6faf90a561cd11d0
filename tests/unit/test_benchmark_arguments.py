"""The benchmark scripts refuse bad option values in one line, show their defaults in ``--help``, record their
options in their JSON, and ``run_all.py`` keeps its report whole.

Every check here stops before anything is measured or a model is loaded (or measures nothing), so the
tests are fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import pytest
import torch

from flowvid.data import write_synthetic_dataset
from flowvid.demo import validation_samples

from test_perf_benchmarks import (adherence, finetune, gpu, memory, negative_prompt, reference, run_all, sampling,
                                  streaming, train_throughput)

ROOT = Path(__file__).resolve().parents[2]
# On the path test_perf_benchmarks gives.
attention_kernels = importlib.import_module("attention_kernels")
data = importlib.import_module("data")
SCRIPTS = [adherence, attention_kernels, data, finetune, gpu, memory, negative_prompt, reference, run_all, sampling,
           streaming, train_throughput]


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


@pytest.mark.parametrize("script, argv, option, rule", [
    (sampling, ["--train-steps", "-1"], "--train-steps", "must be an integer >= 0, got -1"),
    (reference, ["--reference", "x", "--fit-steps", "0"], "--fit-steps", "must be an integer >= 1, got 0"),
    (reference, ["--reference", "x", "--threshold", "0"], "--threshold", "must be a number > 0, got '0'"),
    (sampling, ["--perturb", "-0.02"], "--perturb", "must be a number > 0, got '-0.02'"),
    (sampling, ["--perturb", "nan"], "--perturb", "must be a number > 0, got 'nan'"),
    # With guidance 0 a negative prompt steers nothing: the sampler refuses it, after the model has loaded.
    (negative_prompt, ["--guidance", "3", "0"], "--guidance", "must be a number > 0, got '0'"),
])
def test_a_size_or_weight_that_cannot_be_measured_is_refused_in_one_line(script, argv, option, rule, capsys):
    assert refusal(script, argv, capsys).endswith(f"argument {option}: {rule}")


@pytest.mark.parametrize("seeds, message", [
    (["-1"], "--seeds must be an integer from 0 to"),
    (["4294967295"], "--seeds must be an integer from 0 to"),  # caption i samples with seed + i
    (["1234", "1", "1234"], "--seeds: each seed once, got 1234 more than once"),
])
def test_seeds_the_sampler_would_refuse_stop_before_the_data_and_model_are_read(seeds, message, tmp_path, capsys):
    missing = tmp_path / "model.ckpt"  # neither is read: the seeds are checked first
    argv = ["--ckpt", str(missing), "--data", str(tmp_path / "val"), "--seeds", *seeds]
    assert message in refusal(adherence, argv, capsys)


def test_seed_zero_is_a_seed_not_a_count():
    # --seeds lists the seeds themselves; 0 is as good a seed as any.
    adherence.check_seeds(argparse.ArgumentParser(), [0, 1, 2], samples=16)


def parser_of(script, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script's ``main`` builds, caught as it starts parsing: nothing runs."""
    class Parsing(Exception):
        pass

    def caught(parser, *args, **kwargs):
        raise Parsing(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    with pytest.raises(Parsing) as parsing:
        script.main([])
    return parsing.value.args[0]


def shown(default) -> str:
    return " ".join(map(str, default)) if isinstance(default, list) else str(default)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.__name__)
def test_help_shows_every_default_as_it_is_typed(script, monkeypatch):
    parser = parser_of(script, monkeypatch)
    text = " ".join(parser.format_help().split())
    options = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert all(action.help for action in options)  # an option without help shows no default either
    for action in options:
        if action.default not in (None, False, []) and "(default:" not in action.help:
            assert f"(default: {shown(action.default)})" in text, action.option_strings


def test_help_ends_a_line_with_the_default(capsys):
    with pytest.raises(SystemExit):
        train_throughput.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--rounds ROUNDS interleaved rounds; medians are reported (default: 8)" in text
    assert "--widths WIDTHS [WIDTHS ...] deep block widths, multiples of 64 (the attention head width) " \
           "(default: 128 256)" in text
    assert text.endswith("--compile also time the flow with its blocks compiled (FlowModule's compile_flow)")


@pytest.fixture
def measured_nothing(monkeypatch):
    """finetune.py with its measurement replaced by fixed rows."""
    def rows(width, rank, rounds, batch):
        row = {"step_ms": 10.0, "parameters": 1000, "trainable": 10, "adamw_state_mib": 0.0, "speed_up": 1.0}
        return {"full": row, f"lora r{rank}": row}

    monkeypatch.setattr(finetune, "measure_width", rows)


def test_finetune_records_its_options_in_its_json(measured_nothing, tmp_path):
    path = tmp_path / "finetune.json"
    assert finetune.main(["--widths", "64", "--rank", "4", "--rounds", "2", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["args"] == {"widths": [64], "rank": 4, "rounds": 2, "batch": 4, "threads": None, "json": str(path)}
    assert result["omp_wait_policy"] == run_all.wait_policy() and set(result["results"]) == {"64"}


@pytest.mark.parametrize("where, rule", [("taken/r.json", "is inside the file"), ("folder", "is a folder")])
def test_a_json_file_that_cannot_be_written_is_refused_before_anything_is_measured(where, rule, tmp_path, capsys,
                                                                                     monkeypatch):
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr(finetune, "measure_width", lambda *args: pytest.fail("measured before refusing --json"))
    last_line = refusal(finetune, ["--widths", "64", "--json", str(tmp_path / where)], capsys)
    assert "error: argument --json: " in last_line and rule in last_line


def test_results_that_cannot_be_written_at_the_end_are_printed_not_lost(measured_nothing, tmp_path, capsys,
                                                                        monkeypatch):
    path = tmp_path / "finetune.json"
    monkeypatch.setattr(Path, "write_text", lambda *args, **kwargs: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(SystemExit) as exit_:
        finetune.main(["--widths", "64", "--json", str(path)])
    assert exit_.value.code == 1
    printed = capsys.readouterr()
    assert json.loads(printed.out.strip().splitlines()[-1])["args"]["json"] == str(path)
    assert printed.err.strip() == f"error: could not write {path} (No space); the results are the JSON line above"


def test_the_options_of_a_built_flow_are_refused_with_a_checkpoint(tmp_path, capsys):
    last_line = refusal(sampling, ["--checkpoint", str(tmp_path / "m.ckpt"), "--frames", "2", "--config", "large"],
                        capsys)
    assert last_line.endswith("error: --config, --frames describe the flow built when no --checkpoint is given; "
                              "the checkpoint's model is measured as it was trained, over its full video length: "
                              "leave them out")


def test_a_json_file_in_a_folder_not_made_yet_is_written_there(measured_nothing, tmp_path):
    # The folder used to be found missing only after the measuring, the numbers lost with a traceback.
    path = tmp_path / "runs" / "today" / "finetune.json"
    assert finetune.main(["--widths", "64", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["args"]["json"] == str(path)


@pytest.fixture
def threads_kept():
    """A benchmark sets torch's threads as it starts measuring; the test process keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("script, option", [(streaming, "--ckpt"), (adherence, "--ckpt"), (negative_prompt, "--ckpt"),
                                            (sampling, "--checkpoint")])
@pytest.mark.parametrize("name, damage, reason", [
    ("step=00000640.ckpt", lambda path: path.write_text("not a checkpoint"), "not a PyTorch checkpoint"),
    ("run", lambda path: path.mkdir(), "is a directory without a checkpoint"),
])
def test_a_model_that_cannot_be_loaded_stops_a_benchmark_with_one_line(script, option, name, damage, reason, held_out,
                                                                        tmp_path, capsys, threads_kept):
    model = tmp_path / name
    damage(model)
    data = ["--data", str(held_out)] if script in (adherence, negative_prompt) else []
    last_line = refusal(script, [option, str(model), *data], capsys)
    assert f"error: {option} {model}: " in last_line and reason in last_line


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
    assert "## Sampling" not in report
    assert "* interrupted (Ctrl-C) in Sampling: its benchmark then running was stopped; not run: Fine-tuning, " \
           "Memory, Data" in report
    assert "## Not measured\n\n* no reference checkout" in report
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted: the benchmarks that finished are in {tmp_path / 'report.md'}"]


def test_make_bench_runs_the_fine_tuning_command_the_documentation_quotes(recorded_runs, tmp_path):
    assert run_all.main(["--out-dir", str(tmp_path)]) == 0
    [arguments] = [arguments for script, arguments, _ in recorded_runs if script == "finetune.py"]
    command = " ".join(["python benchmarks/finetune.py", *arguments])
    assert command in (ROOT / "docs" / "benchmarks.md").read_text()


def reference_checkout(folder: Path) -> Path:
    """A folder shaped like a checkout of the reference implementation (nothing in it is imported here)."""
    (folder / "misc").mkdir(parents=True)
    (folder / "transformer_flow.py").write_text("")
    return folder


def test_a_wrong_reference_checkout_stops_run_all_before_the_first_benchmark(recorded_runs, tmp_path, capsys):
    last_line = refusal(run_all, ["--reference", str(tmp_path), "--out-dir", str(tmp_path / "out")], capsys)
    assert "error: --reference: " in last_line
    assert f"{tmp_path} is not a checkout of the reference implementation" in last_line
    assert recorded_runs == [] and not (tmp_path / "out").exists()


def test_a_relative_reference_reaches_the_benchmarks_as_a_whole_path(recorded_runs, tmp_path, monkeypatch):
    checkout = reference_checkout(tmp_path / "ml-starflow")
    monkeypatch.chdir(tmp_path)
    assert run_all.main(["--quick", "--reference", "ml-starflow", "--out-dir", "results"]) == 0
    # The benchmarks run with the repository root as their working folder.
    given = [arguments[arguments.index("--reference") + 1] for _, arguments, _ in recorded_runs
             if "--reference" in arguments]
    assert given and set(given) == {str(checkout)}


def test_an_out_dir_that_cannot_be_made_is_refused_in_one_line(recorded_runs, tmp_path, capsys):
    taken = tmp_path / "results"
    taken.write_text("a file, not a folder")
    last_line = refusal(run_all, ["--out-dir", str(taken / "benchmarks")], capsys)
    assert f"error: --out-dir {taken / 'benchmarks'}: " in last_line and "Not a directory" in last_line
    assert recorded_runs == []
