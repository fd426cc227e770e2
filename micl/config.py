"""Typed run configuration: defaults in code, a YAML file overrides them, `--set` overrides
the file.

    cfg = load_config("configs/fashion_mnist_tiny.yaml", ["method.mask_ratio=0.75"])

Every field is validated before Ray starts; a bad value raises `ConfigError` whose message
names the field (`method.mask_ratio = 1.5: must be in (0, 1)`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# name -> (embed_dim, depth, num_heads); the standard ViT family.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_pico": (96, 4, 3),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}
DATA_SOURCES = ("fashion_mnist", "imagefolder", "parquet", "synthetic")
NEGATIVES = ("local", "global")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass
class ModelConfig:
    name: str = "vit_tiny"
    img_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    # Overrides of the named size (None keeps the size's value).
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0

    def dims(self) -> tuple[int, int, int]:
        """(embed_dim, depth, num_heads) after overrides."""
        d, n, h = MODEL_SIZES[self.name]
        return (self.embed_dim or d, self.depth or n, self.num_heads or h)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclass
class DataConfig:
    source: str = "fashion_mnist"
    # fashion_mnist: directory of the IDX files; imagefolder: root holding `train/` and `val/`
    # (or class folders directly); parquet: root holding `train/` and `val/` shards.
    path: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 256  # per training worker
    crop_scale_min: float = 0.2
    crop_scale_max: float = 1.0
    hflip: bool = True
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    limit_train: int | None = None  # use only the first N training samples
    knn_bank_size: int | None = 10000  # subsample of the train split used as the kNN bank
    knn_query_size: int | None = 10000  # subsample of the val split used as kNN queries
    synthetic_size: int = 512  # number of generated samples for source=synthetic
    synthetic_classes: int = 4
    max_bad_fraction: float = 0.1  # fail when more than this fraction of files is undecodable
    map_batch_size: int = 64  # rows per Ray Data map task
    data_cpus: float = 1.0  # CPUs reserved by each Ray Data decode/mask task


@dataclass
class MethodConfig:
    name: str = "micl"
    mask_ratio: float = 0.9
    temperature: float = 0.07
    kappa: float = 1 / 64
    negatives: str = "local"
    # MAE / MACRL / MimCo (checked by each method's validate; defaults: MAE and MoCo v3).
    decoder_dim: int = 512  # MAE decoder (MimCo: predictor) width, depth and heads
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # reconstruct per-patch normalised pixels (MAE, MACRL)
    strong_mask_ratio: float = 0.9  # MACRL: the strongly augmented branch's mask ratio
    lambda_c: float = 1.0  # MACRL: contrastive loss weight
    lambda_r: float = 1.0  # MACRL: reconstruction loss weight
    proj_dim: int = 256  # MACRL: projector output (MoCo v3: 3-layer MLP, 4096 hidden)
    proj_hidden_dim: int = 4096
    share_decoder: bool = True  # MACRL: one decoder for both branches (False: one each)
    teacher_run_id: str | None = None  # MimCo: MLflow run id of the frozen teacher ...
    teacher_checkpoint: str | None = None  # ... or a state.pt / checkpoint dir / encoder_timm.pth
    patch_loss_weight: float = 1.0  # MimCo: patch-level contrastive loss weight
    image_loss_weight: float = 1.0  # MimCo: image-level contrastive loss weight
    patch_negatives: str = "batch"  # MimCo: "batch" (all masked patches) or "image" (same image)


@dataclass
class OptimConfig:
    blr: float = 5e-5  # lr = blr * global_batch / 256
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    epochs: int = 200
    warmup_epochs: float = 10.0
    grad_accum_steps: int = 1
    clip_grad: float | None = None
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" (checkpoint first) or "skip"


@dataclass
class RunSettings:
    name: str | None = None  # Ray Train run name; reusing a name resumes that run
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str | None = None  # default: ./runs (absolute); may be s3://...
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str = "micl-pretrain"
    checkpoint_every: int = 1  # epochs
    eval_every: int = 1  # epochs between kNN evaluations (the last epoch always evaluates)
    keep_last: int = 2
    max_failures: int = 0
    torch_threads: int | None = None  # intra-op threads per training worker (None: Ray's choice)
    # Tests only: "rank@step" kills that worker once at that optimizer step. Refused unless the
    # driver's environment has MICL_ALLOW_FAULT_INJECTION=1, so no real run can trigger it.
    inject_fault: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunSettings = field(default_factory=RunSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted-name view, e.g. {"method.mask_ratio": 0.9, ...} (MLflow params, Tune spaces)."""
        return {f"{s}.{k}": v for s, sub in self.to_dict().items() for k, v in sub.items()}

    def validate(self) -> Config:
        validate(self)
        return self


