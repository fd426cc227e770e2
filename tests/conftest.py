import json
import os
import pathlib
import sys

import pytest
import ray
from test_objectives import METHOD_ARGS, tiny_config

from micl.driver import connect_ray, run_pretraining
from micl.objectives import OBJECTIVES

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray's usage statistics off for the session's Ray, as for the simulated clusters: with them on,
# every Ray Data execution reports to a detached collector actor (one more process, and a
# payload of up to 100 executions rewritten to the GCS on each report) and polls Prometheus
# every 10 s. The demo's console test gives its own Ray the user's default back.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # the benchmarks' machine description, /proc/stat
from _common import cpu_summary  # noqa: E402
from suite_idle import machine_busy_s  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    # The product's own start of a local Ray (tests/ on the workers' path for toy_method.py),
    # without the dashboard: no test asks this Ray's state API (the simulated clusters of
    # test_cluster.py and test_multinode.py have their own), and it is ~5 % of a fit's CPU.
    connect_ray(num_cpus=2, address="local", paths=[str(ROOT / "tests")], dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def pretrain_store(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("pretrain")


@pytest.fixture(scope="session")
def micl_run(ray_local, pretrain_store):
    """(config, result) of one MiCL run of the pipeline, shared by the tests that inspect a
    pre-training run: the MimCo teacher, the evaluated run, the fine-tuned encoder. It fits in
    local mode (run.num_workers = 0), as these tests inspect what the loop made, not how
    workers ran it (tests/test_multinode.py fits MiCL with workers, test_pipeline.py a
    method of its own). A step hook records which samples each step trained on."""
    cfg = tiny_config(pretrain_store, "micl", "run.name=micl-teacher", "run.num_workers=0")
    steps = pretrain_store / "micl-steps.jsonl"  # [epoch, sample ids], one line per step

    def record_batch(info) -> None:
        ids = [int(i) for batch in info.batches for i in batch["sample_id"].tolist()]
        with steps.open("a") as f:
            f.write(json.dumps([info.epoch, ids]) + "\n")

    return cfg, run_pretraining(cfg, hooks=[record_batch])


@pytest.fixture
def toy_registered():
    """tests/toy_method.py registers its method on import (driver and workers, via
    run.import_modules); take it out of this process's registry afterwards so other tests
    see the built-ins only."""
    METHOD_ARGS["toy_views"] = []
    yield
    OBJECTIVES.pop("toy_views", None)
    METHOD_ARGS.pop("toy_views")
    sys.modules.pop("toy_method", None)


MODULE_SECONDS: dict[str, float] = {}  # test file -> its tests' setup + call + teardown
# test file -> the machine's busy CPU-seconds while its tests ran (every process's, Ray's too):
# what a slower machine, or a CPU quota such as benchmarks/slow_machine.sh's, charges for it.
MODULE_CPU: dict[str, float] = {}
BUSY_AT_START: dict[str, float] = {}  # test id -> the machine's busy seconds when it started
HAS_PROC_STAT = pathlib.Path("/proc/stat").exists()  # Linux


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    if HAS_PROC_STAT:
        BUSY_AT_START[nodeid] = machine_busy_s()


def pytest_runtest_logfinish(nodeid: str, location: object) -> None:
    if nodeid in BUSY_AT_START:
        module = nodeid.split("::")[0]
        busy = machine_busy_s() - BUSY_AT_START.pop(nodeid)
        MODULE_CPU[module] = MODULE_CPU.get(module, 0.0) + busy


def pytest_runtest_logreport(report) -> None:
    module = report.nodeid.split("::")[0]
    MODULE_SECONDS[module] = MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    """Under the result: where the time and the CPU went, by test file, and on what machine,
    so that every run's log (CI's included) can be held to the suite's 12-minute budget and
    the simulated cluster's 3 minutes. Under a CPU quota of q CPUs (benchmarks/slow_machine.sh)
    a file takes at least its CPU-seconds / q (BENCHMARKS.md, "The suite's CPU")."""
    slowest = sorted(MODULE_SECONDS.items(), key=lambda kv: -kv[1])[:6]
    terminalreporter.write_line("slowest files: " + ", ".join(
        f"{pathlib.Path(name).name} {seconds:.0f} s" + (
            f" ({MODULE_CPU[name]:.0f} CPU-s)" if name in MODULE_CPU else "")
        for name, seconds in slowest))
    if MODULE_CPU:
        terminalreporter.write_line(
            f"CPU-seconds of the machine while tests ran: {sum(MODULE_CPU.values()):.0f}")
    terminalreporter.write_line(f"machine: {cpu_summary()}")
