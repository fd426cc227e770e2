"""The one training loop: `train_loop_per_worker` for ray.train.torch.TorchTrainer.

Every method trains here; the method is only `objective(batch) -> (loss, metrics)`. Each epoch:
set the epoch clock (the data stream seeds crops and masks from it), train on this worker's
shard, average loss across workers, evaluate kNN on rank 0, checkpoint, report.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from micl.config import Config, from_dict
from micl.data.sources import DataError
from micl.data.stream import epoch_clock
from micl.data.transforms import normalize
from micl.evaluate import extract_features, knn_top1
from micl.models.export import timm_state_dict
from micl.objectives import Objective, build_objective
from micl.tracking import RunLogger

STATE_FILE = "state.pt"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norm weights and the cls token (MAE)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith("cls_token") or name.endswith("mask_token")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(epoch: float, base_lr: float, warmup_epochs: float, epochs: int) -> float:
    """Per-step linear warmup, then half-cycle cosine to 0 (epoch is fractional)."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def steps_per_epoch(num_train: int, cfg: Config, world_size: int) -> int:
    """Optimizer steps per epoch: each worker gets num_train / world rows, drops the last
    partial batch (equal batch sizes keep the contrastive task fixed) and accumulates."""
    batches = (num_train // max(world_size, 1)) // cfg.data.batch_size
    return max(1, batches // cfg.optim.grad_accum_steps)


def unwrap(model: torch.nn.Module) -> Objective:
    return model.module if hasattr(model, "module") else model


def save_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int,
               step: int, cfg: Config, extra: dict[str, Any]) -> None:
    torch.save({"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                "epoch": epoch, "step": step, "config": cfg.to_dict(), **extra}, path)


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _to_device(batch: dict[str, torch.Tensor], cfg: Config, device: torch.device
               ) -> dict[str, torch.Tensor]:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out["image"] = normalize(out["image"], cfg.data.mean, cfg.data.std)
    return out


def evaluate_knn(encoder: torch.nn.Module, cfg: Config, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> float:
    def batches(name: str):
        shard = ray.train.get_dataset_shard(name)
        return shard.iter_torch_batches(batch_size=512, prefetch_batches=2)

    bank = extract_features(encoder, batches("knn_bank"), cfg.data.mean, cfg.data.std,
                            device, autocast_dtype)
    query = extract_features(encoder, batches("knn_query"), cfg.data.mean, cfg.data.std,
                             device, autocast_dtype)
    return knn_top1(*bank, *query)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    on_gpu = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if on_gpu else None  # fp32 on CPU
    ray.data.DataContext.get_current().enable_progress_bars = False

    torch.manual_seed(cfg.run.seed)
    objective = build_objective(cfg)
    global_batch = cfg.data.batch_size * max(world, 1) * cfg.optim.grad_accum_steps
    base_lr = cfg.optim.blr * global_batch / 256
    opt = torch.optim.AdamW(param_groups(objective, cfg.optim.weight_decay), lr=base_lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), fused=on_gpu or None)
    start_epoch, step, knn_init = 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        objective.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        knn_init = state.get("knn_top1_init")
    model = ray.train.torch.prepare_model(objective) if world > 1 else objective.to(device)

    logger = RunLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) \
        if rank == 0 and loop_config.get("mlflow_run_id") else None
    per_epoch = steps_per_epoch(loop_config["num_train"], cfg, world)
    shard = ray.train.get_dataset_shard("train")
    clock = epoch_clock(loop_config["clock_name"])
    accum = cfg.optim.grad_accum_steps

    if start_epoch == 0 and rank == 0 and loop_config.get("eval_init", True):
        knn_init = evaluate_knn(unwrap(model).encoder, cfg, device, autocast_dtype)
        print(f"[micl] epoch 0 (random init): knn_top1 = {knn_init:.4f}")
        if logger:
            logger.metrics({"knn_top1": knn_init, "epoch": 0}, step=0)
            logger.config(cfg)

    for epoch in range(start_epoch, cfg.optim.epochs):
        ray.get(clock.set.remote(epoch))
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        n_batches = n_images = 0
        lr = opt.param_groups[0]["lr"]
        for i, raw in enumerate(shard.iter_torch_batches(
                batch_size=cfg.data.batch_size, drop_last=True, prefetch_batches=2,
                pin_memory=on_gpu)):
            raw.pop("skipped", None)  # counted exactly by the clock instead
            if epoch == start_epoch == 0 and i == 0 and logger:
                _log_mask_picture(logger, raw, cfg)
            batch = _to_device(raw, cfg, device)
            lr = lr_at(min(step / per_epoch, epoch + 1), base_lr,
                       cfg.optim.warmup_epochs, cfg.optim.epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            sync = (i + 1) % accum == 0
            with (torch.autocast(device.type, dtype=autocast_dtype,
                                 enabled=autocast_dtype is not None),
                  model.no_sync() if world > 1 and not sync else contextlib.nullcontext()):
                loss, _ = model(batch)
                (loss / accum).backward()
            loss_sum += loss.detach()
            n_batches += 1
            n_images += batch["image"].shape[0]
            if sync:
                if cfg.optim.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
        elapsed = time.perf_counter() - t0
        total_loss, total_batches, total_images = _all_reduce_sum(
            [loss_sum.item(), n_batches, n_images], device)
        total_skipped, bad_examples = ray.get(clock.skipped.remote(epoch))
        if total_skipped > cfg.data.max_bad_fraction * loop_config["num_train"]:
            raise DataError(
                f"data error: {total_skipped} of {loop_config['num_train']} files could not be "
                f"decoded in epoch {epoch + 1}, more than data.max_bad_fraction = "
                f"{cfg.data.max_bad_fraction}; e.g. {', '.join(bad_examples[:5])}")
        if total_batches == 0:
            raise RuntimeError("the training stream produced no full batch this epoch: "
                               f"data.batch_size = {cfg.data.batch_size} is larger than each "
                               "worker's share of the data")
        loss_value = total_loss / total_batches
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite loss {loss_value} in epoch {epoch + 1}; "
                                     "lower optim.blr or check the data")
        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "step": step, "loss": loss_value, "lr": lr,
            "images_per_s": total_images / elapsed, "skipped": total_skipped,
        }
        last = epoch + 1 == cfg.optim.epochs
        if rank == 0 and ((epoch + 1) % cfg.run.eval_every == 0 or last):
            metrics["knn_top1"] = evaluate_knn(unwrap(model).encoder, cfg, device,
                                               autocast_dtype)
        if knn_init is not None:
            metrics["knn_top1_init"] = knn_init
        print(f"[micl] epoch {epoch + 1}/{cfg.optim.epochs} " + " ".join(
            f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("epoch",)))
        if logger:
            logger.metrics(metrics, step=epoch + 1)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and ((epoch + 1) % cfg.run.checkpoint_every == 0 or last):
                save_state(Path(tmp) / STATE_FILE, model, opt, epoch + 1, step, cfg,
                           {"mlflow_run_id": loop_config.get("mlflow_run_id"),
                            "knn_top1_init": knn_init})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    if logger:
        _log_encoder(logger, unwrap(model), cfg)


def _log_encoder(logger: RunLogger, objective: Objective, cfg: Config) -> None:
    import json

    from micl.models.export import TIMM_NAMES, timm_kwargs

    with tempfile.TemporaryDirectory() as d:
        torch.save(timm_state_dict(objective.encoder), Path(d) / "encoder_timm.pth")
        (Path(d) / "timm_model.json").write_text(json.dumps(
            {"model_name": TIMM_NAMES[cfg.model.name], "num_classes": 0,
             **timm_kwargs(cfg.model)}, indent=1))
        logger.artifact(Path(d) / "encoder_timm.pth", "encoder")
        logger.artifact(Path(d) / "timm_model.json", "encoder")


def _log_mask_picture(logger: RunLogger, batch: dict[str, torch.Tensor], cfg: Config) -> None:
    from micl.plots import masked_views_figure

    masks = {k: v for k, v in batch.items() if k not in ("image", "label", "sample_id", "path")}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "masked_views.png"
        masked_views_figure(batch["image"][:6], {k: v[:6] for k, v in masks.items()},
                            cfg.model.patch_size, path)
        logger.artifact(path)
