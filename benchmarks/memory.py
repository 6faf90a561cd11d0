"""Peak memory of the demo: training with its recipe, then sampling from the checkpoint it wrote.

    python benchmarks/memory.py [--steps 30] [--json OUT]

Each command runs as its own process, exactly as a user starts it (``flowvid data make-synthetic``,
``flowvid fit --config recipes/demo/shapes_t2v.yaml``, ``flowvid generate``), on a small synthetic
dataset in a temporary folder; its peak resident set size (RSS) is read from the kernel when it exits.
RSS counts everything the process holds: the Python interpreter, torch and Lightning (the "imports"
row is that floor alone), the model, optimiser state, activations and the data pipeline.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_all import benchmark_parser, positive_int, save_result

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "demo" / "shapes_t2v.yaml"
FLOWVID = [sys.executable, "-m", "flowvid.cli"]


#: Runs a command as its own child and writes that child's peak RSS (KiB) to a file. A child started
#: directly by a large process would report at least its parent's high-water mark (Linux carries it over
#: exec), so the command is started from this small interpreter instead.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as handle:
    handle.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(command: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``command``; its peak RSS in MiB and its wall time in seconds. Raises with its log if it fails."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "maxrss"
        started = time.perf_counter()
        completed = subprocess.run([sys.executable, "-c", LAUNCHER, str(report), *command], cwd=cwd, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
        if completed.returncode:
            raise RuntimeError(f"{' '.join(command)} failed (exit {completed.returncode}):\n{completed.stdout[-3000:]}")
        return int(report.read_text()) / 1024, seconds


def measure(steps: int) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory(prefix="flowvid-memory-") as folder:
        work = Path(folder)
        rows["imports only (flowvid.cli, flowvid.lit, flowvid.sampling)"] = run_measured(
            [sys.executable, "-c", "import flowvid.cli, flowvid.lit, flowvid.sampling"], ROOT)
        run_measured([*FLOWVID, "data", "make-synthetic", "--out", str(work / "shapes"), "--num-videos", "64",
                      "--frames", "8", "--size", "16", "--seed", "0"], ROOT)
        rows[f"demo training ({steps} steps of the recipe)"] = run_measured(
            [*FLOWVID, "fit", "--config", str(RECIPE),
             "--data.init_args.train_dir", str(work / "shapes" / "train"),
             "--data.init_args.val_dir", str(work / "shapes" / "val"),
             "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
             "--trainer.default_root_dir", str(work / "run"), "--trainer.enable_progress_bar", "false"], ROOT)
        checkpoint = next((work / "run" / "checkpoints").glob("*.ckpt"))
        rows["demo sampling (flowvid generate, 4 captions, Jacobi)"] = run_measured(
            [*FLOWVID, "generate", "--ckpt", str(checkpoint), "--out", str(work / "videos"),
             "--prompt", "a red square moves right", "--prompt", "a blue circle moves down",
             "--prompt", "a green triangle moves left", "--prompt", "a yellow square moves up"], ROOT)
    return {name: {"peak_rss_mib": rss, "seconds": seconds} for name, (rss, seconds) in rows.items()}


def markdown(rows: dict) -> str:
    lines = ["| process | peak RSS (MiB) | wall time (s) |", "|---|---|---|"]
    lines += [f"| {name} | {row['peak_rss_mib']:.0f} | {row['seconds']:.0f} |" for name, row in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--steps", type=positive_int, default=30, help="training steps of the demo recipe")
    args = parser.parse_args(argv)
    rows = measure(args.steps)
    print(markdown(rows))
    save_result(args.json, args, {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
