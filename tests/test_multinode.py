"""A Ray cluster of several nodes on this machine, as `cluster.yaml` lays one out: a head that
runs no work, "trainer" nodes carrying a custom resource that stands in for GPUs (the training
workers request it, as they would `GPU`), CPU-only data nodes labelled `micl-role=data`, a
real `mlflow server` (SQLite, artifacts on the shared storage) and one directory standing in
for the shared file system. Each node is a `ray start --block` process of its own; logical CPU
counts exceed the two physical cores, so models and data are tiny.

One job, submitted with `ray job submit --working-dir`, pre-trains with 2 workers on the 2
trainer nodes while the test kills one trainer node whole (its raylet, workers and agents, by
pid) after the first epoch and adds a fresh trainer node: the run must restart its worker group
there, resume from the shared checkpoint and finish with restarts = 1 and no epoch logged twice,
its decode/mask tasks all on the data nodes (the state API says where each task ran), its
metrics and logged encoder on the MLflow server.

Processes are stopped by pid, never with `ray stop` (see tests/test_cluster.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
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

from micl.config import load_config

DATA_LABEL = {"micl-role": "data"}
TRAINER_RESOURCE = "trainer"  # the stand-in for GPU: a training worker requests 1
EPOCHS = 3


def node_env() -> dict[str, str]:
    # Nodes start side by side on 2 busy cores: give a raylet more than Ray's 30 s to register.
    return {**ray_env(), "RAY_raylet_start_wait_time_s": "120"}


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    tree: dict[int, int] = field(default_factory=dict)  # pid -> start time, at the last look
    node_id: str | None = None

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
        log = self.root / f"ray-{name}.log"
        proc = subprocess.Popen([RAY_CLI, "start", "--block", "--disable-usage-stats",
                                 "--object-store-memory", str(200 * 2**20), "--num-gpus", "0",
                                 *args], env=node_env(), stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, log)
        self.nodes.append(node)
        return node

    def _wait(self, ready, node: Node, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if node.proc.poll() is not None or time.monotonic() > deadline:
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
                          "--dashboard-agent-listen-port", str(agent)]
        nodes = [self._start_alone(name, args[name]) for name in args]
        for i, node in enumerate(nodes):
            try:
                self._wait(lambda n=node: self.node_id(n.name) is not None, node)
            except RuntimeError:
                node = nodes[i] = self._start_alone(node.name, args[node.name])
                self._wait(lambda n=node: self.node_id(n.name) is not None, node)
            node.node_id = self.node_id(node.name)
        return nodes

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
        """Every node at once: SIGTERM lets each `ray start --block` stop what it started;
        whatever outlives a grace period gets SIGKILL, by pid."""
        procs: dict[int, int] = {}
        for node in self.nodes:
            procs.update(node.processes())
            if node.proc.poll() is None:
                node.proc.terminate()
        survivors = _wait_gone(procs, timeout=5)  # the rest of a drain is not worth waiting for
        _signal_all(survivors, 9)
        _wait_gone(survivors, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextmanager
def mlflow_server(root: Path, artifacts: Path, port: int | None = None) -> Iterator[str]:
    """`mlflow server` on a loopback port (a free one unless given), SQLite backend at
    root/mlflow.db, artifacts proxied to `artifacts` (what cluster.yaml's head runs); stopped
    by pid."""
    port = port or free_ports(1)[0]
    log = root / f"mlflow-server-{port}-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(artifacts),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _http_ok(f"{url}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        procs = process_tree(proc.pid)
        _signal_all(procs, 15)
        _signal_all(_wait_gone(procs, timeout=10), 9)


def job_config(root: Path, shared: Path, tracking: str) -> Path:
    cfg = {
        "model": {"name": "vit_tiny", "img_size": 16, "patch_size": 4, "in_chans": 3,
                  "embed_dim": 32, "depth": 2, "num_heads": 2},
        "data": {"source": "synthetic", "synthetic_size": 256, "batch_size": 16,
                 "map_batch_size": 16, "knn_bank_size": 64, "knn_query_size": 32,
                 "data_cpus": 0.5, "node_labels": DATA_LABEL},
        "method": {"name": "micl", "mask_ratio": 0.5},
        "optim": {"blr": 1.0e-3, "epochs": EPOCHS, "warmup_epochs": 1},
        "run": {"name": "multinode", "num_workers": 2, "cpus_per_worker": 0.5,
                "worker_resources": {TRAINER_RESOURCE: 1}, "torch_threads": 1,
                "max_failures": 1, "eval_every": EPOCHS, "system_metrics_every_s": 0,
                # a file:// URI: the code path of s3:// and other pyarrow file systems
                "storage_path": (shared / "runs").as_uri(), "tracking_uri": tracking},
    }
    path = root / "multinode.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    load_config(path)
    return path


def wait_for_epoch(client, experiment: str, epoch: int, job, timeout: float = 300) -> str:
    """The run id once its MLflow run has logged `epoch`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and runs[0].data.metrics.get("epoch", 0) >= epoch:
            return runs[0].info.run_id
        if job.poll() is not None:
            raise AssertionError(f"the job ended before epoch {epoch}")
        time.sleep(0.3)
    raise AssertionError(f"no epoch {epoch} within {timeout} s")


def trainer(name: str) -> tuple[str, float, dict[str, float], dict[str, str]]:
    return name, 1, {TRAINER_RESOURCE: 1}, {}


def data_node(name: str) -> tuple[str, float, dict[str, float], dict[str, str]]:
    return name, 1, {}, DATA_LABEL


@pytest.mark.e2e
def test_a_job_on_several_nodes_survives_losing_a_trainer_node(tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors, list_tasks

    shared = tmp_path / "shared"  # the "NFS" every node sees
    with ExitStack() as stack:
        t0 = time.monotonic()
        cluster = SimulatedCluster(tmp_path)
        stack.callback(cluster.stop)
        first, second, *data_nodes = cluster.add([trainer("trainer-1"), trainer("trainer-2"),
                                                  data_node("data-1"), data_node("data-2")])
        tracking = stack.enter_context(mlflow_server(tmp_path, shared / "mlartifacts"))
        started = time.monotonic() - t0
        job_log = tmp_path / "job.log"
        job = subprocess.Popen(
            [RAY_CLI, "job", "submit", "--address", cluster.url, "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}), "--", "python",
             "pipelines/pretrain.py", "--config", str(job_config(tmp_path, shared, tracking))],
            env=ray_env(), stdout=job_log.open("w"), stderr=subprocess.STDOUT)
        stack.callback(lambda: job.poll() is None and job.kill())
        client = MlflowClient(tracking)
        run_id = wait_for_epoch(client, "micl-pretrain", 1, job)
        killed_at = time.time()
        cluster.kill(first)
        (spare,) = cluster.add([trainer("trainer-3")])  # capacity for the restarted group
        assert job.wait(timeout=600) == 0, job_log.read_text()[-4000:]
        finished = time.time()
        tasks = list_tasks(address=cluster.url, detail=True, limit=10000,
                           raise_on_missing_output=False)
        actors = list_actors(address=cluster.url, detail=True, limit=1000,
                             raise_on_missing_output=False)
        inspected = time.time()

        # Where the work ran: every decode/mask task on a data node, every training worker on a
        # trainer node (both of the first group, then the surviving one and the spare).
        data_ids = {n.node_id for n in data_nodes}
        mappers = [t for t in tasks if "_TrainMapper" in t.name or "_EvalMapper" in t.name]
        assert mappers, sorted({t.name for t in tasks})
        assert {t.node_id for t in mappers} <= data_ids, \
            [(t.name, t.node_id) for t in mappers if t.node_id not in data_ids][:5]
        workers = {a.node_id for a in actors if a.class_name == "RayTrainWorker"}
        assert workers == {first.node_id, second.node_id, spare.node_id}, workers

        # The run: one restart, resumed from the shared checkpoint, every epoch logged once, its
        # metrics, artifacts and logged encoder on the MLflow server.
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["restarts"] == 1 and run.data.metrics["epoch"] == EPOCHS
        epochs = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in epochs) == list(range(1, EPOCHS + 1))
        # run.eval_every = EPOCHS: the random encoder (step 0) and the last epoch only
        knn = client.get_metric_history(run_id, "knn_top1")
        assert sorted(m.step for m in knn) == [0, EPOCHS]
        log = job_log.read_text()
        assert "[micl] restart 1: resuming from epoch" in log, log[-4000:]
        # What was uploaded: the code, not the virtualenv, the git history or local runs.
        unpacked = cluster.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
        [package] = [p for p in unpacked.glob("_ray_pkg_*") if p.is_dir()]
        shipped = {p.name for p in package.iterdir()}
        assert {"micl", "pipelines", "pyproject.toml"} <= shipped
        assert not shipped & {".venv", ".git", "runs", "mlartifacts", "mlflow.db"}, shipped
        assert list((shared / "runs" / "multinode").glob("checkpoint_*"))
        assert {a.path for a in client.list_artifacts(run_id, "encoder")} == \
            {"encoder/encoder_timm.pth", "encoder/timm_model.json"}
        assert list((shared / "mlartifacts").rglob("encoder_timm.pth"))
        models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
        assert [(m.name, m.source_run_id) for m in models] == [("micl_encoder", run_id)]
        after = [m.timestamp / 1e3 - killed_at for m in epochs if m.timestamp / 1e3 > killed_at]
        print(f"\ncluster + mlflow server up in {started:.1f} s; trainer node killed after epoch "
              f"1; next epoch logged {min(after):.1f} s later; run finished "
              f"{finished - killed_at:.1f} s after the kill; checks {inspected - finished:.1f} s")
