"""MLflow: where the store is, one run per training run (kept across resumes), and logging that
never takes the training down with it."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from micl.config import Config, to_yaml

ROOT = Path(__file__).resolve().parents[1]
RUN_NAME_TAG = "micl.run_name"  # the Ray Train run name: resuming it reuses the MLflow run
ROLE_TAG = "micl.role"  # "train", "search" (a Tune parent), "trial" (a Tune child), "finetune"
PRETRAIN_RUN_TAG = "micl.pretrain_run_id"  # on a fine-tuning run: the run it started from
FINETUNE_RUN_TAG = "micl.finetune_run_id"  # on a pre-training run: its latest fine-tuning run
# The environment to start `mlflow server` with (cluster.yaml's head writes the same): MLflow
# 3's job runner, eight processes serving GenAI jobs a training tracker never queues, polls
# its queues while idle and takes 0.2-0.4 of a core (BENCHMARKS.md).
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def tracking_uri(cfg: Config | None = None) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then sqlite:///<cwd>/mlflow.db (absolute, because Ray
    workers run in another directory; MLflow 3 no longer accepts a ./mlruns file store)."""
    uri = (cfg.run.tracking_uri if cfg else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
        return uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[str]:
    """Point MLflow's fluent API at `uri` for the block, then restore exactly the state before.

    `mlflow.set_tracking_uri` also exports $MLFLOW_TRACKING_URI (for subprocesses), so the usual
    `previous = mlflow.get_tracking_uri(); ...; mlflow.set_tracking_uri(previous)` pins the
    default store of the current directory as an absolute path for the rest of the process: a
    later run or search from another directory (a test's tmp dir, a Tune trial) writes there.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils  # the explicitly set URI, None if unset

    explicit, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(explicit)  # None: unset again (drops the variable too)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def reachable(uri: str, timeout: float = 3.0) -> bool:
    """A quick TCP check of an http(s) tracking server (MLflow's own client would retry a
    closed port for minutes); other stores (sqlite, file) count as reachable."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def open_run(cfg: Config, run_name: str, **kwargs: Any) -> str | None:
    """`start_or_resume_run`, except that an unreachable or failing store gives a warning and
    None (train without MLflow; metrics stay in the Ray Train result) instead of an error."""
    uri = tracking_uri(cfg)
    why = None if reachable(uri) else "the server does not answer"
    if why is None:
        try:
            return start_or_resume_run(cfg, run_name, **kwargs)
        except Exception as e:  # noqa: BLE001 — tracking must not stop training
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
    warnings.warn(f"MLflow tracking at {uri} is unavailable ({why}): training continues "
                  "WITHOUT recording to MLflow; metrics stay in the Ray Train result.",
                  stacklevel=2)
    return None


def mlflow_client(uri: str):
    """An MlflowClient on `uri` (no fluent state: safe in workers and threads)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# MLflow 3's UI opens an experiment in its GenAI view unless told it holds model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def get_or_create_experiment(uri: str, name: str) -> str:
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND[0] not in exp.tags:  # made by an older micl, or by hand
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):
        # Next to the database, absolute: the default ./mlartifacts depends on the cwd.
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifacts,
                                    tags=dict([EXPERIMENT_KIND]))


def source_tags() -> dict[str, str]:
    """What MLflow shows as a run's source: the entry script, the user, and the git commit
    of this checkout when it is one (a `ray job submit` upload has no .git: no commit)."""
    import getpass
    import subprocess
    import sys

    tags = {"mlflow.source.type": "LOCAL",
            "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "micl"}
    with contextlib.suppress(Exception):
        tags["mlflow.user"] = getpass.getuser()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()

    with contextlib.suppress(Exception):
        tags["mlflow.source.git.commit"] = git("rev-parse", "HEAD")
        tags["mlflow.source.git.branch"] = git("rev-parse", "--abbrev-ref", "HEAD")
        tags["micl.git_dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no")))
    return tags


def describe_run(cfg: Config, role: str) -> str:
    """The run's description (MLflow's note): what ran, on what, for how long."""
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    what = {"finetune": f"Fine-tuning (init: {cfg.finetune.init})",
            "search": f"Search over {cfg.method.name}",
            "trial": f"Search trial: {cfg.method.name} pre-training"}.get(
                role, f"{cfg.method.name} pre-training")
    return (f"{what} of {m.name} (patch {m.patch_size}, {m.img_size} px) on {d.source}"
            f"{' at ' + d.path if d.path else ''}: {o.epochs} epochs, batch {d.batch_size} x "
            f"{max(r.num_workers, 1)} worker(s), blr {o.blr:g}.")


def pretrain_params(cfg: Config) -> dict[str, Any]:
    """The flattened config of a pre-training run (the fine-tuning section does not apply)."""
    return {k: v for k, v in cfg.flat().items() if not k.startswith("finetune.")}


def start_or_resume_run(cfg: Config, run_name: str, tags: dict[str, str] | None = None,
                        parent_run_id: str | None = None, resume: bool = True,
                        experiment: str | None = None, params: dict[str, Any] | None = None
                        ) -> str:
    """The MLflow run of this Ray Train run: reused when a run with the same name exists (a
    resumed run keeps one MLflow history) and `resume`, else created in `experiment` (default
    run.experiment) with `params` (default: the pre-training config, flattened)."""
    uri = tracking_uri(cfg)
    client = mlflow_client(uri)
    exp_id = get_or_create_experiment(uri, experiment or cfg.run.experiment)
    found = resume and client.search_runs([exp_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                          max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = tags or {}
    source = {} if "mlflow.source.name" in tags else source_tags()  # a trial has the driver's
    all_tags = {RUN_NAME_TAG: run_name, ROLE_TAG: "train", "mlflow.runName": run_name,
                **source, **tags}
    all_tags.setdefault("mlflow.note.content", describe_run(cfg, all_tags[ROLE_TAG]))
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    log_params(client, run.info.run_id, pretrain_params(cfg) if params is None else params)
    return run.info.run_id


def log_dataset(uri: str, run_id: str, name: str, location: str, num_rows: int,
                context: str = "training") -> None:
    """The data a run trained on as an MLflow dataset input (the run's Datasets column): its
    location and size. Logging the same input again (a resumed run) changes nothing."""
    import hashlib
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    scheme = location.split("://", 1)[0] if "://" in location else "local"
    digest = hashlib.sha256(f"{location}|{name}|{num_rows}".encode()).hexdigest()[:8]
    dataset = Dataset(name=name, digest=digest, source_type=scheme,
                      source=json.dumps({"uri": location}),
                      profile=json.dumps({"num_rows": num_rows}))
    mlflow_client(uri).log_inputs(run_id, [DatasetInput(
        dataset, tags=[InputTag("mlflow.data.context", context)])])


@contextlib.contextmanager
def in_experiment_of(run_id: str) -> Iterator[None]:
    """MLflow's fluent API in the experiment of `run_id` for the block. log_model(run_id=...)
    files the logged model under the *active* experiment (the Default one, "0", in a worker),
    not its run's, and the experiment's Models tab would not list it."""
    import mlflow

    previous = os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.environ["MLFLOW_EXPERIMENT_ID"] = mlflow.get_run(run_id).info.experiment_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = previous


def model_requirements() -> list[str]:
    """What a logged model needs to load: the versions this run used."""
    import timm
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i : i + 100])


class RunLogger:
    """Rank-0 logging to one MLflow run. A store that fails (server down, disk full) is warned
    about once and training goes on: the metric values are kept and sent again, at most every
    `retry_s` seconds, until the store answers (a second warning then says so). Tags,
    artifacts and models, a few calls per run and the run's result at its end, are tried each
    time; those that fail are skipped and named in that warning. Every value also reaches Ray
    Train's result."""

    MAX_PENDING = 100_000  # metric values kept while the store is down (a few MB at most)

    def __init__(self, uri: str, run_id: str, retry_s: float = 30.0,
                 warn: Callable[[str], None] | None = None) -> None:
        self.uri, self.run_id, self.retry_s = uri, run_id, retry_s
        # How the two outage messages reach the user: a UserWarning by default; a training
        # worker passes its console instead, since in a worker Python's warning filters are
        # not reliable (Ray Data's batch threads set and reset them around every tensor
        # conversion, and the process-wide `catch_warnings` races can leave them on ignore).
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=4))
        self.pending: list[Any] = []  # mlflow.entities.Metric not yet in the store
        self.lost: list[str] = []  # what was skipped while the store was down
        self.down_since: float | None = None
        self.last_try = 0.0
        # Fail fast on a dead server instead of MLflow's minutes of retries per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    @property
    def failed(self) -> bool:
        """Something has not reached the store (yet)."""
        return bool(self.pending or self.lost) or self.down_since is not None

    def _guard(self, what: str, fn, *args, kept: int | None = None, **kwargs) -> None:
        """Run one store call unless the store is down and its retry is not due. When a call
        succeeds after an outage, the metric values kept meanwhile (`kept`: default, all that
        wait) go too, and a warning says so."""
        if self.down_since is not None and what == "metrics" and \
                time.monotonic() - self.last_try < self.retry_s:
            return  # the values wait in self.pending
        self.last_try = time.monotonic()
        kept = len(self.pending) if kept is None else kept
        try:
            fn(*args, **kwargs)
            if self.down_since is not None:
                self._send_pending()
        except Exception as e:  # noqa: BLE001 — tracking must never stop training
            if what != "metrics":
                self.lost.append(what)
            if self.down_since is None:
                self.down_since = self.last_try
                self.warn(
                    f"MLflow ({self.uri}) failed while logging {what}: {e}. Training continues; "
                    f"metric values are kept and sent again every {self.retry_s:g} s until "
                    "the store answers (they also stay in the Ray Train result).")
            return
        if self.down_since is not None:
            skipped = f"; not logged meanwhile: {', '.join(self.lost)}" if self.lost else ""
            self.warn(f"MLflow ({self.uri}) answers again after "
                      f"{self.last_try - self.down_since:.0f} s: {kept} metric values kept "
                      f"meanwhile are logged now{skipped}.")
            self.down_since = None

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        kept = len(self.pending)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()
                         if isinstance(v, int | float)]
        del self.pending[: -self.MAX_PENDING]  # beyond the cap, the oldest go
        self._guard("metrics", self._send_pending, kept=kept)

    def _send_pending(self) -> None:
        client = mlflow_client(self.uri)
        while self.pending:
            client.log_batch(self.run_id, metrics=self.pending[:1000])  # MLflow's batch limit
            del self.pending[:1000]

    def dataset(self, name: str, location: str, num_rows: int, context: str = "training"
                ) -> None:
        self._guard("the dataset input", log_dataset, self.uri, self.run_id, name, location,
                    num_rows, context)

    def tags(self, tags: dict[str, str]) -> None:
        def log() -> None:
            client = mlflow_client(self.uri)
            for key, value in tags.items():
                client.set_tag(self.run_id, key, str(value))

        self._guard("tags", log)

    def artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._guard(f"artifact {local_path}", lambda: mlflow_client(self.uri).log_artifact(
            self.run_id, str(local_path), artifact_path))

    def text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(text)
            self.artifact(p)

    def config(self, cfg: Config) -> None:
        self.text(to_yaml(cfg), "config.yaml")

    def model(self, module: Any, name: str, step: int, register_as: str | None = None
              ) -> str | None:
        """`module` as an MLflow logged model of this run at `step` (MLflow links that step's
        metrics to it), loadable with `mlflow.pytorch.load_model` anywhere (micl's code goes
        with it), and registered as `register_as` when given. Returns the model id.

        Pickled, not MLflow's default pt2: torch.export would fix the batch size it traced
        and drop the encoder's optional patch-index argument."""
        logged: dict[str, str] = {}

        def log() -> None:
            import logging

            import mlflow.pytorch

            pickle_note = logging.getLogger("mlflow.pytorch")  # its warning about pickle
            level = pickle_note.level
            pickle_note.setLevel(logging.ERROR)
            try:
                with use_tracking_uri(self.uri), in_experiment_of(self.run_id):
                    info = mlflow.pytorch.log_model(
                        module, name=name, step=step, run_id=self.run_id,
                        registered_model_name=register_as, serialization_format="pickle",
                        code_paths=[str(ROOT / "micl")], pip_requirements=model_requirements())
            finally:
                pickle_note.setLevel(level)
            logged["id"] = info.model_id

        self._guard(f"the logged model {name}", log)
        return logged.get("id")

    @contextlib.contextmanager
    def system_metrics(self, every_s: float = 10.0) -> Iterator[None]:
        """MLflow's own system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) of
        this machine, every `every_s` seconds while the block runs."""
        monitor = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=every_s,
                                           resume_logging=True, tracking_uri=self.uri)
            monitor.start()
        except Exception as e:  # noqa: BLE001 — e.g. psutil missing: train without them
            warnings.warn(f"MLflow system metrics are off: {e}", stacklevel=2)
            monitor = None
        try:
            yield
        finally:
            if monitor is not None:
                with contextlib.suppress(Exception):
                    monitor.finish()

    def flush(self) -> None:
        """One more try for the metric values kept while the store was down, whenever the
        last try was (a run's end)."""
        if self.pending:
            self.last_try = 0.0
            self._guard("metrics", self._send_pending)

    def end(self, status: str = "FINISHED") -> None:
        """End the run with `status`, unless something else has ended it already: a Tune
        search marks the runs of the trials its scheduler stopped KILLED, and a stopped trial's
        own fit may see the stop as a failure only later; its FAILED must not overwrite that."""
        self.flush()
        self._guard("run status", self._end_if_running, status)

    def _end_if_running(self, status: str) -> None:
        client = mlflow_client(self.uri)
        if client.get_run(self.run_id).info.status == "RUNNING":
            client.set_terminated(self.run_id, status)
