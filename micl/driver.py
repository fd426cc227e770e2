"""Driver side of a run: check the config, build the data streams and the trainer (a
TorchTrainer, or with one worker the loop alone in one Ray task), own the MLflow run, and
evaluate finished runs.

    result = run_pretraining(load_config("configs/fashion_mnist_quality.yaml"))

Everything a worker needs travels in a `LoopSpec`; everything that can be checked is checked
here, before Ray starts, with errors that name the field.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import ray
import ray.train
import torch
import torch.nn.functional as F
from ray._private import services as ray_services
from ray.train.torch import TorchTrainer

from micl import objectives
from micl.artifacts import latest_checkpoint_on_storage, load_encoder
from micl.config import Config, ConfigError, ModelConfig, with_overrides
from micl.console import (
    Console,
    ProgressView,
    quiet_driver_logs,
    silent_console,
    verbose,
    view_console,
    watch,
)
from micl.data.clock import epoch_clock, new_clock_name
from micl.data.sources import check_source, data_location, load_split, split_size
from micl.data.stream import (
    eval_stream,
    keep_label_subset,
    subset_suffix,
    train_stream,
)
from micl.evaluate import extract_features, knn_top1, linear_probe
from micl.models.export import encoder_from_timm, timm_state_dict
from micl.tracking import RunLogger, open_run
from micl.tracking import tracking_uri as default_tracking_uri
from micl.train import LoopSpec, SoloHost, StepHook, seal_spec, train_loop_per_worker

ROOT = Path(__file__).resolve().parents[1]
_CLOCKS: list[Any] = []  # the epoch clock of the fit under way (dropped when it ends)


class PretrainError(RuntimeError):
    """Training failed; the message carries the root cause from the workers."""


@dataclass
class PretrainResult:
    run_name: str
    mlflow_run_id: str | None  # None when the tracking store was unavailable
    tracking_uri: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    storage_path: str


def check(cfg: Config, preflight: bool = False) -> Config:
    """Validate every field: the generic ones, the data source's and the method's (which also
    records the method's defaults in cfg). `preflight` also checks what the method loads."""
    cfg.validate()
    objectives.import_plugins(cfg)
    check_source(cfg)
    return objectives.check(cfg, preflight=preflight)


def resolve(cfg: Config) -> Config:
    """Fix the tracking store and storage path as absolute values: workers and Tune trials
    run in other directories and processes."""
    cfg.run.tracking_uri = default_tracking_uri(cfg)
    cfg.run.storage_path = storage_path(cfg)
    return cfg


# How long a local Ray keeps an idle worker process that it could end. Ray ends one after 1 s
# when its node has fewer free CPUs than idle workers, which is the case while a fit holds
# them: every epoch's decode/mask tasks then started Python and their imports again (1-2 CPU-s
# a process), each time the loop paused between epochs for its kNN evaluation and checkpoint.
# Kept, the next epoch's tasks reuse them: a Tune search of 2 trials took 69.9 s instead of
# 118.3 s at 0.6 CPU with 30 s; 60 s also covers a slow machine's wait between the driver's
# kNN sets and the first training tasks (BENCHMARKS.md, "Processes the suite no longer starts
# again and again"). A value in the environment wins.
IDLE_WORKER_KEEP_MS = 60_000


def connect_ray(num_cpus: int | None = None, address: str | None = None,
                paths: Sequence[str] = (), dashboard: bool | None = None) -> None:
    """Join the cluster this process belongs to (`ray job submit`, RAY_ADDRESS, `ray start`)
    or start a local one (always, with address="local"). Workers get the project and `paths`
    on their Python path either way. A local Ray starts its dashboard (the web view, the job
    and state APIs) unless `dashboard` is False: without it a tiny fit costs about 5 % less
    CPU (BENCHMARKS.md, "Fixed cost")."""
    if ray.is_initialized():
        return
    has_token = any(os.environ.get(v) for v in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")) \
        or (Path.home() / ".ray" / "auth_token").exists()
    if not has_token:  # a local cluster of our own: Ray 2.60's token auth only gets in the way
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    pythonpath = os.pathsep.join(p for p in (str(ROOT), *paths, os.environ.get("PYTHONPATH", ""))
                                 if p)
    # Ray's workers print their internals (resource requests, checkpoint and report dumps,
    # deprecation notes) to the driver; micl's own lines reach it through micl.console, so by
    # default that channel stays shut and the output stays in Ray's log files.
    init = dict(address=address, num_cpus=num_cpus, include_dashboard=dashboard,
                log_to_driver=verbose(),
                configure_logging=True, logging_level="INFO" if verbose() else "WARNING")
    if starts_local_ray(address):
        # Its workers inherit the environment its raylet starts with, this process's: the
        # path needs no runtime env, under which each worker starts Python twice
        # (setup_worker.py, then the worker). And a single machine is never drained: Ray
        # Train's preemption watcher, one more actor process per fit, has nothing to watch
        # (unless the user asks for it). Together about 12 % of a tiny fit's CPU time
        # (BENCHMARKS.md, "Fixed cost").
        watcher = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        keep_ms = os.environ.get("RAY_idle_worker_killing_time_threshold_ms",
                                 str(IDLE_WORKER_KEEP_MS))
        with patch.dict(os.environ, PYTHONPATH=pythonpath,
                        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=watcher,
                        RAY_idle_worker_killing_time_threshold_ms=keep_ms):  # as it was after
            ray.init(**init)
    else:
        ray.init(**init, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_driver_logs()


def starts_local_ray(address: str | None) -> bool:
    """Whether ray.init(address) starts a Ray here rather than joining one (Ray's own rule)."""
    if (address or os.environ.get("RAY_ADDRESS", "")).startswith("ray://"):  # Ray Client
        return False
    return ray_services.canonicalize_bootstrap_address(address) is None


def check_data_nodes(cfg: Config) -> None:
    """With data.node_labels set, say so when no live node carries the labels: the decode
    tasks would wait for one (on an autoscaling cluster, until the autoscaler adds it)."""
    wanted = cfg.data.node_labels
    if not wanted:
        return
    for node in ray.nodes():
        labels = node.get("Labels") or {}
        if node.get("Alive") and all(labels.get(k) == v for k, v in wanted.items()):
            return
    print(f"[micl] warning: no node of the cluster carries data.node_labels = {wanted}: the "
          "data tasks wait until one joins (cluster.yaml's cpu_worker nodes carry "
          "micl-role=data; on one machine, leave data.node_labels empty)",
          file=sys.stderr, flush=True)


def storage_path(cfg: Config) -> str:
    path = cfg.run.storage_path or "runs"
    return path if "://" in path else str(Path(path).resolve())


def default_run_name(cfg: Config) -> str:
    return f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_set(cfg: Config) -> tuple[ray.data.Dataset, int]:
    """The raw training split and its size (files, before undecodable ones)."""
    num_train = split_size(cfg, cfg.data.train_split)
    if num_train < cfg.data.batch_size * max(cfg.run.num_workers, 1):
        raise PretrainError(
            f"data: {num_train} training images is fewer than one batch per worker "
            f"(data.batch_size = {cfg.data.batch_size} x run.num_workers = {cfg.run.num_workers})")
    return load_split(cfg, cfg.data.train_split), num_train


def log_training_data(cfg: Config, mlflow_run_id: str | None, num_train: int) -> None:
    """The training split as the run's MLflow dataset input."""
    if mlflow_run_id:
        RunLogger(cfg.run.tracking_uri, mlflow_run_id).dataset(
            f"{cfg.data.source}/{cfg.data.train_split}", data_location(cfg), num_train)


def knn_sets(cfg: Config, cache: bool = True) -> dict[str, ray.data.Dataset]:
    """The kNN bank (a subset of the train split) and queries (of the val split), decoded
    once and cached in the object store (`cache`; else streamed on each use)."""
    # No knn_bank_size: the whole (limit_train-capped) split, without listing it a second time.
    bank = load_split(cfg, cfg.data.train_split,
                      limit=cfg.data.knn_bank_size or cfg.data.limit_train)
    query = load_split(cfg, cfg.data.val_split, limit=cfg.data.knn_query_size)
    sets = {"knn_bank": eval_stream(bank, cfg), "knn_query": eval_stream(query, cfg)}
    return {k: v.materialize() for k, v in sets.items()} if cache else sets


def fit_clock(run_name: str) -> str:
    """A fresh epoch clock for one fit, in this process's EpochClocks actor until the fit
    ends; returns its name. A process fits one run at a time, so any clock still held
    belongs to a fit that is over (one built and fitted without `fit_tracked`, as
    benchmarks/trainer.py does)."""
    release_clocks()
    name = new_clock_name(run_name)
    _CLOCKS.append(epoch_clock(name))
    return name


def release_clocks() -> None:
    """Drop the epoch clocks of fits that are over, which a process that runs fit after fit
    (a notebook, a test session) would otherwise keep."""
    while _CLOCKS:
        _CLOCKS.pop().close()


def build_trainer(cfg: Config, run_name: str, mlflow_run_id: str | None,
                  hooks: Sequence[StepHook] = (), callbacks: list | None = None,
                  console_name: str | None = None) -> Trainer:
    """The pre-training trainer for a checked and resolved cfg (see `check`, `resolve`)."""
    spec, datasets = fit_inputs(cfg, run_name, mlflow_run_id, hooks, console_name)
    return trainer_for(train_loop_per_worker, spec, cfg, run_name, datasets, ["train"],
                       callbacks)


def fit_inputs(cfg: Config, run_name: str, mlflow_run_id: str | None,
               hooks: Sequence[StepHook] = (), console_name: str | None = None
               ) -> tuple[LoopSpec, dict[str, ray.data.Dataset]]:
    """What a pre-training loop runs on, wherever it runs: its spec, and its datasets (the
    training stream, the kNN bank and queries). Logs the training data to the run."""
    train, num_train = train_set(cfg)
    log_training_data(cfg, mlflow_run_id, num_train)
    spec = loop_spec(cfg, run_name, num_train, mlflow_run_id, hooks, console_name)
    return spec, {"train": train_stream(train, cfg, spec.clock_name,
                                        objectives.stream_spec(cfg)), **knn_sets(cfg)}


def loop_spec(cfg: Config, run_name: str, num_train: int, mlflow_run_id: str | None,
              hooks: Sequence[StepHook] = (), console_name: str | None = None) -> LoopSpec:
    """What every worker of a fit gets, with its epoch clock (which also counts restarts): the
    console's (micl.console.watch), which relays the workers' lines too, else a fresh one."""
    return LoopSpec(config=cfg.to_dict(), num_train=num_train, run_dir=run_dir(cfg, run_name),
                    clock_name=console_name or fit_clock(run_name),
                    mlflow_run_id=mlflow_run_id, hooks=tuple(hooks), console_name=console_name)


def run_dir(cfg: Config, run_name: str) -> str:
    """A run's directory on storage: its checkpoints (a local path or a pyarrow URI)."""
    return f"{cfg.run.storage_path.rstrip('/')}/{run_name}"


def trains_alone(cfg: Config) -> bool:
    """Whether a fit of cfg runs the loop alone in one process of its own (one worker: a Ray
    task, or a Tune trial's process) rather than on Ray Train's workers."""
    return cfg.run.num_workers == 1


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one training worker requests: its CPUs, its GPU share, run.worker_resources."""
    resources = {"CPU": cfg.run.cpus_per_worker, **cfg.run.worker_resources}
    if cfg.run.use_gpu:
        resources["GPU"] = cfg.run.gpus_per_worker
    return resources


@dataclass
class SoloResult:
    """What a one-worker fit returns: the fields of ray.train.Result that micl reads."""

    metrics: dict[str, Any]  # the last epoch's report
    checkpoint: ray.train.Checkpoint | None  # the run's latest on storage


@ray.remote
def fit_alone(loop: Callable[..., None], loop_config: dict[str, bytes],
              datasets: dict[str, ray.data.Dataset], cpus: float, use_gpu: bool
              ) -> dict[str, Any]:
    """A one-worker fit's loop, in this task's process: its last epoch's report."""
    reports: list[dict[str, Any]] = []
    threads = torch.get_num_threads()  # a pooled process: the next task gets it back as it was
    torch.set_num_threads(max(1, int(cpus)))  # as a Ray Train worker holding `cpus` gets
    try:
        loop(loop_config, SoloHost(datasets, reports.append, use_gpu))
    finally:
        torch.set_num_threads(threads)
    return reports[-1] if reports else {}


@dataclass
class SoloFit:
    """A fit with one worker (run.num_workers = 1): the loop alone in one Ray task that holds
    the worker's resources (its CPUs, GPU share, run.worker_resources), instead of a
    TorchTrainer, whose controller, worker and helper actors are five processes to start and
    import (a tiny fit: 16 s -> 2 s from a warm driver on 2 cores; BENCHMARKS.md, "A
    one-worker run trains alone in a Ray task"). Ray retries the task up to run.max_failures
    times, after an error as after a lost process or node, as Ray Train restarts a worker
    group; the retry resumes from the run's latest checkpoint on storage and the fit's epoch
    clock (held by this driver) counts it."""

    loop: Callable[..., None]
    spec: Any  # the loop's spec (sealed as it is sent: micl.train.seal_spec)
    cfg: Config
    run_name: str
    datasets: dict[str, ray.data.Dataset]

    def fit(self) -> SoloResult:
        run = self.cfg.run
        task = fit_alone.options(
            name=f"micl-fit:{self.run_name}",  # what the dashboard and `ray list tasks` show
            num_cpus=run.cpus_per_worker, num_gpus=run.gpus_per_worker if run.use_gpu else 0,
            resources=run.worker_resources, max_retries=run.max_failures,
            retry_exceptions=True)
        ref = task.remote(self.loop, seal_spec(self.spec), self.datasets, run.cpus_per_worker,
                          run.use_gpu)
        try:
            metrics = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise e.cause from None  # the loop's own error (Ray's wrapper adds a traceback)
        except BaseException:  # Ctrl-C in a notebook: the task must not go on training
            ray.cancel(ref, force=True)
            raise
        return SoloResult(metrics, latest_checkpoint_on_storage(run_dir(self.cfg,
                                                                        self.run_name)))


Trainer = TorchTrainer | SoloFit


def trainer_for(loop: Callable[..., None], spec: Any, cfg: Config, run_name: str,
                datasets: dict[str, ray.data.Dataset], datasets_to_split: list[str],
                callbacks: list | None = None) -> Trainer:
    """The trainer of any micl loop: cfg.run's workers, storage, retries and retention. One
    worker trains alone in a task (`SoloFit`), unless Ray Train `callbacks` ask for a
    TorchTrainer; local mode (0) and several workers get one. The loop gets `spec` sealed
    (micl.train.seal_spec): Ray Train's controller never opens it. A single worker iterates
    its datasets itself: splitting for one would cost a fit a split coordinator actor (a
    process importing Ray Data) and hand it the same rows."""
    if trains_alone(cfg) and not callbacks:
        return SoloFit(loop, spec, cfg, run_name, datasets)
    return TorchTrainer(
        loop,
        train_loop_config=seal_spec(spec),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
            resources_per_worker=worker_resources(cfg)),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=cfg.run.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_last),
            callbacks=callbacks),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=datasets_to_split if cfg.run.num_workers > 1 else []),
    )