def _err(name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config error: {name} = {value!r}: {why}")


def _positive(name: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not isinstance(value, int | float) or not value > 0:
        raise _err(name, value, "must be a number > 0")


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first bad field."""
    from micl.objectives import OBJECTIVES  # the registry decides which methods exist

    m, d, me, o, r = cfg.model, cfg.data, cfg.method, cfg.optim, cfg.run
    if m.name not in MODEL_SIZES:
        raise _err("model.name", m.name, f"unknown model; choose one of {sorted(MODEL_SIZES)}")
    for key in ("img_size", "patch_size", "in_chans"):
        _positive(f"model.{key}", getattr(m, key))
    if m.img_size % m.patch_size:
        raise _err("model.img_size", m.img_size,
                   f"not divisible by model.patch_size = {m.patch_size}")
    for key in ("embed_dim", "depth", "num_heads"):
        _positive(f"model.{key}", getattr(m, key), allow_none=True)
    dim, _, heads = m.dims()
    if dim % heads:
        raise _err("model.embed_dim", dim, f"not divisible by model.num_heads = {heads}")

    if d.source not in DATA_SOURCES:
        raise _err("data.source", d.source, f"unknown source; choose one of {list(DATA_SOURCES)}")
    if d.source in ("imagefolder", "parquet") and not d.path:
        raise _err("data.path", d.path, f"required for data.source = {d.source}")
    _positive("data.batch_size", d.batch_size)
    _positive("data.map_batch_size", d.map_batch_size)
    if not 0 < d.crop_scale_min <= d.crop_scale_max <= 1:
        raise _err("data.crop_scale_min", d.crop_scale_min,
                   "need 0 < crop_scale_min <= crop_scale_max <= 1")
    if len(d.mean) != len(d.std) or len(d.mean) not in (1, 3):
        raise _err("data.mean", d.mean, "mean and std need 1 or 3 values each")
    if any(s <= 0 for s in d.std):
        raise _err("data.std", d.std, "must be > 0")
    if not 0 <= d.max_bad_fraction <= 1:
        raise _err("data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1]")
    for key in ("limit_train", "knn_bank_size", "knn_query_size"):
        _positive(f"data.{key}", getattr(d, key), allow_none=True)

    if me.name not in OBJECTIVES:
        raise _err("method.name", me.name, f"unknown method; choose one of {sorted(OBJECTIVES)}")
    r_ = me.mask_ratio
    if not isinstance(r_, int | float) or not 0 < r_ < 1:
        raise _err("method.mask_ratio", r_, "must be in (0, 1)")
    if math.isnan(me.temperature) or me.temperature <= 0:
        raise _err("method.temperature", me.temperature, "must be > 0")
    if me.kappa < 0:
        raise _err("method.kappa", me.kappa, "must be >= 0")
    if me.negatives not in NEGATIVES:
        raise _err("method.negatives", me.negatives, f"choose one of {list(NEGATIVES)}")
    OBJECTIVES[me.name].validate(cfg)

    _positive("optim.blr", o.blr)
    _positive("optim.epochs", o.epochs)
    _positive("optim.grad_accum_steps", o.grad_accum_steps)
    if o.weight_decay < 0:
        raise _err("optim.weight_decay", o.weight_decay, "must be >= 0")
    if not 0 <= o.warmup_epochs <= o.epochs:
        raise _err("optim.warmup_epochs", o.warmup_epochs, "must be in [0, optim.epochs]")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            raise _err(f"optim.{key}", getattr(o, key), "must be in [0, 1)")

    if not isinstance(r.num_workers, int) or r.num_workers < 0:
        raise _err("run.num_workers", r.num_workers, "must be an integer >= 0")
    _positive("run.cpus_per_worker", r.cpus_per_worker)
    _positive("run.checkpoint_every", r.checkpoint_every)
    _positive("run.eval_every", r.eval_every)
    _positive("run.keep_last", r.keep_last)
    if r.max_failures < -1:
        raise _err("run.max_failures", r.max_failures, "must be >= -1 (-1 retries forever)")
    if o.nonfinite not in ("stop", "skip"):
        raise _err("optim.nonfinite", o.nonfinite, "choose 'stop' or 'skip'")
    if r.inject_fault is not None:
        if os.environ.get("MICL_ALLOW_FAULT_INJECTION") != "1":
            raise _err("run.inject_fault", r.inject_fault, "a test-only hook: set "
                       "MICL_ALLOW_FAULT_INJECTION=1 in the environment to use it")
        if not re.fullmatch(r"\d+@\d+", str(r.inject_fault)):
            raise _err("run.inject_fault", r.inject_fault, "expected 'rank@step', e.g. 1@9")


def _merge(obj: Any, values: dict[str, Any], prefix: str) -> None:
    """Set dataclass fields from a (nested) dict, rejecting unknown keys by their dotted name."""
    if not isinstance(values, dict):
        raise _err(prefix.rstrip(".") or "<config>", values, "expected a mapping")
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise _err(f"{prefix}{key}", value, f"unknown field; known: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(f"{prefix}{key}", current, value))


def _coerce(name: str, current: Any, value: Any) -> Any:
    """Keep types honest: 1 -> 1.0 for floats, and reject e.g. a string for a number."""
    if value is None or current is None:
        return value
    is_number = isinstance(current, int | float) and not isinstance(current, bool)
    if is_number and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            value = float(value)
        except ValueError:
            raise _err(name, value, f"expected a {type(current).__name__}") from None
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise _err(name, value, "expected true or false")
        return value
    if is_number and isinstance(current, float) and isinstance(value, int | float) \
            and not isinstance(value, bool):
        return float(value)
    if isinstance(current, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(current, str) and isinstance(value, str):
        return value
    if isinstance(current, list) and isinstance(value, list):
        return value
    raise _err(name, value, f"expected a {type(current).__name__}")


def parse_override(text: str) -> tuple[str, Any]:
    """'method.mask_ratio=0.75' -> ('method.mask_ratio', 0.75); values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} is not of the form section.field=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def from_dict(values: dict[str, Any]) -> Config:
    cfg = Config()
    _merge(cfg, values or {}, "")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                flat_overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- `section.field=value` overrides, then validate."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config error: config file {str(p)!r} does not exist")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config error: {p} is not valid YAML: {e}") from None
        _merge(cfg, values, "")
    flat = dict(parse_override(o) for o in overrides or [])
    flat.update(flat_overrides or {})
    _merge(cfg, nest(flat), "")
    return cfg.validate()


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
