"""Supervised fine-tuning of a pre-trained encoder, the papers' headline protocol (MAE's
FINETUNE.md recipe, which the MiCL code follows), on the same Ray Train + MLflow footing as
pre-training.

    result = run_finetuning(load_config("configs/finetune_fashion_mnist.yaml",
                                        ["finetune.init=<pre-training MLflow run id>"]))

`finetune.init` is "scratch" (the supervised baseline, same recipe), an MLflow run id, a Ray
Train checkpoint or an exported encoder. The model is timm's VisionTransformer with a new head
(`models.classifier`), trained by the pre-training loop's own pieces: the data stream (crop,
flip, RandAugment on the cluster's CPUs), `train_epoch`/`train_step`, checkpoints, resume and
MLflow logging. What differs lives here: the criterion (Mixup/CutMix + soft-target cross
entropy, random erasing on the device), layer-wise lr decay, and the val top-1/top-5 pass.

MLflow: the run goes to `finetune.experiment`, tagged with the pre-training run it started
from; that run gets `finetune_top1`/`finetune_top5` (suffix `_<p>pct` for a low-shot run) and a
tag back to this one, so `compare(metric="finetune_top1")` ranks pre-training runs by it.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn

from micl.artifacts import PretrainedEncoder, load_encoder
from micl.config import Config, ConfigError, ModelConfig, from_dict
from micl.console import ProgressView, watch
from micl.data.sources import check_source, class_names, load_split
from micl.data.stream import (
    StreamSpec,
    eval_stream,
    keep_label_subset,
    subset_suffix,
    train_stream,
)
from micl.data.transforms import normalize
from micl.driver import (
    Trainer,
    check_data_nodes,
    connect_ray,
    fit_tracked,
    log_training_data,
    loop_spec,
    resolve,
    train_set,
    trainer_for,
)
from micl.models.classifier import classifier_kwargs, create_classifier, load_encoder_weights
from micl.models.export import TIMM_NAMES, timm_state_dict
from micl.tracking import (
    FINETUNE_RUN_TAG,
    PRETRAIN_RUN_TAG,
    ROLE_TAG,
    RunLogger,
    open_run,
)
from micl.train import (
    Host,
    LoopSpec,
    StepHook,
    Worker,
    base_lr,
    epoch_metrics,
    open_spec,
    print_epoch,
    resume,
    run_logger,
    save_and_report,
    system_metrics,
    train_epoch,
    unwrap,
    worker_context,
    wrap_model,
)

CLASSIFIER_WEIGHTS, CLASSIFIER_JSON = "classifier_timm.pth", "timm_model.json"
RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id

# ----------------------------------------------------------------------------- worker side


@dataclass
class FinetuneSpec:
    loop: LoopSpec
    num_classes: int
    init_weights: Any = None  # ObjectRef of the encoder's timm state dict; None: from scratch


class Classifier(nn.Module):
    """timm's ViT plus its training criterion, shaped like an objective (`forward(batch) ->
    (loss, metrics)`), so that `train_step` and `train_epoch` drive it unchanged. In training
    mode a batch is randomly erased and mixed (Mixup/CutMix with label smoothing) first."""

    def __init__(self, net: nn.Module, cfg: Config, num_classes: int) -> None:
        super().__init__()
        f = cfg.finetune
        self.net = net
        self.mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob,
                           switch_prob=f.mixup_switch_prob, label_smoothing=f.label_smoothing,
                           num_classes=num_classes) if f.mixup or f.cutmix else None
        self.erase = RandomErasing(f.reprob, mode="pixel", max_count=1, device="cpu") \
            if f.reprob else None
        # Mixup's targets are soft (label smoothing included); hard labels otherwise, and
        # always outside training.
        self.hard_criterion = LabelSmoothingCrossEntropy(f.label_smoothing) \
            if f.label_smoothing else nn.CrossEntropyLoss()
        self.criterion = SoftTargetCrossEntropy() if self.mixup else self.hard_criterion

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x, y = batch["image"], batch["label"]  # x: [B, C, H, W] normalised, y: [B]
        if self.training:
            if self.erase is not None:
                self.erase.device = x.device  # its noise is drawn where the batch is
                x = self.erase(x)
            if self.mixup is not None:
                x, y = self.mixup(x, y)  # y: [B, num_classes] soft targets
        logits = self.net(x).float()
        return (self.criterion if self.training else self.hard_criterion)(logits, y), {}

    def after_step(self, step: int, total_steps: int) -> None:
        """Nothing to update between steps (no EMA, as in MAE's recipe)."""


def layer_decay_groups(net: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """timm's layer-wise lr decay groups (each with an `lr_scale` the loop applies every step):
    MAE's recipe, no weight decay on biases, norms, the position embedding and the cls token."""
    return param_groups_layer_decay(net, weight_decay=cfg.optim.weight_decay,
                                    no_weight_decay_list=net.no_weight_decay(),
                                    layer_decay=cfg.finetune.layer_decay)


def build_classifier(cfg: Config, num_classes: int, init_weights: Any) -> Classifier:
    f = cfg.finetune
    net = create_classifier(cfg.model, num_classes, f.global_pool, f.drop_path)
    if init_weights is not None:
        load_encoder_weights(net, ray.get(init_weights), f.head_init_std)
    return Classifier(net, cfg, num_classes)


@torch.no_grad()
def evaluate_classifier(net: nn.Module, cfg: Config, w: Worker) -> dict[str, float]:
    """Top-1 / top-5 / loss on the val split, each worker its shard, summed over workers."""
    net.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=w.device)  # top1, top5, loss, n
    for batch in w.host.shard("val").iter_torch_batches(batch_size=256):
        x = normalize(batch["image"].to(w.device), cfg.data.mean, cfg.data.std)
        y = batch["label"].to(w.device)
        with torch.autocast(w.device.type, dtype=w.autocast_dtype,
                            enabled=w.autocast_dtype is not None):
            logits = net(x).float()  # [B, classes]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [B, 5]
        hits = top == y[:, None]
        sums += torch.stack([hits[:, 0].sum(), hits.any(1).sum(),
                             F.cross_entropy(logits, y, reduction="sum"),
                             torch.tensor(len(y), device=w.device)]).double()
    net.train()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    top1, top5, loss, n = sums.tolist()
    if n == 0:
        raise RuntimeError("the val split gave no image to evaluate")
    return {"val_top1": top1 / n, "val_top5": top5 / n, "val_loss": loss / n, "val_images": n}


def finetune_loop_per_worker(loop_config: dict[str, bytes], host: Host | None = None) -> None:
    spec: FinetuneSpec = open_spec(loop_config)
    cfg = from_dict(spec.loop.config)
    w = worker_context(cfg, spec.loop, host)
    model = build_classifier(cfg, spec.num_classes, spec.init_weights)
    opt = torch.optim.AdamW(layer_decay_groups(model.net, cfg), lr=base_lr(cfg, w.world),
                            betas=(cfg.optim.beta1, cfg.optim.beta2),
                            fused=w.device.type == "cuda" or None)
    state = resume(model, opt, spec.loop, w)
    wrapped = wrap_model(model, w, cfg.run.compile)
    logger = run_logger(spec.loop, cfg, w)
    if logger and state.epoch == 0:
        logger.config(cfg)
    with system_metrics(logger, cfg):
        while state.epoch < cfg.optim.epochs:
            sums = train_epoch(wrapped, opt, cfg, spec.loop, state, w, logger)
            metrics = {**epoch_metrics(sums, cfg, spec.loop, state, w),
                       **evaluate_classifier(unwrap(wrapped).net, cfg, w)}
            print_epoch(metrics, cfg, w)
            save_and_report(wrapped, opt, cfg, spec.loop, state, metrics, w, logger)
    if logger:
        with tempfile.TemporaryDirectory() as d:
            for path in export_classifier(model.net, cfg.model, spec.num_classes,
                                          cfg.finetune.global_pool, d):
                logger.artifact(path, "classifier")
        logger.model(model.net, "micl_classifier", step=state.epoch)  # not the folder's name
        logger.flush()


def export_classifier(net: nn.Module, m: ModelConfig, num_classes: int, global_pool: str,
                      directory: str | Path) -> list[Path]:
    """`classifier_timm.pth` + `timm_model.json`: timm.create_model(json["model_name"],
    **json["kwargs"]) loads the weights strictly."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, meta = directory / CLASSIFIER_WEIGHTS, directory / CLASSIFIER_JSON
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, weights)
    meta.write_text(json.dumps({"model_name": TIMM_NAMES[m.name],
                                "kwargs": classifier_kwargs(m, num_classes, global_pool)},
                               indent=1))
    return [weights, meta]


# ----------------------------------------------------------------------------- driver side


@dataclass
class FinetuneResult:
    run_name: str
    mlflow_run_id: str | None  # None when the tracking store was unavailable
    pretrain_run_id: str | None  # the MLflow run the encoder came from, when known
    tracking_uri: str
    metrics: dict[str, Any]  # the last epoch's: val_top1, val_top5, loss, ...
    checkpoint_path: str | None
    storage_path: str


def load_init(cfg: Config) -> PretrainedEncoder | None:
    """The encoder `finetune.init` names (None for "scratch"), or a ConfigError naming it."""
    init = cfg.finetune.init
    if init == "scratch":
        return None
    if Path(init).exists():
        return load_encoder(checkpoint=init)
    if RUN_ID.fullmatch(init):
        return load_encoder(run_id=init, tracking_uri=cfg.run.tracking_uri)
    raise ConfigError(f"config error: finetune.init = {init!r}: not 'scratch', no such file or "
                      "directory, and not an MLflow run id (32 hex digits)")


def architecture(m: ModelConfig) -> tuple[Any, ...]:
    """What the weights fix; the size's name does not (a vit_pico exports as timm's vit_tiny
    with pico's dimensions, and comes back under that name)."""
    return (*m.dims(), m.img_size, m.patch_size, m.in_chans, m.mlp_ratio)


def describe(m: ModelConfig) -> str:
    dim, depth, heads = m.dims()
    return (f"{m.name} (embed_dim {dim}, depth {depth}, {heads} heads, {m.img_size} px, "
            f"patch {m.patch_size}, {m.in_chans} channels, mlp_ratio {m.mlp_ratio})")


def check_finetune(cfg: Config) -> tuple[Config, PretrainedEncoder | None]:
    """Everything that can be wrong before Ray starts, each error naming the field; fills in
    finetune.num_classes from the data. Returns the config and the encoder to start from."""
    cfg.validate()
    check_source(cfg)
    f = cfg.finetune
    if (f.mixup or f.cutmix) and cfg.data.batch_size % 2:
        raise ConfigError(f"config error: data.batch_size = {cfg.data.batch_size}: Mixup/CutMix "
                          "mix each image with its mirror in the batch, so it must be even (or "
                          "set finetune.mixup=0 and finetune.cutmix=0)")
    classes = len(class_names(cfg))
    if f.num_classes is None:
        f.num_classes = classes
    elif f.num_classes != classes:
        raise ConfigError(f"config error: finetune.num_classes = {f.num_classes}: the data "
                          f"(data.source = {cfg.data.source}) has {classes} classes")
    encoder = load_init(cfg)
    if encoder is not None and architecture(encoder.model) != architecture(cfg.model):
        raise ConfigError(f"config error: model.*: finetune.init = {f.init!r} holds a "
                          f"{describe(encoder.model)} encoder, but the config describes "
                          f"{describe(cfg.model)}; set model.* to the encoder's")
    return cfg, encoder


def finetune_params(cfg: Config) -> dict[str, Any]:
    """The flattened config of a fine-tuning run (the pre-training method does not apply)."""
    return {k: v for k, v in cfg.flat().items() if not k.startswith("method.")}


def build_finetune_trainer(cfg: Config, run_name: str, mlflow_run_id: str | None,
                           init_weights: Any, hooks: Sequence[StepHook] = (),
                           console_name: str | None = None) -> Trainer:
    f = cfg.finetune
    train, num_train = train_set(cfg)
    num_train = max(1, round(num_train * f.label_fraction))  # low-shot: the subset's size
    log_training_data(cfg, mlflow_run_id, num_train)
    spec = FinetuneSpec(loop_spec(cfg, run_name, num_train, mlflow_run_id, hooks, console_name),
                        f.num_classes, init_weights)
    views = StreamSpec(views={"image": f.randaug or "weak"})
    datasets = {
        "train": train_stream(keep_label_subset(train, f.label_fraction, f.label_seed), cfg,
                              spec.loop.clock_name, views),
        "val": eval_stream(load_split(cfg, cfg.data.val_split), cfg, f.eval_crop_pct)}
    return trainer_for(finetune_loop_per_worker, spec, cfg, run_name, datasets,
                       ["train", "val"])


def link_runs(cfg: Config, finetune_run: str | None, encoder: PretrainedEncoder | None,
              metrics: dict[str, Any]) -> None:
    """Write the fine-tuning result back to the pre-training run, with a tag to this run."""
    if not (finetune_run and encoder and encoder.run_id and "val_top1" in metrics):
        return
    suffix = subset_suffix(cfg.finetune.label_fraction)
    logger = RunLogger(cfg.run.tracking_uri, encoder.run_id)
    logger.metrics({f"finetune_top1{suffix}": metrics["val_top1"],
                    f"finetune_top5{suffix}": metrics["val_top5"]}, step=encoder.epoch or 0)
    logger.tags({FINETUNE_RUN_TAG: finetune_run})


def run_finetuning(cfg: Config, hooks: Sequence[StepHook] = ()) -> FinetuneResult:
    """Fine-tune from `finetune.init`, resuming when cfg.run.name names an earlier run. `hooks`
    run after every optimizer step on every worker (as in pre-training)."""
    cfg, encoder = check_finetune(cfg)
    cfg = resolve(cfg)
    connect_ray()
    check_data_nodes(cfg)
    run_name = cfg.run.name or f"finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {ROLE_TAG: "finetune", "micl.init": cfg.finetune.init}
    if encoder is not None and encoder.run_id:
        tags[PRETRAIN_RUN_TAG] = encoder.run_id
    mlflow_run_id = open_run(cfg, run_name, tags=tags, experiment=cfg.finetune.experiment,
                             params=finetune_params(cfg))
    logger = RunLogger(cfg.run.tracking_uri, mlflow_run_id) if mlflow_run_id else None
    # The weights go through the object store once; the driver holds the reference.
    weights = ray.put(timm_state_dict(encoder.encoder)) if encoder is not None else None
    with watch(ProgressView(every_s=cfg.run.progress_every_s)) as console:
        result = fit_tracked(lambda: build_finetune_trainer(
            cfg, run_name, mlflow_run_id, weights, hooks, console_name=console), logger)
    metrics = dict(result.metrics or {})
    link_runs(cfg, mlflow_run_id, encoder, metrics)
    return FinetuneResult(
        run_name=run_name, mlflow_run_id=mlflow_run_id,
        pretrain_run_id=encoder.run_id if encoder else None,
        tracking_uri=cfg.run.tracking_uri, metrics=metrics,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        storage_path=cfg.run.storage_path)
