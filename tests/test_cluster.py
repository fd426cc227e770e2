"""From one machine to a cluster: the deployment files are checked by the tools that consume
them, and the pipeline runs as a real `ray job submit` job.

- `cluster.yaml` goes through Ray's own cluster-config preparation and JSON-schema validation
  (what `ray up` does before it talks to AWS), and its setup commands pin exactly the versions
  of pyproject.toml.
- `deploy/rayjob.yaml` (KubeRay) has a head, a GPU and a CPU worker group, a memory-backed
  /dev/shm that holds the object store, and the same pins.
- `configs/imagenet_vitl16.yaml` loads and validates; storage URIs pass through untouched.
- The end-to-end `ray job submit --working-dir <repo>` runs on a simulated multi-node cluster:
  tests/test_multinode.py, which uses the process helpers below.

Stopping a cluster a test started: `ray stop` will not do. It matches processes by name
(raylet, gcs_server, ...) and terminates every Ray process on the machine: the cluster of the
session fixture `ray_local`, and any other test run sharing the machine. So each node is
started with `ray start --block` in a new session: on SIGTERM that process shuts down
everything it started, in Ray's own order. Its process tree (GCS, raylet, dashboard, workers,
the job's driver) is recorded from /proc while the cluster is up and again at teardown, and
whatever of it outlives a grace period is killed by pid (a process-group kill would miss the
workers, which Ray puts in process groups of their own).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
import tomllib
import urllib.request
from contextlib import suppress
from pathlib import Path

import pytest
import yaml

from micl.config import load_config
from micl.driver import check, storage_path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the environment running the tests
RAY_CLI = str(VENV_BIN / "ray") if (VENV_BIN / "ray").exists() else shutil.which("ray") or "ray"
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "deploy" / "rayjob.yaml"
IMAGENET_CONFIG = ROOT / "configs" / "imagenet_vitl16.yaml"

# Never part of a job's working-dir upload: the virtualenv (GBs), local run outputs and
# tracking stores, and git history. README.md ("Run on a cluster") shows the same list.
UPLOAD_EXCLUDES = [".git", ".venv", "runs", "mlruns", "mlartifacts", "mlflow.db", "outputs",
                   "__pycache__"]



# ----------------------------------------------------------------------------- helpers


def pyproject_dependencies() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def pinned(deps: list[str]) -> list[str]:
    """The exact pins (`name[extras]==version`) among the dependency specifiers."""
    return [d for d in deps if "==" in d]


def dist_name(spec: str) -> str:
    return re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0].lower()


def shell_words(commands: list[str]) -> set[str]:
    """Every word of the commands with shell quotes stripped, as pip would receive it."""
    words: set[str] = set()
    for command in commands:
        words.update(shlex.split(command, comments=True))
    return words


def k8s_bytes(quantity: str | int) -> int:
    """A Kubernetes quantity ('72Gi', '240G', '1024') in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    text = str(quantity)
    for suffix, factor in units.items():
        if text.endswith(suffix) and text[: -len(suffix)].isdigit():
            return int(text[: -len(suffix)]) * factor
    return int(text)


def load_rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB_YAML.read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"expected one RayJob in {RAYJOB_YAML}"
    return jobs[0]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ----------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_ray_schema_validation():
    """What `ray up` does first: fill in the provider's defaults, then validate against
    ray/autoscaler/ray-schema.json (plus Ray's cross-field checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    prepared = prepare_config(raw)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_ray_schema_validation_is_strict():
    """The check above is not vacuous: a misspelled field fails it, as it would fail `ray up`."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    gpu = next(t for t in raw["available_node_types"].values() if "GPU" in t.get("resources", {}))
    gpu["max_worker"] = gpu.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(raw))


def test_cluster_yaml_node_types():
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    # The head schedules nothing: no CPUs advertised, in the node type and on `ray start`.
    assert head["resources"].get("CPU") == 0
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_start and "--num-cpus=0" in head_start
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu = [t for t in workers.values() if t.get("resources", {}).get("GPU", 0) > 0]
    cpu = [t for t in workers.values() if not t.get("resources", {}).get("GPU")]
    assert gpu and cpu, "need a GPU worker type and a CPU-only worker type"
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]


def test_cluster_setup_commands_pin_pyproject_versions():
    """Every `name==version` of pyproject.toml is installed verbatim on the cluster (and the
    unpinned dependencies with the same specifier), so the cluster runs what CI tested."""
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    words = shell_words(cfg["setup_commands"])
    deps = pyproject_dependencies()
    assert pinned(deps), "pyproject.toml pins nothing?"
    missing = [d for d in deps if d not in words]
    assert not missing, f"cluster.yaml setup_commands lack these pyproject pins: {missing}"
    # The image's Ray must be the pinned Ray too (pip would otherwise up/downgrade it).
    ray_pin = next(d for d in deps if dist_name(d) == "ray").split("==")[1]
    assert f"rayproject/ray:{ray_pin}-" in cfg["docker"]["image"]


# ----------------------------------------------------------------------------- deploy/rayjob.yaml


