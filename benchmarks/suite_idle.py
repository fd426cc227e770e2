"""Where the test suite leaves this machine's cores idle, test by test.

Run (from the repository root; as long as the suite itself, about 11-12 min on 2 cores):

    CI=true .venv/bin/python benchmarks/suite_idle.py --top 15            # the whole suite
    .venv/bin/python benchmarks/suite_idle.py -- tests/test_multinode.py  # pytest arguments
    CI=true .venv/bin/python benchmarks/suite_idle.py --by-cpu --top 15   # the costliest tests

It runs pytest in a child process, with this file as a pytest plugin that writes when each
test starts and ends (setup and teardown included), and samples /proc/stat every half second
meanwhile. Per test it prints the wall time, the mean share of all cores in use, and the
idle-equivalent seconds: its idle moments gathered into one stretch in which no core works
(a second with one core of two idle counts 0.5). A test with many idle seconds waits: on a
timeout or a poll interval, which the test can cut, or on one process at a time starting up
(one busy core of two), which only fewer or lighter process start-ups can cut. Run it on an
otherwise idle machine: other work fills the idle moments it is meant to find.

Each test's CPU-seconds (its busy share x its wall time x the cores) are what a CPU quota
charges: under `benchmarks/slow_machine.sh Q` a test cannot take less than its CPU-seconds / Q,
so `--by-cpu` ranks the tests that make the emulated slowest machine slow.
"""

from __future__ import annotations

import argparse
import bisect
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TIMES_ENV = "MICL_SUITE_IDLE_TIMES"  # where the plugin half writes its start/end lines


# ----------------------------------------------------------------------------- pytest plugin


def _record(kind: str, nodeid: str) -> None:
    path = os.environ.get(TIMES_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.2f} {kind} {nodeid}\n")


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    _record("start", nodeid)


def pytest_runtest_logfinish(nodeid: str, location: object) -> None:
    _record("end", nodeid)


# ----------------------------------------------------------------------------- sampling


def cpu_totals() -> tuple[int, int]:
    """(all jiffies, jiffies this machine's work did not use: idle, iowait and steal, the
    hypervisor's time for other guests) since boot, summed over every core. The guest fields
    after steal are already counted in user and nice."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return sum(values), values[3] + values[4] + values[7]


def machine_busy_s() -> float:
    """CPU-seconds the whole machine's processes have used since boot (user, nice, system,
    irq, softirq)."""
    total, idle = cpu_totals()
    return (total - idle) / os.sysconf("SC_CLK_TCK")


class BusySampler(threading.Thread):
    """(time, share of all cores busy) every `period` seconds until stopped."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period, self.samples = period, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        total0, idle0 = cpu_totals()
        while not self._stop_event.wait(self.period):
            total1, idle1 = cpu_totals()
            busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
            self.samples.append((time.time(), busy))
            total0, idle0 = total1, idle1

    def stop(self) -> list[tuple[float, float]]:
        self._stop_event.set()
        self.join()
        return self.samples


def per_test(times_file: Path, samples: list[tuple[float, float]], period: float
             ) -> list[tuple[float, float, float, str]]:
    """(wall s, idle-equivalent s, mean busy share, test id) for each finished test."""
    stamps = [t for t, _ in samples]
    started: dict[str, float] = {}
    rows = []
    for line in times_file.read_text().splitlines():
        stamp, kind, nodeid = line.split(" ", 2)
        if kind == "start":
            started[nodeid] = float(stamp)
            continue
        begin, end = started.pop(nodeid, float(stamp)), float(stamp)
        inside = [b for _, b in samples[bisect.bisect_left(stamps, begin):
                                        bisect.bisect_right(stamps, end)]]
        idle = sum(1 - b for b in inside) * period
        rows.append((end - begin, idle, sum(inside) / len(inside) if inside else 0.0, nodeid))
    return rows


def report(rows: list[tuple[float, float, float, str]], top: int, by_cpu: bool = False) -> str:
    """The `top` tests with the most idle time, or with the most CPU (`by_cpu`): what a CPU
    quota, such as the emulated slowest machine's, makes slow."""
    cores = os.cpu_count() or 1

    def cpu_s(row: tuple[float, float, float, str]) -> float:
        return row[0] * row[2] * cores  # wall x busy share x cores

    wall, idle = sum(r[0] for r in rows), sum(r[1] for r in rows)
    cpu = sum(map(cpu_s, rows))
    lines = [f"{len(rows)} tests, {wall:.0f} s in tests, idle-equivalent {idle:.0f} s "
             f"(cores busy {1 - idle / max(wall, 1e-9):.0%} of the time), {cpu:.0f} CPU-s",
             "", "| test | wall s | cores busy | idle-equivalent s | CPU-s |",
             "| --- | --- | --- | --- | --- |"]
    for row in sorted(rows, key=lambda r: -(cpu_s(r) if by_cpu else r[1]))[:top]:
        w, i, busy, nodeid = row
        lines.append(f"| `{nodeid.split('::', 1)[-1][:80]}` | {w:.1f} | {busy:.0%} | {i:.1f} | "
                     f"{cpu_s(row):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--top", type=int, default=25, help="rows to print")
    p.add_argument("--by-cpu", action="store_true",
                   help="rank the tests by the CPU-seconds they used instead of idle time")
    p.add_argument("--period", type=float, default=0.5, help="seconds between CPU samples")
    p.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments")
    args = p.parse_args(argv)
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as d:
        times = Path(d) / "times.txt"
        times.touch()
        env = {**os.environ, TIMES_ENV: str(times),
               "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
        sampler = BusySampler(args.period)
        sampler.start()
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", Path(__file__).stem,
                                *args.pytest_args], cwd=here.parent, env=env)
        rows = per_test(times, sampler.stop(), args.period)
    print(report(rows, args.top, args.by_cpu))
    return code


if __name__ == "__main__":
    sys.exit(main())
