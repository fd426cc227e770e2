"""Where a run's files live and what is in them: the training state of a checkpoint, and the
encoder exported for timm (written at the end of a run, read by evaluation, fine-tuning and a
MimCo teacher).

    enc = load_encoder(run_id="3f2c...", tracking_uri="sqlite:////abs/mlflow.db")
    enc = load_encoder(checkpoint="runs/micl-20250101-120000/checkpoint_000003")

Encoder sources, with where the architecture comes from:

- an MLflow run id: its `encoder/encoder_timm.pth` + `encoder/timm_model.json` artifacts and
  its params (the flattened run config);
- a Ray Train checkpoint directory, or the `state.pt` in it: the `encoder.*` weights of the
  objective and the config stored with them;
- an exported `encoder_timm.pth` (or a directory holding it) with `timm_model.json` beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import torch

from micl.config import Config, ConfigError, ModelConfig, config_from_params, from_dict
from micl.models.export import (
    TIMM_JSON,
    TIMM_NAMES,
    TIMM_WEIGHTS,
    encoder_from_timm,
    model_from_timm_json,
    timm_kwargs,
    timm_state_dict,
)
from micl.models.vit import MaskedViT
from micl.tracking import mlflow_client
from micl.tracking import tracking_uri as default_tracking_uri

STATE_FILE = "state.pt"


# ----------------------------------------------------------------------------- training state


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a training state (model and optimizer state dicts, counters, config) to a
    temporary name, then rename: a crash mid-write never leaves a truncated state.pt (Ray
    Train registers the directory only after this returns)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)


def _storage(run_dir: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) of a run directory: a local path or any pyarrow URI."""
    return pafs.FileSystem.from_uri(run_dir) if "://" in run_dir \
        else (pafs.LocalFileSystem(), str(Path(run_dir).resolve()))


def _checkpoint_dirs(fs: pafs.FileSystem, root: str) -> list[str]:
    """A run's `checkpoint_*` directories, newest first (the names are timestamps)."""
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_")), reverse=True)


def _complete_checkpoint_dirs(fs: pafs.FileSystem, root: str) -> list[str]:
    """The `checkpoint_*` directories holding a complete state file (written by a rename, so
    never a partial one), newest first."""
    return [d for d in _checkpoint_dirs(fs, root)
            if fs.get_file_info(f"{d}/{STATE_FILE}").type == pafs.FileType.File]


def latest_checkpoint_on_storage(run_dir: str) -> ray.train.Checkpoint | None:
    """The newest complete `checkpoint_*` directory of a run; local paths or any pyarrow URI."""
    fs, root = _storage(run_dir)
    try:
        dirs = _complete_checkpoint_dirs(fs, root)
    except OSError:
        return None
    return ray.train.Checkpoint(dirs[0], filesystem=fs) if dirs else None


def persist_checkpoint(local_dir: str | Path, run_dir: str, keep_last: int
                       ) -> ray.train.Checkpoint:
    """Copy a checkpoint's state file to a new `run_dir/checkpoint_<time>` directory and keep
    the newest `keep_last`: what Ray Train does with a reported checkpoint, done here for a
    fit in local mode (run.num_workers = 0), which keeps nothing itself. The state file
    appears under its final name only once complete (a rename), as with save_state."""
    fs, root = _storage(run_dir)
    dest = f"{root}/checkpoint_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S.%f')}"
    fs.create_dir(dest, recursive=True)
    with open(Path(local_dir) / STATE_FILE, "rb") as src, \
            fs.open_output_stream(f"{dest}/{STATE_FILE}.tmp") as out:
        shutil.copyfileobj(src, out)
    fs.move(f"{dest}/{STATE_FILE}.tmp", f"{dest}/{STATE_FILE}")
    # Keep this one and the newest keep_last - 1 other complete ones, as Ray Train keeps the
    # checkpoints it registered; a directory a crash cut short is never counted as kept.
    older = [d for d in _complete_checkpoint_dirs(fs, root) if d != dest]
    for old in older[keep_last - 1:]:
        fs.delete_dir(old)
    return ray.train.Checkpoint(dest, filesystem=fs)


