"""Start-up time of the command line beside `python -c "import torch"` (issue 32: `--version` and `--help` must
not import torch). Median of N runs of each command, as separate processes, measured side by side.

    python benchmarks/startup.py [--runs 5] [--out benchmarks/results/DATE_MACHINE_startup.txt]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "camloc --version": ["camloc", "--version"],
    "camloc --help": ["camloc", "--help"],
    "camloc eval --help": ["camloc", "eval", "--help"],
    "camloc eval (usage error)": ["camloc", "eval"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
}


def median_seconds(argv: list[str], runs: int) -> float:
    times = []
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, capture_output=True, env=env)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if shutil.which("camloc") is None:
        sys.exit("camloc is not on PATH: pip install -e . first")
    lines = [f"# start-up, median of {args.runs} runs each, {platform.node()} ({os.cpu_count()} cores), "
             f"{time.strftime('%Y-%m-%d')}"]
    torch_time = median_seconds(COMMANDS['python -c "import torch"'], args.runs)
    for label, argv in COMMANDS.items():
        seconds = torch_time if "torch" in label else median_seconds(argv, args.runs)
        lines.append(f"{label:28s} {seconds:6.2f} s   ({seconds / torch_time:4.2f} x import torch)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
