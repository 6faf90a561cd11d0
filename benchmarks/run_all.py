"""``make bench``: every benchmark in turn, each in its own process; one Markdown report at the end.

    python benchmarks/run_all.py [--reference PATH] [--quick] [--out-dir DIR]

Sections, in the order of docs/benchmarks.md:

* training throughput and MFU (``train_throughput.py``, at 4 and, without ``--quick``, 16 latent frames),
  side by side with the reference implementation when a checkout of it is given (``--reference`` or the
  ``FLOWVID_REFERENCE`` environment variable); on a CPU with native bf16 (AVX512-BF16 or AMX) also
  under bf16-mixed, with the bf16 and fp32 attention kernels by length (``attention_kernels.py``);
* sampling: sequential vs Jacobi (``sampling.py``, two configurations, and on a CPU with native bf16
  the demo preset under bf16-mixed) and, with the reference, Jacobi against the reference's Jacobi
  (``reference.py``);
* fine-tuning: a training step that updates every weight of the flow against one through LoRA
  (``finetune.py``);
* memory: peak RSS of the demo's training and sampling (``memory.py``);
* data throughput (``data.py``);
* streaming: when the first final frame comes, against sampling the whole video first
  (``streaming.py``; needs the model ``make demo`` trains);
* quality: what negative prompts do to the demo model's samples (``negative_prompt.py``), and its
  caption adherence over several sampling seeds (``adherence.py``); both need the model ``make demo``
  trains;
* thread settings: the same training step under OpenMP's default wait policy (``OMP_WAIT_POLICY``
  unset), ``PASSIVE`` and one thread, alternated (skipped with ``--quick``);
* GPU (``gpu.py``), which says that it is skipped when there is no CUDA device.

Benchmarks run with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (the thread-settings
section shows why); each records the policy it ran under in its JSON (``omp_wait_policy``). Every
benchmark's JSON and the report (``report.md``, with a last section listing what failed) go to
``--out-dir`` (default ``runs/benchmarks``). A benchmark that runs past ``TIMEOUT_S`` is stopped and
counted as failed. Ctrl-C stops the benchmark that is running and ends the run with exit status 130,
the report holding the benchmarks that finished. Numbers depend on the machine and its load; quote them
with their command.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

from flowvid.checks import is_positive_number
from flowvid.paths import check_output_file
from flowvid.placement import cpu_has_native_bf16

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: The model ``make demo`` trains, which the quality measurements read.
DEMO_CHECKPOINT = "demo_out/run/checkpoints/step=00000640.ckpt"

#: How a benchmark's JSON records a run without OMP_WAIT_POLICY: OpenMP then picks its own policy (GNU
#: OpenMP, torch's on Linux: idle threads spin for a while, then sleep).
OPENMP_DEFAULT = "OpenMP's default"
#: Setting name: (OMP_WAIT_POLICY, or None to leave it unset; torch threads).
THREAD_SETTINGS = {
    "2 threads, OpenMP's default wait policy": (None, "2"),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": ("PASSIVE", "2"),
    "1 thread, OMP_WAIT_POLICY=PASSIVE": ("PASSIVE", "1"),
}
#: Far longer than any benchmark takes, even on a loaded 2-core machine: a benchmark still running then
#: has hung, and is stopped so that ``make bench`` ends.
TIMEOUT_S = 2 * 3600
#: What failed in this run, and why: the report's last section, and the exit status.
FAILURES: list[str] = []


def wait_policy() -> str:
    """The OpenMP wait policy of this process, for its JSON. OpenMP reads ``OMP_WAIT_POLICY`` once, when
    torch loads it, and no benchmark changes the variable: what it holds is the policy in effect."""
    return os.environ.get("OMP_WAIT_POLICY", OPENMP_DEFAULT)


def require_model(parser: argparse.ArgumentParser, path: str) -> None:
    """Stop with one line naming ``path``, not a loader's traceback, when the model to measure is missing."""
    if not Path(path).exists():
        parser.error(f"no model at {path} (`make demo` trains one at {DEMO_CHECKPOINT})")