def root_cause(error: BaseException) -> str:
    """The innermost message of a Ray Train failure, for one readable line."""
    seen = error
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return text[-1] if text else type(seen).__name__


def fit_tracked(build: Callable[[], Any], logger: RunLogger | None) -> Any:
    """Build and fit a trainer (a TorchTrainer, or anything with `fit()`: a Tune trial's own
    fit); the MLflow run ends FINISHED or FAILED either way (a data error found while
    building included). A check failing while building raises as it is; any failure of the
    fit becomes one readable PretrainError, whether Ray wrapped it (Ray Train's workers) or
    not (a one-worker fit's task, which unwraps it; local mode, run.num_workers = 0, or a
    trial, where the loop runs in this process)."""
    trainer, threads = None, torch.get_num_threads()  # local mode sets run.torch_threads here
    try:
        trainer = build()
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors several levels deep
        if logger:
            logger.end("FAILED")
        if trainer is None and isinstance(e, ConfigError | PretrainError):
            raise
        raise PretrainError(f"training failed: {root_cause(e)}") from e
    finally:
        torch.set_num_threads(threads)
        release_clocks()
    if logger:
        logger.end("FINISHED")
    return result


def run_pretraining(cfg: Config, hooks: Sequence[StepHook] = ()) -> PretrainResult:
    """Pre-train cfg's run, resuming when cfg.run.name names an earlier run. `hooks`
    run after every optimizer step on every worker (they must be importable there)."""
    cfg = resolve(check(cfg, preflight=True))
    connect_ray()
    check_data_nodes(cfg)
    run_name = cfg.run.name or default_run_name(cfg)
    mlflow_run_id = open_run(cfg, run_name)
    logger = RunLogger(cfg.run.tracking_uri, mlflow_run_id) if mlflow_run_id else None
    with watch(ProgressView(every_s=cfg.run.progress_every_s)) as console:
        result = fit_tracked(lambda: build_trainer(cfg, run_name, mlflow_run_id, hooks,
                                                   console_name=console), logger)
    return PretrainResult(
        run_name=run_name, mlflow_run_id=mlflow_run_id, tracking_uri=cfg.run.tracking_uri,
        metrics=dict(result.metrics or {}),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        storage_path=cfg.run.storage_path)


