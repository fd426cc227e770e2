"""A Ray cluster of several nodes on this machine, as `cluster.yaml` lays one out: a head that
runs no work, "trainer" nodes carrying a custom resource that stands in for GPUs (the training
workers request it, as they would `GPU`), CPU-only data nodes labelled `micl-role=data`, a
real `mlflow server` (SQLite, artifacts on the shared storage) and one directory standing in
for the shared file system. Each node is a `ray start --block` process of its own; logical CPU
counts exceed the two physical cores, so models and data are tiny. One cluster serves the
module; every run reaches it through `ray job submit --working-dir`, as a user's would.

- `pipelines/pretrain.py`, submitted with its working directory (2 workers on an ImageFolder
  with bad files, global negatives, gradient accumulation, one kept checkpoint), meets three
  failures one after another (tests/cluster_job.py runs it with a hook that holds rank 0 at
  known steps, so that each comes at a known point): a data node is killed mid-epoch (the epoch
  must still train on every sample exactly once), a trainer node running a worker is killed
  whole in epoch 2 (the worker group restarts on the survivor and the spare trainer node from
  the shared checkpoint: restarts = 1, no epoch logged twice), and the MLflow server stops and
  comes back while the restarted group redoes epoch 2 (one warning each way; every metric value
  arrives). The upload holds the code, not the virtualenv or local runs.
- Then, in the same job and driver, `pipelines/tune.py` runs a search whose two trials run
  side by side, one on each trainer node left, nested under their parent run on the server.
  Each trial has one worker, so it trains in its own process, which holds the trainer resource
  (micl.tune): no Ray Train worker starts. One job for both spares a second driver, job
  supervisor and set of decode processes (tests/cluster_job.py); the fixture `faults_run` runs
  it, and each test checks its half.

Wherever a run's read and decode/mask tasks ran, the state API says so: on the data nodes only.
Processes are stopped by pid, never with `ray stop` (see tests/test_cluster.py).

The simulated nodes share one session directory, so every node unpacks the job's package into
the same place, and a node that meets it first deletes and unpacks it again in place, under
the job's driver (tests/cluster_job.py steps back into its directory before the search). On a
real cluster each node unpacks to its own disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_image_folder, metric_history, sqlite_uri
from test_cluster import (
    RAY_CLI,
    ROOT,
    UPLOAD_EXCLUDES,
    VENV_BIN,
    _http_ok,
    _signal_all,
    _wait_gone,
    free_ports,
    process_tree,
    ray_env,
)

from micl.artifacts import STATE_FILE
from micl.config import load_config
from micl.data.sources import stable_sample_id
from micl.driver import IDLE_WORKER_KEEP_MS
from micl.tracking import SERVER_ENV

DATA_LABEL = {"micl-role": "data"}
TRAINER_RESOURCE = "trainer"  # the stand-in for GPU: a training worker requests 1


def node_env() -> dict[str, str]:
    # Nodes start side by side on 2 busy cores: give a raylet more than Ray's 30 s to register.
    # The head's GCS checks each raylet every second instead of every 3 s: a killed node (its
    # port refuses at once) is declared dead after 5 failed checks: 4.0-4.7 s after the kill
    # instead of 12.5-12.8 s (the test's own figures, docs/cluster.md).
    # A busy but live raylet is safe: a check fails only when it gets no answer in 10 s.
    # And each node keeps an idle worker process 60 s, as micl's local Ray does (driver.py,
    # IDLE_WORKER_KEEP_MS): a 1-CPU node otherwise ends it after 1 s whenever its CPU is held,
    # and the next epoch's (or attempt's) tasks start Python and their imports again.
    # Six nodes share two cores, so what each node does every few seconds counts six times and
    # grows with the run's length: without Ray's metrics export (for Prometheus; no test reads
    # it) and its memory monitor (a raylet reads memory use every 250 ms to pick a worker to
    # kill before the kernel's OOM killer acts; the whole machine used at most 7 of its 24 GiB
    # in this module), the nodes' agents and raylets spent 11 CPU-s less over the module in a
    # pair of runs under the slow-machine emulation, and the idle cluster 0.09 CPU-s a second
    # instead of 0.10-0.12 (BENCHMARKS.md, "The simulated cluster's floor").
    return {**ray_env(), "RAY_raylet_start_wait_time_s": "120",
            "RAY_health_check_period_ms": "1000",
            "RAY_idle_worker_killing_time_threshold_ms": str(IDLE_WORKER_KEEP_MS),
            "RAY_enable_metrics_collection": "0", "RAY_memory_monitor_refresh_ms": "0"}


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    tree: dict[int, int] = field(default_factory=dict)  # pid -> start time, at the last look
    node_id: str | None = None
    raylet_started: bool = False  # its raylet made its sockets (so a raylet ran)

    def raylet_alive(self) -> bool:
        """Whether a raylet is among the node's processes now. `ray start --block` outlives a
        raylet that dies at start (seen: `bind: Address already in use`, a port another node
        took first), so the node's own process says nothing about it."""
        for pid in process_tree(self.proc.pid):
            with suppress(OSError):
                argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
                if argv0.endswith(b"/raylet"):
                    return True
        return False

    def processes(self) -> dict[int, int]:
        """The node's processes now (workers come and go) plus every one seen before."""
        self.tree = {**self.tree, **process_tree(self.proc.pid)}
        return self.tree


