#!/usr/bin/env bash
# Run a command on "a slower machine": this one, with every process the command starts held to
# a CPU quota (a cgroup's CFS quota, which child processes such as Ray's inherit).
#
#   bash benchmarks/slow_machine.sh 0.85 python pipelines/pretrain.py     # the demo
#   CI=true bash benchmarks/slow_machine.sh 0.85 bash run.sh test         # the suite
#
# The first argument is the CPUs' worth of time the command may use per wall-clock second
# (0.85: 85 ms of CPU per 100 ms, spread over the cores). Calibrate it against the machine to
# stand in for with `benchmarks/step_time.py` (BENCHMARKS.md, "A slower machine, emulated"):
# on the 2-core AMD EPYC development VM, 0.85 makes a training step 2.3-2.4x slower, the range
# of the 2-core machines without AVX-512 that this project's runs have met. Throttling is not a
# slower CPU: a thread can be stopped in the middle of a parallel region, so multi-threaded
# torch loses a little more than the quota says, and far more when this VM itself runs slow:
# at 1.5x its usual step time, 0.6 made a step 1867 ms, so calibrate in the same hour as the
# run. Needs root and a cgroup cpu controller (v1 or v2).
set -euo pipefail
quota=${1:?usage: slow_machine.sh CPUS COMMAND...}
shift
period=100000
us=$(python3 -c "print(int(float('$quota') * $period))")
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then  # cgroup v2
    group=/sys/fs/cgroup/micl-slow
    mkdir -p "$group"
    echo "$us $period" > "$group/cpu.max"
else  # cgroup v1
    group=/sys/fs/cgroup/cpu/micl-slow
    mkdir -p "$group"
    echo "$period" > "$group/cpu.cfs_period_us"
    echo "$us" > "$group/cpu.cfs_quota_us"
fi
echo $$ > "$group/cgroup.procs"
exec "$@"
