"""The one training loop: `train_loop_per_worker` for ray.train.torch.TorchTrainer.

Every method trains here; the method is only `objective(batch) -> (loss, metrics)`. Each epoch:
set the epoch clock (the data stream seeds crops and masks from it), train on this worker's
shard, average loss across workers, evaluate kNN on rank 0, checkpoint, report.
"""

from __future__ import annotations

import contextlib
import math
import os
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
    """Write the training state to a temporary name, then rename: a crash mid-write never
    leaves a truncated state.pt (Ray Train registers the directory only after this returns)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                "epoch": epoch, "step": step, "config": cfg.to_dict(),
                "torch_rng": torch.get_rng_state(), **extra}, tmp)
    os.replace(tmp, path)


def latest_checkpoint_on_storage(run_dir: str) -> ray.train.Checkpoint | None:
    """The newest `checkpoint_*` directory of a run that holds a complete state file (written
    by save_state's rename, so never a partial one); local paths or any pyarrow URI."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(run_dir) if "://" in run_dir \
        else (pafs.LocalFileSystem(), str(Path(run_dir).resolve()))
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_")), reverse=True)
    for d in dirs:
        if fs.get_file_info(f"{d}/{STATE_FILE}").type == pafs.FileType.File:
            return ray.train.Checkpoint(d, filesystem=fs)
    return None


def parse_fault(spec: str | None) -> tuple[int, int] | None:
    """`run.inject_fault = "rank@step"` (tests only; see config validation) -> (rank, step)."""
    if not spec:
        return None
    rank, step = spec.split("@")
    return int(rank), int(step)


def _inject_fault(loop_config: dict[str, Any], rank: int, step: int) -> None:
    """Kill this worker process hard, once per run (a marker file keeps the restarted worker
    alive), the way a preempted node or an OOM kill would."""
    marker = Path(loop_config["fault_marker_dir"]) / f"fault-{rank}-{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    print(f"[micl] injected fault: rank {rank} exits at step {step}", flush=True)
    os._exit(1)


def _stop_on_nonfinite(rank: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                       epoch: int, step: int, cfg: Config, loop_config: dict[str, Any],
                       knn_init: float | None) -> None:
    """Save the state from before the bad step (not yet applied), report it, and stop."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save_state(Path(tmp) / STATE_FILE, model, opt, epoch, step, cfg,
                       {"mlflow_run_id": loop_config.get("mlflow_run_id"),
                        "knn_top1_init": knn_init, "nonfinite_at_step": step})
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"epoch": epoch, "step": step, "nonfinite": 1}, checkpoint=ckpt)
    raise FloatingPointError(
        f"non-finite loss or gradient at step {step + 1} (epoch {epoch + 1}): stopped; the "
        f"checkpoint from before that step was saved. Lower optim.blr, set optim.clip_grad, or "
        f"set optim.nonfinite=skip to skip such steps")


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
    for k in out:
        if k.startswith("image"):  # every view of the method (Objective.image_views)
            out[k] = normalize(out[k], cfg.data.mean, cfg.data.std)
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
    if loop_config.get("tracking_uri"):  # objectives that read MLflow (a MimCo teacher) must
        os.environ["MLFLOW_TRACKING_URI"] = loop_config["tracking_uri"]  # see the driver's store
    objective = build_objective(cfg)
    global_batch = cfg.data.batch_size * max(world, 1) * cfg.optim.grad_accum_steps
    base_lr = cfg.optim.blr * global_batch / 256
    opt = torch.optim.AdamW(param_groups(objective, cfg.optim.weight_decay), lr=base_lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), fused=on_gpu or None)
    start_epoch, step, knn_init = 0, 0, None
    clock = epoch_clock(loop_config["clock_name"])
    # The driver's clock outlives worker groups: how many times this fit has started the loop.
    restarts = [ray.get(clock.count_start.remote()) if rank == 0 else 0]
    if world > 1:
        dist.broadcast_object_list(restarts, src=0)
    restarts = restarts[0]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and restarts:
        # Ray Train registers a reported checkpoint at its next poll of the workers (every 2 s);
        # a worker that dies sooner after a report leaves it complete on storage but unknown.
        checkpoint = latest_checkpoint_on_storage(loop_config["run_dir"])
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        objective.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        knn_init = state.get("knn_top1_init")
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
    model = ray.train.torch.prepare_model(objective) if world > 1 else objective.to(device)

    logger = RunLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) \
        if rank == 0 and loop_config.get("mlflow_run_id") else None
    per_epoch = steps_per_epoch(loop_config["num_train"], cfg, world)
    shard = ray.train.get_dataset_shard("train")
    accum = cfg.optim.grad_accum_steps
    if restarts and rank == 0:
        print(f"[micl] restart {restarts}: resuming from epoch {start_epoch}, step {step}")
    fault = parse_fault(cfg.run.inject_fault)
    skipped_steps = 0

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
            n_batches += 1
            n_images += batch["image"].shape[0]
            if not sync:
                loss_sum += loss.detach()
                continue
            # The grad norm is computed from DDP's all-reduced gradients, so every rank sees
            # the same verdict and they stay in lockstep (one host sync per optimizer step).
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.optim.clip_grad or math.inf)
            if not (torch.isfinite(grad_norm) and torch.isfinite(loss)):
                if cfg.optim.nonfinite == "skip":
                    opt.zero_grad(set_to_none=True)
                    skipped_steps += 1
                    continue
                _stop_on_nonfinite(rank, model, opt, epoch, step, cfg, loop_config, knn_init)
            loss_sum += loss.detach()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if fault and fault == (rank, step):
                _inject_fault(loop_config, rank, step)
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
        loss_value = total_loss / max(total_batches - skipped_steps * accum, 1)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "step": step, "loss": loss_value, "lr": lr,
            "images_per_s": total_images / elapsed, "skipped": total_skipped,
            "restarts": restarts, "skipped_steps": skipped_steps,
        }
        last = epoch + 1 == cfg.optim.epochs
        if rank == 0 and ((epoch + 1) % cfg.run.eval_every == 0 or last):
            metrics["knn_top1"] = evaluate_knn(unwrap(model).encoder, cfg, device,
                                               autocast_dtype)
        if knn_init is not None:
            metrics["knn_top1_init"] = knn_init
        if rank == 0:
            print(f"[micl] epoch {epoch + 1}/{cfg.optim.epochs} " + " ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("epoch",)))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and ((epoch + 1) % cfg.run.checkpoint_every == 0 or last):
                save_state(Path(tmp) / STATE_FILE, model, opt, epoch + 1, step, cfg,
                           {"mlflow_run_id": loop_config.get("mlflow_run_id"),
                            "knn_top1_init": knn_init})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        # Logged once the epoch's checkpoint is safe: a crash between the two can lose an
        # epoch's MLflow row but never log an epoch twice after the resume.
        if logger:
            logger.metrics(metrics, step=epoch + 1)

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

    masks = {k: v for k, v in batch.items()
             if not k.startswith("image") and k not in ("label", "sample_id", "path")}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "masked_views.png"
        masked_views_figure(batch["image"][:6], {k: v[:6] for k, v in masks.items()},
                            cfg.model.patch_size, path)
        logger.artifact(path)
