"""``make bench``: every benchmark in turn, each printing its own markdown table.

Run on an otherwise idle machine; the numbers go into docs/benchmarks.md with the machine they ran on.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = [
    ["train_throughput.py"],
    ["sampling.py", "--perturb", "0.02"],
    ["sampling.py", "--config", "large", "--repeats", "2"],
    ["data.py"],
]


def main() -> int:
    failed = []
    for script, *args in BENCHMARKS:
        print(f"\n## {script} {' '.join(args)}\n", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *args]).returncode:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
