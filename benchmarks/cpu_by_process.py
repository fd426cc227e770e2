"""CPU seconds per kind of process while a command runs: where a run's CPU goes among Ray's
actors, tasks, nodes and the MLflow server, which a profiler of one process cannot show.

    python benchmarks/cpu_by_process.py -- .venv/bin/python -m pytest -q tests/test_multinode.py
    python benchmarks/cpu_by_process.py --top 15 -- python pipelines/pretrain.py

Every process on the machine is sampled once a second (/proc/<pid>/stat: user + system time)
and named by what it runs: a Ray worker by its title (`ray::RayTrainWorker`), a Python process
by its script or module, anything else by its executable; processes that started meanwhile
are counted per name. A process that ends between two
samples loses at most its last second; one that starts and ends between samples is missed, so
the totals are lower bounds. Prints the command's exit code and wall time, then the names by
CPU seconds, then the total. Linux only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def process_name(pid: str) -> str | None:
    """What the process runs, or None when it is gone or has no command line (a zombie)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in argv if a]
    if not args:
        return None
    if args[0].startswith("ray::"):  # a Ray worker names itself after its actor or task
        return args[0].split(" ")[0][:48]
    exe = Path(args[0]).name
    if exe.startswith("python"):
        rest = [a for a in args[1:] if not a.startswith("-")]
        if "-m" in args:  # python -m module
            return f"python -m {args[args.index('-m') + 1]}"
        if "-c" in args:
            return "python -c"
        return f"python {Path(rest[0]).name}" if rest else "python"
    return exe


def cpu_ticks(pid: str) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def sample(seen: dict[str, tuple[str, int]]) -> None:
    """Update {pid: (name, ticks)}; a Ray worker keeps its first name other than ray::IDLE."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        ticks = cpu_ticks(pid)
        if ticks is None:
            continue
        old = seen.get(pid)
        name = process_name(pid)
        if name is None or (name == "ray::IDLE" and old is not None):
            name = old[0] if old is not None else "(unnamed)"
        seen[pid] = (name, ticks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--top", type=int, default=30, help="names to print (default 30)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    a = p.parse_args()
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("give the command to run after --")
    seen: dict[str, tuple[str, int]] = {}
    sample(seen)
    before = {pid: ticks for pid, (_, ticks) in seen.items()}
    t0 = time.monotonic()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        time.sleep(1)
        sample(seen)
    sample(seen)
    wall = time.monotonic() - t0
    totals: Counter[str] = Counter()
    started: Counter[str] = Counter()  # processes of each name that the command's run saw
    for pid, (name, ticks) in seen.items():
        totals[name] += (ticks - before.get(pid, 0)) / TICK
        started[name] += pid not in before
    print(f"\nexit code {proc.returncode}, {wall:.1f} s wall; CPU seconds by process "
          "(and how many such processes started):", file=sys.stderr)
    for name, seconds in totals.most_common(a.top):
        print(f"{seconds:8.1f} {started[name]:4d}  {name}", file=sys.stderr)
    print(f"{sum(totals.values()):8.1f}  in all ({os.cpu_count()} CPUs x {wall:.0f} s = "
          f"{os.cpu_count() * wall:.0f} available)", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