# ----------------------------------------------------------------------------- evaluation


class EncoderFeatures:
    """A Ray Data actor: raw cls features of eval-stream batches, computed where the actor runs
    (on its GPU when it has one). `state` is the encoder's timm state dict or a reference to it."""

    def __init__(self, state: Any, model: ModelConfig, mean: list[float], std: list[float]
                 ) -> None:
        state = ray.get(state) if isinstance(state, ray.ObjectRef) else state
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = encoder_from_timm(state, model).to(self.device)
        self.mean, self.std = mean, std

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.ascontiguousarray(batch["image"]))  # uint8 [B, C, H, W]
        labels = torch.from_numpy(np.asarray(batch["label"]))
        feats, _ = extract_features(self.encoder, [{"image": images, "label": labels}],
                                    self.mean, self.std, self.device, l2=False)
        return {"feature": feats.numpy(), "label": labels.numpy()}  # [B, D], [B]


def features_of(ds: ray.data.Dataset, encoder: torch.nn.Module, cfg: Config,
                device: torch.device, workers: int = 0, state: ray.ObjectRef | None = None,
                console: Console | None = None, phase: str = "features"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw cls features [N, D] and labels of an eval stream: pushed through the encoder in this
    process (workers = 0), or by `workers` Ray Data actors on the cluster (a GPU each when the
    cluster has GPUs): what ImageNet-sized sets need. `state`: the encoder's timm state dict
    already in the object store (put once for several sets), else put here. `console` shows
    the pass's progress as `phase`."""
    console = console or silent_console()
    if workers == 0:
        return extract_features(encoder, console.track(ds.iter_torch_batches(batch_size=512),
                                                       phase, lambda b: len(b["label"])),
                                cfg.data.mean, cfg.data.std, device, l2=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    state = state if state is not None else ray.put(timm_state_dict(encoder))
    out = ds.map_batches(EncoderFeatures, batch_size=512, batch_format="numpy", num_gpus=gpus,
                         compute=ray.data.ActorPoolStrategy(size=workers),
                         fn_constructor_kwargs={"state": state,
                                                "model": cfg.model, "mean": cfg.data.mean,
                                                "std": cfg.data.std})
    parts = list(console.track(out.iter_batches(batch_size=None, batch_format="numpy"),
                               phase, lambda b: len(b["label"])))
    if not parts:
        raise ValueError("no images to extract features from (empty dataset)")
    return (torch.from_numpy(np.concatenate([p["feature"] for p in parts])),
            torch.from_numpy(np.concatenate([p["label"] for p in parts])).long())


def low_shot_set(cfg: Config, fraction: float, seed: int) -> ray.data.Dataset:
    """The eval stream of a fixed `fraction` of the whole train split (low-shot probes)."""
    return eval_stream(keep_label_subset(load_split(cfg, cfg.data.train_split), fraction, seed),
                       cfg)


PROTOCOLS = ("knn", "linear")


@dataclass
class EvalResult:
    metrics: dict[str, float]  # knn_top1 / linear_top1
    run_id: str | None  # the MLflow run they were logged to (None: not logged)
    tracking_uri: str | None
    step: int  # the MLflow step they were logged at: the epoch of the evaluated weights
    bank_size: int
    query_size: int


def check_eval_args(protocols: Sequence[str], overrides: Sequence[str],
                    label_fraction: float) -> None:
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        raise ConfigError(f"config error: protocols = {list(protocols)!r}: choose from "
                          f"{list(PROTOCOLS)}")
    if not 0 < label_fraction <= 1:
        raise ConfigError(f"config error: label_fraction = {label_fraction}: must be in (0, 1]")
    if any(o.strip().startswith("model.") for o in overrides):
        raise ConfigError("config error: model.*: the architecture comes from the weights")


def evaluate_run(run_id: str | None = None, checkpoint: str | None = None,
                 protocols: Sequence[str] = PROTOCOLS, overrides: Sequence[str] = (),
                 tracking_uri: str | None = None, log: bool = True,
                 linear_epochs: int = 90, label_fraction: float = 1.0, label_seed: int = 0,
                 probe: dict[str, Any] | None = None, extract_workers: int = 0
                 ) -> EvalResult:
    """Evaluate the encoder of a finished run: kNN top-1 and/or linear-probe top-1.

    The encoder comes from the MLflow run `run_id` (exported weights + params) or from
    `checkpoint` (a Ray Train checkpoint dir / state.pt, or an exported encoder_timm.pth); its
    config from the same source, with `overrides` ("section.field=value"; model.* is fixed by
    the weights) on top. The sets are the training loop's kNN sets, so `knn_top1` here
    reproduces the run's. The metrics go to the ORIGINAL MLflow run (run_id, or the run a
    checkpoint records) at step = the epoch of the weights; log=False only returns them.

    Low-shot (label_fraction < 1): the linear probe trains on that fixed fraction of the whole
    train split (`data.stream.label_subset`, seeded by label_seed) and logs `linear_top1_<p>pct`.
    `probe`: more keyword arguments of `evaluate.linear_probe` (optimizer="lars", blr, ...).
    `extract_workers` > 0: the features are computed by that many Ray Data actors on the
    cluster and the sets are streamed, not cached (`features_of`).
    """
    check_eval_args(protocols, overrides, label_fraction)
    loaded = load_encoder(run_id=run_id, checkpoint=checkpoint,
                          tracking_uri=tracking_uri or default_tracking_uri())
    cfg = with_overrides(loaded.config or Config(model=loaded.model), list(overrides))
    cfg.model = loaded.model
    connect_ray()
    sets = knn_sets(cfg, cache=extract_workers == 0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = loaded.encoder.to(device)

    state = ray.put(timm_state_dict(encoder)) if extract_workers else None  # once, for all sets
    console = view_console(ProgressView())

    def features(ds: ray.data.Dataset, phase: str) -> tuple[torch.Tensor, torch.Tensor]:
        return features_of(ds, encoder, cfg, device, extract_workers, state, console, phase)

    (bank, bank_labels), (query, query_labels) = features(sets["knn_bank"], "features (bank)"), \
        features(sets["knn_query"], "features (queries)")
    metrics: dict[str, float] = {}
    if "knn" in protocols:
        metrics["knn_top1"] = knn_top1(F.normalize(bank, dim=-1), bank_labels,
                                       F.normalize(query, dim=-1), query_labels)
    if "linear" in protocols:
        train, train_labels = (bank, bank_labels) if label_fraction >= 1 else \
            features(low_shot_set(cfg, label_fraction, label_seed), "features (low-shot)")
        metrics["linear_top1" + subset_suffix(label_fraction)] = linear_probe(
            train, train_labels, query, query_labels, epochs=linear_epochs, seed=cfg.run.seed,
            **(probe or {}))
    target_run, step = run_id or loaded.run_id, int(loaded.epoch or 0)
    log_uri = tracking_uri or default_tracking_uri(cfg if run_id is None else None)
    if log and target_run:
        logger = RunLogger(log_uri, target_run)
        logger.metrics(metrics, step=step)
        if logger.failed:
            raise RuntimeError(f"could not log to MLflow run {target_run} at {log_uri}")
    return EvalResult(metrics, target_run if log else None, log_uri if log else None, step,
                      len(bank_labels), len(query_labels))
