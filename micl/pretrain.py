"""Driver side of a pre-training run: data streams, TorchTrainer, MLflow run, result."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from micl.config import Config
from micl.data.sources import load_split, split_size
from micl.data.stream import epoch_clock, eval_stream, train_stream
from micl.tracking import RunLogger, open_run, tracking_uri
from micl.train import train_loop_per_worker

ROOT = Path(__file__).resolve().parents[1]
_CLOCKS: dict[str, object] = {}  # run name -> its EpochClock handle, alive while we drive it


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
    extra: dict[str, Any] = field(default_factory=dict)


def connect_ray(num_cpus: int | None = None) -> None:
    """Join the cluster this process belongs to (`ray job submit`, RAY_ADDRESS, `ray start`)
    or start a local one. Workers get the project on their path either way."""
    if ray.is_initialized():
        return
    has_token = any(os.environ.get(v) for v in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")) \
        or (Path.home() / ".ray" / "auth_token").exists()
    if not has_token:  # a local cluster of our own: Ray 2.60's token auth only gets in the way
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}}
    ray.init(num_cpus=num_cpus, runtime_env=runtime_env, log_to_driver=True,
             configure_logging=True, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False


def storage_path(cfg: Config) -> str:
    path = cfg.run.storage_path or "runs"
    return path if "://" in path else str(Path(path).resolve())


def default_run_name(cfg: Config) -> str:
    return f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_datasets(cfg: Config, clock_name: str) -> tuple[dict[str, ray.data.Dataset], int]:
    """The training stream plus the (cached) kNN bank and query sets; and the train size."""
    train = load_split(cfg, cfg.data.train_split)
    num_train = split_size(cfg, cfg.data.train_split)
    if num_train < cfg.data.batch_size * max(cfg.run.num_workers, 1):
        raise PretrainError(
            f"data: {num_train} training images is fewer than one batch per worker "
            f"(data.batch_size = {cfg.data.batch_size} x run.num_workers = {cfg.run.num_workers})")
    bank_size = min(cfg.data.knn_bank_size or num_train, num_train)
    bank = load_split(cfg, cfg.data.train_split, limit=bank_size)
    query = load_split(cfg, cfg.data.val_split, limit=cfg.data.knn_query_size)
    return {
        "train": train_stream(train, cfg, clock_name),
        "knn_bank": eval_stream(bank, cfg).materialize(),
        "knn_query": eval_stream(query, cfg).materialize(),
    }, num_train


def build_trainer(cfg: Config, run_name: str, mlflow_run_id: str | None,
                  callbacks: list | None = None) -> TorchTrainer:
    clock_name = f"micl-clock-{run_name}"
    # Created and held here so that it outlives failed worker groups (it counts restarts): an
    # actor whose handles are all dropped is destroyed.
    clock = _CLOCKS.get(clock_name)  # replacing a held handle would destroy the actor
    try:
        ray.get(clock.reset.remote()) if clock else None
    except ray.exceptions.RayActorError:
        clock = None
    if clock is None:
        _CLOCKS[clock_name] = clock = epoch_clock(clock_name)
        ray.get(clock.reset.remote())
    datasets, num_train = build_datasets(cfg, clock_name)
    root = storage_path(cfg)
    loop_config = {"config": cfg.to_dict(), "num_train": num_train, "clock_name": clock_name,
                   "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri(cfg),
                   "run_dir": f"{root.rstrip('/')}/{run_name}",
                   "fault_marker_dir": str(Path(root) / run_name / "faults")
                   if "://" not in root else tempfile.mkdtemp(prefix="micl-faults-")}
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
            resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_last),
            callbacks=callbacks),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def root_cause(error: BaseException) -> str:
    """The innermost message of a Ray Train failure, for one readable line."""
    seen = error
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return text[-1] if text else type(seen).__name__


def run_pretraining(cfg: Config) -> PretrainResult:
    """Fit a TorchTrainer for cfg; resuming when cfg.run.name names an earlier run."""
    connect_ray()
    run_name = cfg.run.name or default_run_name(cfg)
    uri = tracking_uri(cfg)
    mlflow_run_id = open_run(cfg, run_name)
    trainer = build_trainer(cfg, run_name, mlflow_run_id)
    logger = RunLogger(uri, mlflow_run_id) if mlflow_run_id else None
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors several levels deep
        if logger:
            logger.end("FAILED")
        raise PretrainError(f"training failed: {root_cause(e)}") from e
    if logger:
        logger.end("FINISHED")
    return PretrainResult(
        run_name=run_name, mlflow_run_id=mlflow_run_id, tracking_uri=uri,
        metrics=dict(result.metrics or {}),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        storage_path=storage_path(cfg))