def load_measured_model(parser: argparse.ArgumentParser, option: str, path: str):
    """The model at ``path``, loaded for measuring; one line naming ``option`` and the file, not a loader's
    traceback, when it is missing, damaged or no flow video generator."""
    from flowvid.lit.checkpointing import CorruptCheckpointError
    from flowvid.loading import load_model

    require_model(parser, path)
    try:
        return load_model(path)
    except (OSError, CorruptCheckpointError, ValueError) as error:
        parser.error(f"{option} {path}: {error}")


class DefaultsInHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` ends every option's line with its default, written as it is typed (``--widths 128 256``);
    options that default to nothing (None, an off flag, an empty list) or say their default show none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (default is None or default is False or default == [] or default is argparse.SUPPRESS
                or "(default:" in text or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def benchmark_parser(doc: str, json_option: bool = True) -> argparse.ArgumentParser:
    """The command line every benchmark starts from: the first paragraph of its docstring, defaults shown
    in ``--help`` and, with ``json_option``, ``--json`` (see ``save_result``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=DefaultsInHelp)
    if json_option:
        parser.add_argument("--json", default=None, metavar="OUT", type=json_file,
                            help="also write the results to this file, as JSON")
    return parser


def json_file(text: str) -> str:
    """argparse type of ``--json``: a file that can be written, its folders made if need be; checked before
    anything is measured, so that a run of hours does not end in an error."""
    try:
        check_output_file(text, "", "give a file in it", error=argparse.ArgumentTypeError)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(str(err).strip()) from None
    existing = next(folder for folder in Path(text).absolute().parents if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {existing} is not a folder this user may write in")
    return text


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as JSON, making the file's folder first: a folder not made yet must not cost the
    numbers of a run that has already measured them. Where the file still cannot be written (the disk
    filled up, the folder was removed), the numbers are printed as one JSON line instead, and the run
    ends with status 1 and one line that says why."""
    path = Path(path)
    text = json.dumps(data, indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as err:
        print(json.dumps(data))
        print(f"error: could not write {path} ({err.strerror or err}); the results are the JSON line above",
              file=sys.stderr)
        raise SystemExit(1) from None


def save_result(path: str | None, args: argparse.Namespace, result: dict) -> None:
    """A benchmark's JSON, when ``--json`` asks for one: ``result``, the wait policy it ran under
    (``omp_wait_policy``) and the options it was given (``args``), so that the file says how to rerun it."""
    if path:
        write_json(path, {**result, "omp_wait_policy": wait_policy(), "args": vars(args)})


def integer_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


#: argparse type of counts: a 0 would otherwise end in a traceback, often after minutes of measuring (no
#: median of no rounds), or mean something else entirely (every clip of a folder).
positive_int = integer_at_least(1)
#: argparse type of counts where 0 means "none of it" (no fitting steps).
non_negative_int = integer_at_least(0)


def multiple_of(step: int, what: str):
    """argparse type: a positive multiple of ``step`` (``what`` says why, in the error)."""
    def parse(text: str) -> int:
        value = positive_int(text)
        if value % step:
            raise argparse.ArgumentTypeError(f"must be a multiple of {step} ({what}), got {value}")
        return value

    parse.__name__ = f"multiple of {step}"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if not is_positive_number(value):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def held_out_samples(parser: argparse.ArgumentParser, folder: str, count: int) -> list[dict]:
    """The first ``count`` clips of the held-out shards in ``folder``, read before the model loads: a
    missing folder ends in one line, and a folder with fewer clips says so on stderr."""
    from flowvid.data import ManifestError
    from flowvid.demo import validation_samples

    try:
        samples = validation_samples(Path(folder), count)
    except (ManifestError, OSError) as error:
        parser.error(f"--data {folder}: {error}")
    if len(samples) < count:
        print(f"--samples {count}: {folder} holds only {len(samples)} clips; using those", file=sys.stderr)
    return samples


def run(script: str, arguments: list[str], json_path: Path, env: dict[str, str] | None = None,
        timeout_s: float = TIMEOUT_S) -> str | None:
    """Run a benchmark with ``env`` as its whole environment (default: ours); its output, or None if it
    failed or ran past ``timeout_s``."""
    command = [sys.executable, str(HERE / script), *arguments, "--json", str(json_path)]
    shown = " ".join(["python", f"benchmarks/{script}", *arguments])
    print(f"$ {shown}", flush=True)
    output, failure = run_to_end(command, os.environ.copy() if env is None else env, timeout_s)
    if failure:
        print(f"  failed ({failure}):\n{output[-3000:]}", flush=True)
        FAILURES.append(f"`{shown}`: {failure}")
        return None
    return f"`{shown}`\n\n{output.strip()}"


def run_to_end(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[str, str | None]:
    """Run ``command``: its output, and why it failed (None if it did not)."""
    # A process group of its own, so that stopping it stops whatever it started too (a training run, data
    # loader workers). The terminal's Ctrl-C no longer reaches it, so it is passed on by hand.
    process = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except BaseException as error:
        os.killpg(process.pid, signal.SIGKILL)
        if not isinstance(error, subprocess.TimeoutExpired):
            raise
        output, _ = process.communicate()
        return output, f"timed out after {timeout_s:g} s"
    return output, f"exit {process.returncode}" if process.returncode else None


def thread_settings(out_dir: Path, cycles: int) -> str:
    """Median step time of the width-128 training step under each thread setting, settings alternated.

    A run that did not get the wait policy its setting names counts as failed, not as that setting's."""
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    times: dict[str, list[float]] = {name: [] for name in THREAD_SETTINGS}
    for cycle in range(cycles):
        for index, (name, (policy, threads)) in enumerate(THREAD_SETTINGS.items()):
            path = out_dir / f"threads-{cycle}-{index}.json"
            env = base if policy is None else {**base, "OMP_WAIT_POLICY": policy}
            if not run("train_throughput.py", ["--widths", "128", "--rounds", "3", "--threads", threads], path, env):
                continue
            result = json.loads(path.read_text())
            if result["omp_wait_policy"] != (policy or OPENMP_DEFAULT):
                FAILURES.append(f"thread settings, {name}: ran under {result['omp_wait_policy']}")
                continue
            times[name].append(result["results"][0]["implementations"]["flowvid"]["step_ms"])
    lines = ["`python benchmarks/train_throughput.py --widths 128 --rounds 3 --threads N` under each setting, "
             f"{cycles} alternating cycles, each run's wait policy checked in its JSON", "",
             "| setting | step (ms), median | runs (ms) |", "|---|---|---|"]
    lines += [f"| {name} | {statistics.median(values):.0f} | {', '.join(f'{v:.0f}' for v in values)} |"
              for name, values in times.items() if values]
    return "\n".join(lines)


def report(sections: dict[str, list[str | None]], not_measured: list[str]) -> str:
    """The Markdown report: every section that has something to show, what was left out for want of a
    reference checkout or a demo model, then what failed."""
    parts = [f"## {title}\n\n" + "\n\n".join(part for part in parts if part)
             for title, parts in sections.items() if any(parts)]
    if not_measured:
        parts.append("## Not measured\n\n" + "\n".join(f"* {line}" for line in not_measured))
    if FAILURES:
        parts.append("## Failed\n\n" + "\n".join(f"* {failure}" for failure in FAILURES))
    return "\n\n".join(parts)


def output_folder(parser: argparse.ArgumentParser, folder: str) -> Path:
    """``--out-dir`` as a whole path, made with its parents: the benchmarks run from the repository root,
    not from the caller's folder. One line when it cannot be made (a file of that name, no permission)."""
    out = Path(folder).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out-dir {folder}: {error}")
    return out


def reference_checkout(parser: argparse.ArgumentParser, folder: str) -> Path:
    """``--reference`` as a whole path, checked before the first benchmark: a wrong one would otherwise fail
    every side-by-side benchmark in turn, each in a process that runs from the repository root."""
    from reference import check_reference

    try:
        return check_reference(folder)
    except FileNotFoundError as error:
        parser.error(f"--reference: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, json_option=False)
    parser.add_argument("--reference", default=os.environ.get("FLOWVID_REFERENCE"),
                        help="checkout of apple/ml-starflow (default: $FLOWVID_REFERENCE)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no thread-settings comparison")
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "benchmarks"), metavar="DIR",
                        help="folder of the JSON files and report.md, made if missing")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    reference = ["--reference", str(reference_checkout(parser, args.reference))] if args.reference else []
    out = output_folder(parser, args.out_dir)  # made once every option is found good
    quick = args.quick
    bf16 = cpu_has_native_bf16()  # elsewhere bf16 is emulated, slower than fp32: nothing to measure
    not_measured = []
    if not args.reference:
        not_measured.append("no reference checkout (--reference PATH or FLOWVID_REFERENCE): side-by-side "
                            "comparisons skipped")
    demo_model = (ROOT / DEMO_CHECKPOINT).is_file()
    if not demo_model:
        not_measured.append(f"no {DEMO_CHECKPOINT} (make demo writes it): the streaming and quality measurements "
                            "skipped")
    for line in not_measured:
        print(line)

    plan: dict[str, list[Callable[[], str | None]]] = {
        "Training throughput": [
            lambda: run("train_throughput.py", ["--rounds", "3" if quick else "8", *reference], out / "training.json"),
            lambda: None if quick else run("train_throughput.py", ["--frames", "16", "--batch", "2", "--rounds", "6",
                                                                    *reference], out / "training_16_frames.json"),
            lambda: run("train_throughput.py", ["--precision", "bf16-mixed", "--rounds", "3" if quick else "8",
                                                *reference], out / "training_bf16.json") if bf16 else None,
            lambda: run("attention_kernels.py", ["--lengths", "16", "64", "192", "512"] if quick else [],
                        out / "attention_kernels.json") if bf16 else None,
        ],
        "Sampling": [
            lambda: run("sampling.py", ["--perturb", "0.02", "--repeats", "2" if quick else "3"],
                        out / "sampling.json"),
            lambda: None if quick else run("sampling.py", ["--config", "large", "--repeats", "2"],
                                           out / "sampling_large.json"),
            lambda: run("sampling.py", ["--perturb", "0.02", "--precision", "bf16-mixed",
                                        "--repeats", "2" if quick else "3"], out / "sampling_bf16.json")
            if bf16 else None,
            lambda: run("reference.py", [*reference, "--rounds", "3" if quick else "5"],
                        out / "reference_jacobi.json") if reference else None,
        ],
        "Fine-tuning": [lambda: run("finetune.py", ["--threads", "2", "--rounds", "2" if quick else "8"],
                                     out / "finetune.json")],
        "Memory": [lambda: run("memory.py", ["--steps", "10" if quick else "30"], out / "memory.json")],
        "Data": [lambda: run("data.py", ["--quick"] if quick else [], out / "data.json")],
        "Streaming": [lambda: run("streaming.py", ["--rounds", "1" if quick else "3"], out / "streaming.json")
                      if demo_model else None],
        "Quality": [
            lambda: run("negative_prompt.py", ["--samples", "8" if quick else "16"], out / "negative_prompt.json")
            if demo_model else None,
            lambda: run("adherence.py", ["--seeds", "1234", "1"] if quick else [], out / "adherence.json")
            if demo_model else None,
        ],
        "Thread settings": [lambda: None if quick else thread_settings(out, cycles=2)],
        "GPU": [lambda: run("gpu.py", [], out / "gpu.json")],
    }
    # Run one at a time, so that a Ctrl-C still leaves a report of the benchmarks that finished.
    sections: dict[str, list[str | None]] = {}
    try:
        for title, parts in plan.items():
            sections[title] = []
            for part in parts:
                sections[title].append(part())
    except KeyboardInterrupt:
        # run_to_end has stopped the benchmark that was running; what finished before it is kept.
        later = list(plan)[list(plan).index(title) + 1:]
        FAILURES.append(f"interrupted (Ctrl-C) in {title}: its benchmark then running was stopped"
                        + (f"; not run: {', '.join(later)}" if later else ""))
        (out / "report.md").write_text(report(sections, not_measured) + "\n")
        print(f"interrupted: the benchmarks that finished are in {out / 'report.md'}", file=sys.stderr)
        return 130
    text = report(sections, not_measured)
    (out / "report.md").write_text(text + "\n")
    print(text)
    if FAILURES:
        print(f"failed: {'; '.join(FAILURES)} (listed in {out / 'report.md'})", file=sys.stderr)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    raise SystemExit(main())