class SimulatedCluster:
    """`ray start` processes on this machine: a head with no CPUs, then nodes added by role."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # A short temp dir: Unix socket paths are limited to ~107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="micl-mn-", dir="/tmp"))
        self.nodes: list[Node] = []
        self.gcs_port, dashboard, self.client_port, agent = free_ports(4)
        self.url = f"http://127.0.0.1:{dashboard}"
        self.head = self._start("head", ["--head", "--num-cpus", "0", "--port", str(self.gcs_port),
                                         "--dashboard-host", "127.0.0.1", "--dashboard-port",
                                         str(dashboard), "--ray-client-server-port",
                                         str(self.client_port), "--temp-dir", str(self.temp_dir),
                                         "--dashboard-agent-listen-port", str(agent)])
        self._wait(lambda: _http_ok(f"{self.url}/api/jobs/"), self.head)

    def _start(self, name: str, args: list[str]) -> Node:
        tries = sum(n.name == name for n in self.nodes)  # a retried node keeps both logs
        log = self.root / (f"ray-{name}.log" if not tries else f"ray-{name}-retry{tries}.log")
        proc = subprocess.Popen([RAY_CLI, "start", "--block", "--disable-usage-stats",
                                 "--object-store-memory", str(200 * 2**20), "--num-gpus", "0",
                                 *args], env=node_env(), stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, log)
        self.nodes.append(node)
        return node

    def _wait(self, ready, node: Node, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        dead_since = None  # when its raylet, once started, was first seen gone
        while not ready():
            if node.raylet_started and not node.raylet_alive():
                dead_since = dead_since or time.monotonic()
            else:
                dead_since = None
            if node.proc.poll() is not None or time.monotonic() > deadline or \
                    (dead_since is not None and time.monotonic() - dead_since > 3):
                raise RuntimeError(f"ray node {node.name} did not start:\n{node.log.read_text()}")
            time.sleep(0.5)
        node.processes()

    def add(self, specs: list[tuple[str, float, dict[str, float], dict[str, str]]]
            ) -> list[Node]:
        """Start nodes (name, CPUs, custom resources, labels) side by side; wait for all. A
        node that fails to come up on the busy machine is started once more."""
        args = {}
        for name, cpus, resources, labels in specs:
            (agent,) = free_ports(1)
            labels = {**labels, "micl-node": name}
            args[name] = ["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(cpus),
                          "--resources", json.dumps(resources),
                          "--labels", ",".join(f"{k}={v}" for k, v in labels.items()),
                          "--dashboard-agent-listen-port", str(agent),
                          # One log monitor per host, as Ray asks: the head's reads every
                          # node's logs in the shared session directory; more would each read
                          # them all again (and send drivers every line once per node).
                          "--include-log-monitor", "false"]
        nodes = [self._start_alone(name, args[name]) for name in args]
        for i, node in enumerate(nodes):
            try:  # healthy nodes register in 3-15 s here, 60 s on a machine busy with a run;
                # a node whose raylet died at start is started again at once, not after 90 s
                self._wait(lambda n=node: self.node_id(n.name) is not None, node, timeout=90)
            except RuntimeError:
                self.keep_logs(f"failed-start-{node.name}")
                self.kill(node)  # what is left of the first try must not join later
                node = nodes[i] = self._start_alone(node.name, args[node.name])
                self._wait(lambda n=node: self.node_id(n.name) is not None, node)
            node.node_id = self.node_id(node.name)
        return nodes

    def keep_logs(self, name: str) -> None:
        """Copy the raylets' and the GCS's logs to root/<name>: the session directory goes
        with the cluster, and a node that hung in its start says why only there."""
        logs = self.temp_dir / "session_latest" / "logs"
        (self.root / name).mkdir(exist_ok=True)
        for f in [*logs.glob("raylet*"), *logs.glob("gcs_server*")]:
            with suppress(OSError):
                shutil.copy(f, self.root / name / f.name)

    def _start_alone(self, name: str, args: list[str], timeout: float = 60) -> Node:
        """Start a node; return once it holds its sockets. Nodes starting side by side race
        for the same next free socket names (`plasma_store.1`, `raylet.1`: `ray start` has no
        option to name them) and the loser's bind fails; so the next node starts once this
        one holds its sockets, the slow part (registration) still overlapping."""
        sockets = self.temp_dir / "session_latest" / "sockets"
        before = {p.name for p in sockets.iterdir()} if sockets.exists() else set()
        node = self._start(name, args)
        deadline = time.monotonic() + timeout
        while True:
            new = {p.name for p in sockets.iterdir()} - before if sockets.exists() else set()
            if any(n.startswith("plasma_store") for n in new) and \
                    any(n.startswith("raylet") for n in new):
                node.raylet_started = True
                return node
            if node.proc.poll() is not None or time.monotonic() > deadline:
                return node  # _wait reports (or retries) it
            time.sleep(0.2)

    def node_id(self, name: str) -> str | None:
        from ray.util.state import list_nodes

        with suppress(Exception):  # the state API answers once the head's dashboard is up
            for n in list_nodes(address=self.url, detail=True):
                if n.labels.get("micl-node") == name and n.state == "ALIVE":
                    return n.node_id
        return None

    def kill(self, node: Node) -> None:
        """The node is lost at once, as if its machine died: SIGKILL to every process of it."""
        procs = node.processes()
        _signal_all(procs, 9)
        _wait_gone(procs, timeout=10)

    def stop(self) -> None:
        """Every node at once, by pid, with SIGKILL: nothing of a test cluster is worth a
        graceful drain (a worker started since the last look dies with its raylet)."""
        procs: dict[int, int] = {}
        for node in self.nodes:
            procs.update(node.processes())
        _signal_all(procs, 9)
        _wait_gone(procs, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on a loopback port (a free one unless given), SQLite backend at
    root/mlflow.db, artifacts proxied to `artifacts`, without MLflow's job runner (what
    cluster.yaml's head runs); started and stopped by pid, again on the same port when
    restarted."""

    def __init__(self, root: Path, artifacts: Path, port: int | None = None) -> None:
        self.root, self.artifacts = root, artifacts
        self.port = port or free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process; `wait_ready` waits for it to answer (a few seconds)."""
        self.log = self.root / f"mlflow-server-{self.port}-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
             str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=self.log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, **SERVER_ENV})

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while not _http_ok(f"{self.url}/health"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start:\n{self.log.read_text()}")
            time.sleep(0.3)

    def commands(self) -> list[str]:
        """The command lines of the server's processes (one that ends meanwhile is left out)."""
        lines = []
        for pid in process_tree(self.proc.pid):
            with suppress(OSError):
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                             .decode())
        return lines

    def stop(self) -> None:
        if self.proc is not None:
            procs = process_tree(self.proc.pid)
            _signal_all(procs, 15)
            _signal_all(_wait_gone(procs, timeout=10), 9)
            self.proc = None


