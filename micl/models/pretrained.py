"""Load a pre-trained encoder of this pipeline (a MimCo teacher, an encoder to evaluate).

    enc = load_encoder(run_id="3f2c...", tracking_uri="sqlite:////abs/mlflow.db")
    enc = load_encoder(checkpoint="runs/micl-20250101-120000/checkpoint_000003")

Sources, with where the architecture comes from:

- an MLflow run id: its `encoder/encoder_timm.pth` + `encoder/timm_model.json` artifacts (what
  the training loop logs at the end) and its params (the flattened run config);
- a Ray Train checkpoint directory, or the `state.pt` in it (micl.train): the `encoder.*`
  weights of the objective and the config stored with them;
- an exported `encoder_timm.pth` (or a directory holding it) with `timm_model.json` beside it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from micl.config import Config, ConfigError, ModelConfig, from_dict, nest
from micl.models.export import TIMM_NAMES, timm_kwargs, timm_state_dict
from micl.models.vit import MaskedViT

STATE_FILE = "state.pt"  # micl.train.STATE_FILE (not imported: micl.train imports evaluation)
TIMM_WEIGHTS, TIMM_JSON = "encoder_timm.pth", "timm_model.json"


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


# ----------------------------------------------------------------------------- conversions


def encoder_from_timm(state: dict[str, torch.Tensor], model: ModelConfig) -> MaskedViT:
    """Inverse of export.timm_state_dict: drop the zero cls row of the position embedding."""
    state = dict(state)
    state["pos_embed"] = state["pos_embed"][:, 1:]  # [1, 1 + L, D] -> [1, L, D]
    encoder = MaskedViT.from_config(model)
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def model_from_timm_json(meta: dict[str, Any]) -> ModelConfig:
    """ModelConfig from the `timm_model.json` the training loop writes."""
    names = {v: k for k, v in reversed(list(TIMM_NAMES.items()))}  # first of ours wins
    return ModelConfig(name=names.get(meta.get("model_name"), "vit_tiny"),
                       img_size=int(meta["img_size"]), patch_size=int(meta["patch_size"]),
                       in_chans=int(meta["in_chans"]), embed_dim=int(meta["embed_dim"]),
                       depth=int(meta["depth"]), num_heads=int(meta["num_heads"]),
                       mlp_ratio=float(meta.get("mlp_ratio", 4.0)))


def config_from_params(params: dict[str, str]) -> Config:
    """A Config from MLflow params (the flattened config as strings). Each value is parsed by
    its field's type; params of fields this version does not know are ignored."""
    defaults = Config()
    types = {f"{s.name}.{f.name}": str(f.type)  # e.g. "int | None" (annotations are strings)
             for s in dataclasses.fields(defaults)
             for f in dataclasses.fields(getattr(defaults, s.name))}
    values: dict[str, Any] = {}
    for key, raw in params.items():
        if key in types:
            values[key] = _parse_param(raw, types[key])
    return from_dict(nest(values))


def _parse_param(raw: str, type_name: str) -> Any:
    if raw == "None" and "None" in type_name:
        return None
    if type_name.startswith("str"):
        return raw
    if type_name == "bool":
        return raw == "True"
    try:
        return yaml.safe_load(raw)  # numbers, lists
    except yaml.YAMLError:
        return raw


# ----------------------------------------------------------------------------- sources


def _from_run(run_id: str, tracking_uri: str | None) -> PretrainedEncoder:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from micl.tracking import tracking_uri as default_uri

    uri = tracking_uri or default_uri()
    client = MlflowClient(tracking_uri=uri)
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