def test_rayjob_manifest():
    job = load_rayjob()
    spec = job["spec"]
    assert job["apiVersion"].startswith("ray.io/")
    assert "pipelines/pretrain.py" in spec["entrypoint"]
    assert "configs/imagenet_vitl16.yaml" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    ray_pin = next(d for d in pyproject_dependencies() if dist_name(d) == "ray").split("==")[1]
    assert cluster["rayVersion"] == ray_pin

    head = cluster["headGroupSpec"]
    assert str(head["rayStartParams"]["num-cpus"]) == "0"
    groups = cluster["workerGroupSpecs"]

    def limits(group: dict) -> dict:
        return group["template"]["spec"]["containers"][0]["resources"]["limits"]

    gpu = [g for g in groups if int(limits(g).get("nvidia.com/gpu", 0)) > 0]
    cpu = [g for g in groups if int(limits(g).get("nvidia.com/gpu", 0)) == 0]
    assert gpu and cpu, "need a GPU worker group and a CPU-only worker group"
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["maxReplicas"]

    # Every pod: the image pins the same Ray; /dev/shm is a memory emptyDir of ~30% of the
    # pod's memory; the object store fits in it.
    for group in [head, *groups]:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert f"rayproject/ray:{ray_pin}-" in container["image"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        shm_volume = next(v for v in pod["volumes"] if mounts.get(v["name"]) == "/dev/shm")
        assert shm_volume["emptyDir"]["medium"] == "Memory"
        shm = k8s_bytes(shm_volume["emptyDir"]["sizeLimit"])
        memory = k8s_bytes(container["resources"]["limits"]["memory"])
        assert 0.2 <= shm / memory <= 0.4, (shm, memory)
        store = int(group["rayStartParams"]["object-store-memory"])
        assert 0.8 * shm <= store <= shm, (store, shm)

    # The job's pip list pins what pyproject.toml pins (Ray itself comes with the image).
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    pip = runtime_env["pip"]["packages"] if isinstance(runtime_env["pip"], dict) \
        else runtime_env["pip"]
    wanted = [d for d in pyproject_dependencies() if dist_name(d) != "ray"]
    missing = [d for d in wanted if d not in pip]
    assert not missing, f"rayjob.yaml's pip list lacks these pyproject pins: {missing}"


# ----------------------------------------------------------------------------- configs


def test_imagenet_vitl16_config_loads():
    cfg = load_config(IMAGENET_CONFIG)
    assert (cfg.model.name, cfg.model.img_size, cfg.model.patch_size, cfg.model.in_chans) == \
        ("vit_large", 224, 16, 3)
    assert cfg.model.dims() == (1024, 24, 16)
    method = check(load_config(IMAGENET_CONFIG)).method
    assert (method.name, method.args["mask_ratio"], method.args["temperature"]) == \
        ("micl", 0.9, 0.07)
    assert method.args["kappa"] == pytest.approx(1 / 64)
    assert (cfg.optim.blr, cfg.optim.epochs, cfg.optim.warmup_epochs) == (5e-5, 200, 10)
    assert cfg.data.source == "imagefolder" and cfg.data.path.startswith("s3://")
    assert cfg.data.batch_size * cfg.run.num_workers == 7200  # the paper's 4 GPUs x 1800
    assert cfg.run.use_gpu and cfg.run.num_workers == 4
    assert cfg.run.storage_path.startswith("s3://")
    assert (cfg.run.checkpoint_every, cfg.run.eval_every, cfg.run.keep_last,
            cfg.run.max_failures) == (5, 5, 2, 3)


def test_storage_uris_are_passed_on_and_local_paths_made_absolute(tmp_path, monkeypatch):
    """A URI reaches Ray Train exactly as written (no resolving against the cwd; a file://
    URI really is written to by the job test below), a local path is made absolute."""
    for uri in ("s3://your-bucket/micl-runs", "gs://bucket/a/b"):
        assert storage_path(load_config(overrides=[f"run.storage_path={uri}"])) == uri
    assert storage_path(load_config(IMAGENET_CONFIG)) == "s3://your-bucket/micl-runs"
    monkeypatch.chdir(tmp_path)
    assert storage_path(load_config(overrides=["run.storage_path=runs"])) == \
        str(tmp_path / "runs")


def test_docs_show_the_tested_submit_command():
    """README.md ("Run on a cluster") and the headers of cluster.yaml and the ImageNet config
    give the same upload excludes as the job test below uses."""
    excludes = json.dumps({"excludes": UPLOAD_EXCLUDES})
    for path in (ROOT / "README.md", CLUSTER_YAML, IMAGENET_CONFIG):
        text = path.read_text()
        assert f"--runtime-env-json '{excludes}'" in text, path
        assert "ray job submit" in text and "--working-dir ." in text, path


# ----------------------------------------------------------------------------- ray job submit


def ray_env() -> dict[str, str]:
    """The environment of `ray start` and `ray job submit`: no token auth (a test cluster on
    127.0.0.1), this venv first on PATH (a submitted job's `python` is looked up on the PATH
    `ray start` had), and no address that would point the CLI at another cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    return env


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc/<pid>/stat; None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
    return fields[0], int(fields[1]), int(fields[19])


def _same_live_process(pid: int, start: int) -> bool:
    """Alive, and not a recycled pid (the start time is part of a process's identity)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[2] == start


def process_tree(root: int) -> dict[int, int]:
    """{pid: start time} of `root` and all its live descendants (Linux /proc)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    root_stat = _proc_stat(root)
    if root_stat is None:
        return {}
    tree: dict[int, int] = {}
    todo = [(root, root_stat[2])]
    while todo:
        pid, start = todo.pop()
        if pid not in tree:
            tree[pid] = start
            todo.extend(children.get(pid, []))
    return tree


def _signal_all(procs: dict[int, int], sig: int) -> None:
    for pid, start in procs.items():
        if _same_live_process(pid, start):
            with suppress(ProcessLookupError):
                os.kill(pid, sig)


def _wait_gone(procs: dict[int, int], timeout: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = {p: s for p, s in procs.items() if _same_live_process(p, s)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)
