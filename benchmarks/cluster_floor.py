"""What the simulated cluster of tests/test_multinode.py costs before any job: its six nodes and
the MLflow server started as the test's fixture starts them, then left idle. (The server starts
on a new store; the fixture's starts on a copy of an empty one, which spares it 2-3 CPU-s.)

    python benchmarks/cluster_floor.py                       # idle machine
    bash benchmarks/slow_machine.sh 0.8 python benchmarks/cluster_floor.py   # emulated slowest

(The quota that emulates the slowest 2-core machine depends on the hour: calibrate it first
with benchmarks/step_time.py, BENCHMARKS.md "The simulated cluster's floor".)

Prints the seconds and CPU-seconds (the whole machine's, from /proc/stat: run it on an
otherwise idle machine) until every node is registered and the server answers, then the
CPU-seconds per second the idle cluster spends, by process kind, over --idle-s seconds. Both
are a floor under the cluster module's time: the start is paid before the job is submitted,
and the idle rate is paid for every second the module runs, so on a slower machine (or under a
CPU quota, where the module runs longer) it takes a larger share of the CPU the job could use.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from process_timeline import look  # noqa: E402
from suite_idle import machine_busy_s  # noqa: E402
from test_multinode import CLUSTER_NODES, MlflowServer, SimulatedCluster  # noqa: E402

# (a Ray agent renames itself: its command line becomes ray::DashboardAgent)
KINDS = ["raylet/raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent",
         "dashboard/dashboard.py", "ray-dashboard-", "log_monitor", "monitor.py", "ray start",
         "mlflow server", "uvicorn", "client.server"]


def cpu_by_kind() -> dict[int, tuple[str, float]]:
    """{pid: (process kind, CPU-seconds so far)} of every process."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if (seen := look(pid)) is not None:
            cmd, cpu, _ = seen
            out[int(pid)] = (next((k for k in KINDS if k in cmd), "other"), cpu)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-s", type=float, default=60)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="micl-floor-"))
    t0, c0 = time.monotonic(), machine_busy_s()
    server = MlflowServer(root, root / "shared" / "mlartifacts")
    server.launch()
    cluster = SimulatedCluster(root)
    try:
        cluster.add(CLUSTER_NODES)
        server.wait_ready()
        print(f"six nodes and the MLflow server up: {time.monotonic() - t0:.1f} s, "
              f"{machine_busy_s() - c0:.1f} CPU-s", flush=True)
        time.sleep(15)  # the agents' first reports and the dashboard's first polls
        before, c1 = cpu_by_kind(), machine_busy_s()
        time.sleep(args.idle_s)
        after, c2 = cpu_by_kind(), machine_busy_s()
    finally:
        cluster.stop()
        server.stop()
    spent: dict[str, float] = collections.Counter()
    for pid, (kind, cpu) in after.items():
        spent[kind] += cpu - before.get(pid, (kind, 0.0))[1]
    print(f"idle: {(c2 - c1) / args.idle_s:.3f} CPU-s per second (the machine); by kind:")
    for kind, cpu in sorted(spent.items(), key=lambda kv: -kv[1]):
        if cpu / args.idle_s >= 0.001:
            print(f"  {cpu / args.idle_s:.3f}  {kind}")


if __name__ == "__main__":
    main()