@contextmanager
def mlflow_server(root: Path, artifacts: Path, port: int | None = None
                  ) -> Iterator[MlflowServer]:
    """A started MlflowServer for the block."""
    server = MlflowServer(root, artifacts, port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------- the cluster


def trainer(name: str) -> tuple[str, float, dict[str, float], dict[str, str]]:
    return name, 1, {TRAINER_RESOURCE: 1}, {}


def data_node(name: str) -> tuple[str, float, dict[str, float], dict[str, str]]:
    return name, 1, {}, DATA_LABEL


# The nodes besides the head (benchmarks/cluster_floor.py starts the same): three trainer nodes,
# a run's two workers and the spare a restarted group moves to; two data nodes.
CLUSTER_NODES = [trainer("trainer-1"), trainer("trainer-2"), trainer("trainer-3"),
                 data_node("data-1"), data_node("data-2")]


@dataclass
class Env:
    root: Path
    shared: Path  # the "NFS" every node sees
    cluster: SimulatedCluster
    server: MlflowServer
    trainers: list[Node]
    data: list[Node]
    started_s: float  # cluster and server up

    def node_ids(self, nodes: list[Node]) -> set[str]:
        return {n.node_id for n in nodes}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("multinode")
    shared = root / "shared"
    with ExitStack() as stack:
        t0 = time.monotonic()
        # The server's store starts as a copy of an empty one (helpers.sqlite_uri): its first
        # start then skips MLflow's migrations, 2-3 CPU-s while the nodes start. A server on a
        # store made from nothing is test_tracking's.
        sqlite_uri(root / "mlflow.db")
        server = MlflowServer(root, shared / "mlartifacts")
        server.launch()  # it comes up while the nodes do
        stack.callback(server.stop)
        cluster = SimulatedCluster(root)
        stack.callback(cluster.stop)
        *trainers, first_data, second_data = cluster.add(CLUSTER_NODES)
        server.wait_ready()
        yield Env(root, shared, cluster, server, trainers, [first_data, second_data],
                  time.monotonic() - t0)


def write_config(env: Env, name: str, *, workers: int, epochs: int, size: int = 64,
                 data: dict | None = None, method: dict | None = None,
                 optim: dict | None = None, **run: object) -> Path:
    cfg = {
        "model": {"name": "vit_tiny", "img_size": 16, "patch_size": 4, "in_chans": 3,
                  "embed_dim": 32, "depth": 2, "num_heads": 2},
        "data": {"source": "synthetic", "synthetic_size": size, "batch_size": 16,
                 "map_batch_size": 16, "knn_bank_size": 64, "knn_query_size": 32,
                 "data_cpus": 0.5, "node_labels": DATA_LABEL, **(data or {})},
        "method": {"name": "micl", "mask_ratio": 0.5, **(method or {})},
        "optim": {"blr": 1.0e-3, "epochs": epochs, "warmup_epochs": 1, **(optim or {})},
        "run": {"name": name, "num_workers": workers, "cpus_per_worker": 0.5,
                "worker_resources": {TRAINER_RESOURCE: 1}, "torch_threads": 1,
                "eval_every": epochs, "system_metrics_every_s": 0,
                # a file:// URI: the code path of s3:// and other pyarrow file systems
                "storage_path": (env.shared / "runs").as_uri(), "tracking_uri": env.server.url,
                **run},
    }
    path = env.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    load_config(path)
    return path


@dataclass
class Job:
    proc: subprocess.Popen
    log: Path
    submission_id: str

    def text(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 600) -> None:
        assert self.proc.wait(timeout=timeout) == 0, self.text()[-4000:]

    def until(self, ready, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended before {what}:\n{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s:\n{self.text()[-4000:]}")
            time.sleep(0.2)


def submit(env: Env, stack: ExitStack, name: str, *entrypoint: str) -> Job:
    """`ray job submit --working-dir <checkout>` of `entrypoint`, its output to <name>.log."""
    log = env.root / f"{name}.log"
    sid = f"{name}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [RAY_CLI, "job", "submit", "--address", env.cluster.url, "--working-dir", str(ROOT),
         "--submission-id", sid, "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}),
         "--", *entrypoint], env=ray_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    stack.callback(lambda: proc.poll() is None and proc.kill())
    return Job(proc, log, sid)


def job_state(env: Env, job: Job, lister, *filters: tuple[str, str, str]) -> list:
    """What the state API's `lister` (list_actors, list_tasks) holds of the job."""
    from ray.job_submission import JobSubmissionClient

    job_id = JobSubmissionClient(env.cluster.url).get_job_info(job.submission_id).job_id
    return lister(address=env.cluster.url, filters=[("job_id", "=", job_id), *filters],
                  detail=True, limit=10000, raise_on_missing_output=False)


def where_it_ran(env: Env, job: Job) -> dict[str, set[str]]:
    """{read or decode/mask task name of the job: node ids it ran on}."""
    from ray.util.state import list_tasks

    mappers: dict[str, set[str]] = {}
    for t in job_state(env, job, list_tasks):  # (a task the stream no longer needed: no node)
        data_task = t.name.startswith("Read") or "_TrainMapper" in t.name or \
            "_EvalMapper" in t.name  # (a read fuses into the decode task that follows it)
        if data_task and t.node_id is not None:
            mappers.setdefault(t.name, set()).add(t.node_id)
    return mappers


def job_actors(env: Env, job: Job, class_name: str) -> list:
    """The state API's records of the job's actors of `class_name`, alive or not."""
    from ray.util.state import list_actors

    return job_state(env, job, list_actors, ("class_name", "=", class_name))


def declared_dead(env: Env, nodes: list[Node]) -> dict[str, float | None]:
    """{node name: when the head declared it dead (time.time() seconds), None if it has not}:
    the GCS stamps a node's end when its health checks fail, so this minus the kill is the
    time Ray took to notice the loss."""
    from ray.util.state import list_nodes

    ends = {n.node_id: n.end_time_ms for n in list_nodes(address=env.cluster.url, detail=True)
            if n.state == "DEAD" and n.end_time_ms}
    return {n.name: ends[n.node_id] / 1e3 if n.node_id in ends else None for n in nodes}


def live_workers(env: Env, job: Job) -> set[str]:
    """Node ids of the job's training workers alive now."""
    return {a.node_id for a in job_actors(env, job, "RayTrainWorker") if a.state == "ALIVE"}


def check_data_nodes_only(mappers: dict[str, set[str]], data: set[str]) -> None:
    assert any("Mapper" in name for name in mappers), f"no decode/mask task: {mappers}"
    elsewhere = {name: ids - data for name, ids in mappers.items() if ids - data}
    assert not elsewhere, elsewhere


# ----------------------------------------------------------------------------- the tests

STEPS = 12  # an epoch's optimizer steps: 768 samples / 2 workers / batch 16 / 2 micro-batches
EPOCHS = 2
SAMPLES = STEPS * 2 * 16 * 2
# Where rank 0 waits for the test: in epoch 1; in epoch 2; twice more in epoch 2 as the
# restarted group redoes it (the first attempt never got there).
PAUSE_DATA, PAUSE_TRAINER, PAUSE_OUTAGE, PAUSE_BACK = 3, STEPS + 2, STEPS + 4, STEPS + 6


def ids_by_epoch(out: Path) -> dict[int, list[int]]:
    """Every sample id each epoch trained on, over both ranks; of an epoch that a restart
    redid, the last attempt's (its steps start again below the ones seen before)."""
    epochs: dict[int, list[int]] = {}
    for rank in (0, 1):
        attempts: dict[int, list[tuple[int, list[int]]]] = {}
        for line in (out / f"ids.{rank}").read_text().splitlines():
            epoch, step, ids = json.loads(line)
            steps = attempts.setdefault(epoch, [])
            if steps and step <= steps[-1][0]:
                steps.clear()  # a restarted group redoes this epoch
            steps.append((step, ids))
        for epoch, steps in attempts.items():
            epochs.setdefault(epoch, []).extend(i for _, ids in steps for i in ids)
    return epochs


@dataclass
class FaultsRun:
    """What the module's one job did: the fault run, then the search (tests/cluster_job.py)."""

    job: Job
    t: dict[str, float]  # when things happened (time.time())
    folder: dict  # the run's ImageFolder (make_image_folder's description)
    out: Path  # the step hook's records
    first_group: set[str]  # node ids of the first worker group
    lost_trainer: Node
    lost_data: Node
    workers: list  # the state API's records of every Ray Train worker the job started
    trials: list  # ... of its search's trial processes
    mappers: dict[str, set[str]]  # read or decode/mask task name -> node ids
    dead_at: dict[str, float | None]  # lost node's name -> when the head declared it dead


def job_inputs(env: Env) -> tuple[dict, list[str], list[str]]:
    """(the ImageFolder's description, pipelines/pretrain.py's arguments, pipelines/tune.py's)
    of the module's job. The run uses what a long run on a real cluster meets and uses: an
    ImageFolder on the shared storage with corrupt, empty and non-image files among the good
    ones (skipped and counted), global negatives (DDP all_gather across the trainer nodes),
    gradient accumulation, and one kept checkpoint."""
    folder = make_image_folder(env.shared / "folder", n_per_class=SAMPLES // 3, size=20)
    make_image_folder(env.shared / "folder", n_per_class=11, size=20, split="val",
                      bad_files=False)
    config = write_config(env, "faults", workers=2, epochs=EPOCHS,
                          max_failures=1, log_every_steps=1, keep_last=1,
                          data={"source": "imagefolder", "path": folder["root"],
                                "max_bad_fraction": 0.05},
                          method={"negatives": "global"}, optim={"grad_accum_steps": 2})
    space = env.root / "space.yaml"
    space.write_text("params:\n  method.mask_ratio: {grid: [0.25, 0.5]}\nscheduler: fifo\n")
    search = write_config(env, "search", workers=1, epochs=1, experiment="micl-cluster-search")
    return folder, ["--config", str(config)], [
        "--space", str(space), "--config", str(search), "--name", "cluster-search", "--out",
        str(env.root / "compare")]


@pytest.fixture(scope="module")
def faults_run(env) -> FaultsRun:
    """`tests/cluster_job.py` submitted once: `pipelines/pretrain.py` meeting a lost data node,
    a lost trainer node and a tracking-server outage, then `pipelines/tune.py` in the same
    driver (one job, one driver: see tests/cluster_job.py)."""
    out = env.shared / "steps"
    lost_data = env.data[0]
    folder, pretrain_args, tune_args = job_inputs(env)
    t: dict[str, float] = {"submitted": time.time()}
    with ExitStack() as stack:
        job = submit(env, stack, "faults", "python", "tests/cluster_job.py", str(out),
                     f"{PAUSE_DATA},{PAUSE_TRAINER},{PAUSE_OUTAGE},{PAUSE_BACK}",
                     "--", *pretrain_args, "--", *tune_args)

        def pause(step: int) -> None:
            job.until(lambda: (out / f"paused.{step}").exists(), f"the pause at step {step}")
            t[f"step {step}"] = time.time()

        def resume(step: int) -> None:
            (out / f"resume.{step}").touch()

        pause(PAUSE_DATA)  # epoch 1 is under way: a data node dies
        t["data node killed"] = time.time()
        env.cluster.kill(lost_data)
        env.data.remove(lost_data)
        resume(PAUSE_DATA)
        pause(PAUSE_TRAINER)  # epoch 1 is checkpointed, epoch 2 under way: a trainer node
        first_group = live_workers(env, job)  # of the three, dies; the spare takes its place
        lost_trainer = next(n for n in env.trainers if n.node_id in first_group)
        t["trainer killed"] = time.time()
        env.cluster.kill(lost_trainer)
        env.trainers.remove(lost_trainer)
        resume(PAUSE_TRAINER)  # for the killed group's rank 0, wherever it was
        pause(PAUSE_OUTAGE)  # the restarted group redoes epoch 2: the tracking server stops
        env.server.stop()
        resume(PAUSE_OUTAGE)
        pause(PAUSE_BACK)  # two steps' metrics later, the run has said so: it comes back
        job.until(lambda: "Training continues" in job.text(), "the warning about the server")
        env.server.start()
        resume(PAUSE_BACK)
        job.until(lambda: "== micl pre-training finished ==" in job.text(), "the run's end")
        t["finished"] = time.time()
        job.wait()
        t["search done"] = time.time()
        mappers = where_it_ran(env, job)
        workers = job_actors(env, job, "RayTrainWorker")
        trials = job_actors(env, job, "ImplicitFunc")
        dead_at = declared_dead(env, [lost_data, lost_trainer])
    return FaultsRun(job, t, folder, out, first_group, lost_trainer, lost_data, workers, trials,
                     mappers, dead_at)


@pytest.mark.e2e
def test_a_run_survives_a_data_node_a_trainer_node_and_the_tracking_server(env, faults_run):
    from mlflow.tracking import MlflowClient

    folder = faults_run.folder
    good_ids = sorted(stable_sample_id(path) for path in folder["good_paths"])
    assert folder["good"] == SAMPLES
    # Every epoch trained on every sample exactly once: the one that lost a data node and the
    # one the restarted group redid while the tracking server was away.
    epochs = ids_by_epoch(faults_run.out)
    assert sorted(epochs) == list(range(EPOCHS))
    for epoch, ids in epochs.items():
        assert sorted(ids) == good_ids, (epoch, len(ids), len(set(ids)))
    # Where it ran: workers on trainer nodes (two of the first group, then the survivor and
    # the spare), every read and decode/mask task on a data node (the lost one included).
    workers = {a.node_id for a in faults_run.workers}
    assert len(faults_run.first_group) == 2 and len(faults_run.workers) == 4 and \
        workers == env.node_ids([faults_run.lost_trainer, *env.trainers]), \
        (faults_run.first_group, workers)
    check_data_nodes_only(faults_run.mappers, env.node_ids([faults_run.lost_data, *env.data]))

    client = MlflowClient(env.server.url)
    [run] = client.search_runs([client.get_experiment_by_name("micl-pretrain").experiment_id],
                               "tags.`micl.run_name` = 'faults'")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.metrics["restarts"] == 1 and run.data.metrics["epoch"] == EPOCHS
    assert run.data.params["method.negatives"] == "global"
    assert metric_history(client, run_id, "restarts") == {1: 0, 2: 1}  # 2: restarted group's
    # The bad files, counted once per epoch: in the epoch whose lost decode tasks Ray Data ran
    # again, and in the one the restarted group streamed again; and every good one trained
    # once, as the run's own `images` metric says too (what a user can check without a hook).
    bad = len(folder["bad"])
    assert metric_history(client, run_id, "skipped") == {1: bad, 2: bad}
    assert metric_history(client, run_id, "images") == {1: SAMPLES, 2: SAMPLES}
    losses = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, EPOCHS + 1))  # none logged twice
    assert sorted(m.step for m in client.get_metric_history(run_id, "knn_top1")) == [0, EPOCHS]
    # Every step's metrics, those logged while the server was away included.
    steps = {m.step for m in client.get_metric_history(run_id, "step/loss")}
    assert steps == set(range(1, EPOCHS * STEPS + 1)), set(range(1, EPOCHS * STEPS + 1)) - steps
    log = faults_run.job.text()
    assert "[micl] restart 1: resuming from epoch 1" in log, log[-4000:]
    assert log.count("Training continues") == 1 and log.count("answers again") == 1, log[-4000:]
    assert "== micl pre-training finished ==" in log
    assert {a.path for a in client.list_artifacts(run_id, "encoder")} == \
        {"encoder/encoder_timm.pth", "encoder/timm_model.json"}
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert [m.name for m in models] == ["micl_encoder"]
    # run.keep_last = 1: only the last epoch's checkpoint is kept on the shared storage. One
    # exception, stated in docs/reference.md: a kill within Ray Train's 2 s poll after a
    # report leaves that checkpoint to the storage fallback, and Ray Train never deletes it.
    kept = kept_epochs(env.shared / "runs" / "faults")
    assert kept in ([EPOCHS], [1, EPOCHS]), kept
    # What was uploaded: the code, not the virtualenv, the git history or local runs.
    shipped = uploaded(env)
    assert {"micl", "pipelines", "pyproject.toml"} <= shipped
    assert not shipped & {".venv", ".git", "runs", "mlartifacts", "mlflow.db"}, shipped
    # The head noticed both losses: each lost node is DEAD in the state API (`ray list nodes`).
    assert all(faults_run.dead_at.values()), faults_run.dead_at
    print_figures(env, faults_run, min(m.timestamp / 1e3 for m in losses if m.step == EPOCHS))


def kept_epochs(run_dir: Path) -> list[int]:
    """The epochs of the checkpoints kept in a run's storage directory."""
    return sorted(torch.load(p / STATE_FILE, weights_only=False)["epoch"]
                  for p in run_dir.glob("checkpoint_*") if p.is_dir())


def uploaded(env: Env) -> set[str]:
    """The top-level names in the job's package, as the nodes unpacked it."""
    unpacked = env.cluster.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    [package] = [p for p in unpacked.glob("_ray_pkg_*") if p.is_dir()]
    return {p.name for p in package.iterdir()}


def print_figures(env: Env, run: FaultsRun, next_epoch: float) -> None:
    """What the losses cost, for docs/cluster.md ("What losing a node costs"): `pytest -s`."""
    t = run.t
    noticed = {what: run.dead_at[node.name] - t[f"{what} killed"] for what, node in
               (("data node", run.lost_data), ("trainer", run.lost_trainer))}
    print(f"\nkilled -> declared dead by the head: data node {noticed['data node']:.1f} s, "
          f"trainer node {noticed['trainer']:.1f} s")
    print(f"cluster + mlflow server up in {env.started_s:.1f} s; job submitted -> step "
          f"{PAUSE_DATA}: {t[f'step {PAUSE_DATA}'] - t['submitted']:.1f} s; trainer node killed "
          f"-> restarted group at step {PAUSE_OUTAGE}: "
          f"{t[f'step {PAUSE_OUTAGE}'] - t['trainer killed']:.1f} s; killed -> epoch "
          f"{EPOCHS} logged: {next_epoch - t['trainer killed']:.1f} s (with the outage); killed "
          f"-> run done: {t['finished'] - t['trainer killed']:.1f} s; run done -> search done: "
          f"{t['search done'] - t['finished']:.1f} s")


@pytest.mark.e2e
def test_a_search_runs_its_trials_side_by_side_on_the_trainer_nodes(env, faults_run):
    from mlflow.tracking import MlflowClient

    log = faults_run.job.text()
    assert "WARNING tune.py" not in log, log[-4000:]  # Tune minds how it is called
    # One trial on each of the two trainer nodes left. A one-worker trial trains in its own
    # process, which holds the worker's resources: no Ray Train worker besides the run's four.
    trials = {a.node_id for a in faults_run.trials}
    assert len(faults_run.trials) == 2 and trials == env.node_ids(env.trainers), trials
    assert len(faults_run.workers) == 4
    client = MlflowClient(env.server.url)
    exp = client.get_experiment_by_name("micl-cluster-search")
    [parent] = client.search_runs([exp.experiment_id], "tags.`micl.role` = 'search'")
    runs = client.search_runs([exp.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(float(t.data.params["method.mask_ratio"]) for t in runs) == [0.25, 0.5]
    assert all(t.info.status == "FINISHED" and "knn_top1" in t.data.metrics for t in runs)
    first, second = sorted(runs, key=lambda t: t.info.start_time)
    assert second.info.start_time < first.info.end_time  # side by side, not one after another
    # (where its decode tasks ran: on the data node left; test_a_run_survives... checks that
    # every read and decode/mask task of the job ran on a data node)