# ----------------------------------------------------------------------------- encoders


@dataclass
class PretrainedEncoder:
    encoder: MaskedViT
    model: ModelConfig  # the architecture of `encoder`
    config: Config | None  # the whole run config, when the source records it
    run_id: str | None  # the MLflow run the weights belong to, when known
    epoch: int | None  # training epochs behind the weights, when known


def load_encoder(run_id: str | None = None, checkpoint: str | Path | None = None,
                 tracking_uri: str | None = None) -> PretrainedEncoder:
    """The encoder (eval mode, on CPU) from exactly one of run_id / checkpoint."""
    if (run_id is None) == (checkpoint is None):
        raise ValueError("give exactly one of run_id and checkpoint")
    if run_id is not None:
        return _from_run(str(run_id), tracking_uri)
    return _from_path(Path(checkpoint))


def export_encoder(encoder: MaskedViT, model: ModelConfig, directory: str | Path
                   ) -> Path:
    """Write `encoder_timm.pth` + `timm_model.json` into directory (the layout of a run's
    `encoder/` artifacts, which load_encoder(checkpoint=directory) reads). Returns the weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(timm_state_dict(encoder), directory / TIMM_WEIGHTS)
    (directory / TIMM_JSON).write_text(json.dumps(
        {"model_name": TIMM_NAMES[model.name], "num_classes": 0, **timm_kwargs(model)}, indent=1))
    return directory / TIMM_WEIGHTS


def _from_run(run_id: str, tracking_uri: str | None) -> PretrainedEncoder:
    from mlflow.exceptions import MlflowException  # mlflow: 2 s to import; workers rarely need it

    uri = tracking_uri or default_tracking_uri()
    client = mlflow_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"config error: MLflow run {run_id!r} not found in {uri}") from None
    with tempfile.TemporaryDirectory() as d:
        try:
            local = Path(client.download_artifacts(run_id, "encoder", d))
            state = torch.load(local / TIMM_WEIGHTS, map_location="cpu", weights_only=True)
            meta = json.loads((local / TIMM_JSON).read_text())
        except (MlflowException, OSError):
            raise ConfigError(f"config error: MLflow run {run_id!r} has no encoder/"
                              f"{TIMM_WEIGHTS} artifact (did it finish? status "
                              f"{run.info.status})") from None
    model = model_from_timm_json(meta)
    try:
        config: Config | None = config_from_params(run.data.params)
        config.model = model
    except ConfigError:
        config = None
    epoch = run.data.metrics.get("epoch")
    return PretrainedEncoder(encoder_from_timm(state, model), model, config, run_id,
                             int(epoch) if epoch is not None else None)


def _from_path(path: Path) -> PretrainedEncoder:
    if path.is_dir():
        for name in (STATE_FILE, TIMM_WEIGHTS):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise ConfigError(f"config error: {path}: no {STATE_FILE} or {TIMM_WEIGHTS} in it")
    if not path.is_file():
        raise ConfigError(f"config error: {path}: no such checkpoint")
    if path.name == TIMM_WEIGHTS or path.suffix == ".pth" and (path.parent / TIMM_JSON).is_file():
        meta_path = path.parent / TIMM_JSON
        if not meta_path.is_file():
            raise ConfigError(f"config error: {path}: exported weights need {TIMM_JSON} beside "
                              "them (the architecture)")
        model = model_from_timm_json(json.loads(meta_path.read_text()))
        state = torch.load(path, map_location="cpu", weights_only=True)
        return PretrainedEncoder(encoder_from_timm(state, model), model, None, None, None)
    # A training checkpoint: {"model": objective state, "config": ..., "epoch": ...}.
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"config error: {path}: not a micl training checkpoint")
    config = from_dict(state["config"])
    encoder = MaskedViT.from_config(config.model)
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state["model"].items()
                             if k.startswith("encoder.")}, strict=True)
    return PretrainedEncoder(encoder.eval(), config.model, config, state.get("mlflow_run_id"),
                             state.get("epoch"))
