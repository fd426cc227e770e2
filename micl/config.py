"""Typed run configuration: defaults in code, a YAML file overrides them, `--set` overrides
the file.

    cfg = load_config("configs/fashion_mnist_quality.yaml", ["method.mask_ratio=0.75"])

The generic fields are validated here; `data.source` and the `method.*` fields belong to the
data-source and method registries, which check them in the driver (`micl.driver.check`) before
Ray starts. Either way a bad value raises `ConfigError` naming the field
(`method.mask_ratio = 1.5: must be in (0, 1)`).
"""

from __future__ import annotations

import copy
import dataclasses
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
    def grid(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


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
    # Each training worker mixes its batches within windows of this many consecutive rows
    # (micl.train.mix_batches): without it, a block's neighbouring rows form the same batches
    # every epoch (a Parquet shard's, an in-memory set's), so MiCL meets the same negatives
    # each epoch. Costs a copy of each batch and this many rows of memory (300 MB at 224 px).
    # 0: batches in stream order.
    shuffle_buffer: int = 2048
    data_cpus: float = 1.0  # CPUs reserved by each Ray Data decode/mask task
    # Node labels the decode/mask tasks require (Ray's label_selector), e.g. {micl-role: data}
    # for the CPU-only nodes of cluster.yaml, so that the training nodes' CPUs feed their
    # GPUs only; empty (one machine): wherever a CPU is free.
    node_labels: dict[str, str] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """`method.name` picks the method. Every other `method.<field>` belongs to that method's own
    `Args` dataclass in `micl/objectives/<name>.py`, with that paper's defaults: it is kept here
    as given (`args`) and typed and checked by the method (`micl.objectives.check`), which also
    fills in the method's defaults so that a run records every setting it trained with."""

    name: str = "micl"
    args: dict[str, Any] = field(default_factory=dict)


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
    min_lr: float = 0.0  # the cosine schedule ends here (MAE fine-tuning: 1e-6)
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" (checkpoint first) or "skip"


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning of a pre-trained encoder (`pipelines/finetune.py`), MAE's recipe
    by default (FINETUNE.md, which MiCL's code follows). Pre-training ignores this section."""

    init: str = "scratch"  # "scratch", an MLflow run id, or a checkpoint / exported encoder path
    num_classes: int | None = None  # None: the data source's class count
    global_pool: str = "avg"  # "avg": mean of patch tokens + fc_norm (MAE); "token": cls token
    drop_path: float = 0.1  # stochastic depth: ViT-B 0.1, ViT-L 0.2, ViT-H 0.3
    layer_decay: float = 0.75  # lr scale per layer from the head down: ViT-B 0.65, ViT-L 0.75
    head_init_std: float = 2e-5  # trunc-normal std of the new linear head
    label_smoothing: float = 0.1
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    mixup_prob: float = 1.0  # chance that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # chance of CutMix instead of Mixup when both are on
    randaug: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment config string; "" for none
    reprob: float = 0.25  # random-erasing probability (per image, on the device)
    eval_crop_pct: float = 0.875  # eval: centre crop of this fraction (resize 256 -> crop 224)
    label_fraction: float = 1.0  # low-shot: train on this fixed fraction of the train labels
    label_seed: int = 0  # picks the low-shot subset (the same seed gives the same images)
    experiment: str = "micl-finetune"  # the MLflow experiment of fine-tuning runs


@dataclass
class RunSettings:
    name: str | None = None  # Ray Train run name; reusing a name resumes that run
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    # GPUs per training worker with use_gpu: 1 is the usual; a fraction (0.5) lets two Tune
    # trials share one GPU, an integer > 1 suits a model-parallel loop.
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    # Custom resources each training worker requests besides CPU/GPU, e.g. {trainer: 1} to
    # keep training workers on the nodes that advertise `trainer` (GPU does this on GPU nodes).
    worker_resources: dict[str, float] = field(default_factory=dict)
    # torch.compile the training module (inductor): faster steps on GPU once compiled, at a
    # compile cost of tens of seconds per worker start (benchmarks/gpu_check.py measures both).
    compile: bool = False
    storage_path: str | None = None  # default: ./runs (absolute); may be s3://...
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str = "micl-pretrain"
    checkpoint_every: int = 1  # epochs
    eval_every: int = 1  # epochs between kNN evaluations (the last epoch always evaluates)
    log_every_steps: int = 10  # MLflow step/loss, step/lr, step/images_per_s every N steps
    register_model: str | None = None  # also register the encoder in MLflow's model registry
    progress_every_s: float = 10.0  # a progress line this often when the output is no terminal
    system_metrics_every_s: float = 10.0  # MLflow system metrics (CPU, memory, GPU); 0: off
    keep_last: int = 2
    max_failures: int = 0
    torch_threads: int | None = None  # intra-op threads per training worker (None: Ray's choice)
    # Python modules imported by the driver and by every worker before the config is checked:
    # a method or data source defined outside micl registers itself there (on the workers'
    # PYTHONPATH, e.g. shipped with `ray job submit --working-dir`).
    import_modules: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunSettings = field(default_factory=RunSettings)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values; the method's args sit beside its name, as in the YAML."""
        values = dataclasses.asdict(self)
        values["method"] = {"name": self.method.name, **values["method"]["args"]}
        return values

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
    """Raise ConfigError naming the first bad generic field (data.source and method.* are the
    registries' to check: `micl.driver.check`)."""
    _validate_model(cfg.model)
    _validate_data(cfg.data)
    _validate_optim(cfg.optim)
    _validate_run(cfg.run)
    _validate_finetune(cfg.finetune)
    if not isinstance(cfg.method.name, str) or not cfg.method.name:
        raise _err("method.name", cfg.method.name, "must be a method name")


def _validate_model(m: ModelConfig) -> None:
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


def _validate_data(d: DataConfig) -> None:
    _positive("data.batch_size", d.batch_size)
    _positive("data.map_batch_size", d.map_batch_size)
    if d.shuffle_buffer < 0:
        raise _err("data.shuffle_buffer", d.shuffle_buffer, "must be >= 0 (0: no shuffle)")
    if not 0 < d.crop_scale_min <= d.crop_scale_max <= 1:
        raise _err("data.crop_scale_min", d.crop_scale_min,
                   "need 0 < crop_scale_min <= crop_scale_max <= 1")
    if len(d.mean) != len(d.std) or len(d.mean) not in (1, 3):
        raise _err("data.mean", d.mean, "mean and std need 1 or 3 values each")
    if any(s <= 0 for s in d.std):
        raise _err("data.std", d.std, "must be > 0")
    if not 0 <= d.max_bad_fraction <= 1:
        raise _err("data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1]")
    for key, value in d.node_labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise _err(f"data.node_labels.{key}", value, "node labels map strings to strings")
    for key in ("limit_train", "knn_bank_size", "knn_query_size"):
        _positive(f"data.{key}", getattr(d, key), allow_none=True)


def _validate_optim(o: OptimConfig) -> None:
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
    if o.min_lr < 0:
        raise _err("optim.min_lr", o.min_lr, "must be >= 0")
    if o.nonfinite not in ("stop", "skip"):
        raise _err("optim.nonfinite", o.nonfinite, "choose 'stop' or 'skip'")


def _validate_run(r: RunSettings) -> None:
    if not isinstance(r.num_workers, int) or r.num_workers < 0:
        raise _err("run.num_workers", r.num_workers, "must be an integer >= 0")
    _positive("run.cpus_per_worker", r.cpus_per_worker)
    _positive("run.gpus_per_worker", r.gpus_per_worker)
    for key, amount in r.worker_resources.items():
        _positive(f"run.worker_resources.{key}", amount)
    if r.gpus_per_worker > 1 and r.gpus_per_worker != int(r.gpus_per_worker):
        raise _err("run.gpus_per_worker", r.gpus_per_worker,
                   "a fraction of one GPU (<= 1) or a whole number of GPUs")
    _positive("run.checkpoint_every", r.checkpoint_every)
    _positive("run.eval_every", r.eval_every)
    _positive("run.log_every_steps", r.log_every_steps)
    _positive("run.progress_every_s", r.progress_every_s)
    if r.system_metrics_every_s < 0:
        raise _err("run.system_metrics_every_s", r.system_metrics_every_s, "must be >= 0 (0: off)")
    _positive("run.keep_last", r.keep_last)
    if r.max_failures < -1:
        raise _err("run.max_failures", r.max_failures, "must be >= -1 (-1 retries forever)")


def _validate_finetune(f: FinetuneConfig) -> None:
    if not isinstance(f.init, str) or not f.init:
        raise _err("finetune.init", f.init, "'scratch', an MLflow run id or a checkpoint path")
    _positive("finetune.num_classes", f.num_classes, allow_none=True)
    if f.global_pool not in ("avg", "token"):
        raise _err("finetune.global_pool", f.global_pool, "choose 'avg' or 'token'")
    for key in ("drop_path", "label_smoothing", "mixup_prob", "mixup_switch_prob", "reprob"):
        if not 0 <= getattr(f, key) <= 1:
            raise _err(f"finetune.{key}", getattr(f, key), "must be in [0, 1]")
    if not 0 < f.layer_decay <= 1:
        raise _err("finetune.layer_decay", f.layer_decay, "must be in (0, 1] (1: no decay)")
    for key in ("mixup", "cutmix", "head_init_std"):
        if getattr(f, key) < 0:
            raise _err(f"finetune.{key}", getattr(f, key), "must be >= 0")
    for key in ("eval_crop_pct", "label_fraction"):
        if not 0 < getattr(f, key) <= 1:
            raise _err(f"finetune.{key}", getattr(f, key), "must be in (0, 1]")
    if f.randaug and not f.randaug.startswith("rand-"):
        raise _err("finetune.randaug", f.randaug,
                   "a timm RandAugment string such as 'rand-m9-mstd0.5-inc1', or '' for none")


def merge_fields(obj: Any, values: dict[str, Any], prefix: str) -> None:
    """Set dataclass fields from a (nested) dict, rejecting unknown keys by their dotted name
    (`prefix` + key) and values of the wrong type. The methods' `Args` use it too."""
    if not isinstance(values, dict):
        raise _err(prefix.rstrip(".") or "<config>", values, "expected a mapping")
    if isinstance(obj, MethodConfig):  # the method's own fields are typed by the method
        for key, value in values.items():
            if key == "name":
                obj.name = value
            else:
                obj.args[key] = value
        return
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise _err(f"{prefix}{key}", value, f"unknown field; known: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge_fields(current, value, f"{prefix}{key}.")
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
    if isinstance(current, dict) and isinstance(value, dict):
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
    merge_fields(cfg, copy.deepcopy(values or {}), "")
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
        merge_fields(cfg, values, "")
    return with_overrides(cfg, overrides, flat_overrides)


def with_overrides(cfg: Config, overrides: list[str] | None = None,
                   flat_overrides: dict[str, Any] | None = None) -> Config:
    """A validated copy of cfg with `section.field=value` strings and a dotted dict applied."""
    flat = dict(parse_override(o) for o in overrides or [])
    flat.update(flat_overrides or {})
    out = from_dict(cfg.to_dict())
    merge_fields(out, nest(flat), "")
    return out.validate()


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_from_params(params: dict[str, str]) -> Config:
    """A Config from MLflow params (the flattened config as strings). Each value is parsed by
    its field's type (method fields as YAML scalars: the method types them); params of fields
    this version does not know are ignored."""
    defaults = Config()
    types = {f"{s.name}.{f.name}": str(f.type)  # e.g. "int | None" (annotations are strings)
             for s in dataclasses.fields(defaults)
             for f in dataclasses.fields(getattr(defaults, s.name))}
    values: dict[str, Any] = {}
    for key, raw in params.items():
        if key in types and key != "method.args":
            values[key] = _parse_param(raw, types[key])
        elif key.startswith("method."):
            values[key] = None if raw == "None" else _parse_param(raw, "")
    return from_dict(nest(values))


def _parse_param(raw: str, type_name: str) -> Any:
    if raw == "None" and "None" in type_name:
        return None
    if type_name.startswith("str"):
        return raw
    if type_name == "bool":
        return raw == "True"
    try:
        return yaml.safe_load(raw)  # numbers, lists, bools
    except yaml.YAMLError:
        return raw
