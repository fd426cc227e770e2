"""Every process a command starts, with when it was first and last seen, its CPU seconds and
the names it went by: where a cpu_by_process.py total comes from, process by process (which
Ray worker started when, became what, and how long it lived).

    python benchmarks/process_timeline.py --out t.json -- python -m pytest -q tests/test_tune.py
    python benchmarks/process_timeline.py --show t.json      # print a saved timeline again

Samples /proc every 0.5 s (a process that lives less than that can be missed). The JSON maps
pid -> {"first", "last" (seconds since the start), "cpu" (user + system seconds), "ppid",
"names" (its command lines in order: a Ray worker's becomes ray::<actor or task>)}. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def look(pid: str) -> tuple[str, float, int] | None:
    """(command line, CPU seconds, parent pid), or None when the process is gone."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    cmd = " ".join(a.decode(errors="replace") for a in argv if a)[:300]
    return cmd, (int(fields[11]) + int(fields[12])) / TICK, int(fields[1])


def record(command: list[str]) -> tuple[int, dict[str, dict]]:
    before = set(filter(str.isdigit, os.listdir("/proc")))
    t0 = time.monotonic()
    proc = subprocess.Popen(command)
    seen: dict[str, dict] = {}
    while True:
        done = proc.poll() is not None
        now = round(time.monotonic() - t0, 1)
        for pid in set(filter(str.isdigit, os.listdir("/proc"))) - before:
            info = look(pid)
            if info is None:
                continue
            cmd, cpu, ppid = info
            rec = seen.setdefault(pid, {"first": now, "names": [], "ppid": ppid})
            rec["last"], rec["cpu"] = now, cpu
            if cmd.strip() and (not rec["names"] or rec["names"][-1] != cmd):
                rec["names"].append(cmd)
        if done:
            return proc.returncode, seen
        time.sleep(0.5)


def show(seen: dict[str, dict], min_cpu: float) -> None:
    for pid, r in sorted(seen.items(), key=lambda kv: kv[1]["first"]):
        if r["cpu"] >= min_cpu:
            names = " | ".join(n[:80] for n in r["names"][-2:])
            print(f"{r['first']:7.1f} {r['last']:7.1f} {r['cpu']:6.1f} {pid:>7}  {names}")
    print(f"{len(seen)} processes, {sum(r['cpu'] for r in seen.values()):.1f} CPU-s in all")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="the JSON file to write")
    p.add_argument("--show", type=Path, help="print this saved timeline instead")
    p.add_argument("--min-cpu", type=float, default=0.3,
                   help="print the processes that used more CPU seconds (default 0.3)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    a = p.parse_args()
    if a.show:
        show(json.loads(a.show.read_text()), a.min_cpu)
        return 0
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command or not a.out:
        p.error("give --out FILE and the command to run after --, or --show FILE")
    code, seen = record(command)
    a.out.write_text(json.dumps(seen, indent=0))
    show(seen, a.min_cpu)
    return code


if __name__ == "__main__":
    sys.exit(main())
