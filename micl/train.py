"""The one training loop: `train_loop_per_worker(spec)` for ray.train.torch.TorchTrainer's
workers, or alone in one process (`SoloHost`): a one-worker run's task (micl.driver.SoloFit)
or a one-worker Tune trial's process (micl.tune).

Every method trains here; a method is `objective(batch) -> (loss, metrics)` plus an optional
`after_step`. Each epoch: set the epoch clock (the data stream seeds crops and masks from it),
train on this worker's shard one `train_step` at a time, sum the loss and the method's metrics
over all workers, evaluate kNN on rank 0, checkpoint, report (to Ray Train or Tune), log to
MLflow.

The pieces that are not about pre-training (`resume`, `save_and_report`, `run_logger`,
`train_step`) take any module and optimizer, so a fine-tuning loop reuses them.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from micl.artifacts import (
    STATE_FILE,
    export_encoder,
    latest_checkpoint_on_storage,
    load_checkpoint_state,
    persist_checkpoint,
    save_state,
)
from micl.config import Config, from_dict
from micl.console import (
    Console,
    Progress,
    printing_console,
    relay_console,
    relay_warnings,
    silent_console,
)
from micl.data.clock import find_clock
from micl.data.sources import DataError
from micl.data.transforms import normalize
from micl.evaluate import extract_features, knn_top1
from micl.objectives import Objective, build_objective, import_plugins
from micl.plots import masked_views_figure
from micl.schedule import lr_at
from micl.tracking import RunLogger, tracking_uri

# ----------------------------------------------------------------------------- what a worker gets


@dataclass
class StepInfo:
    """Passed to each step hook after an optimizer step."""

    rank: int
    epoch: int  # 0-based epoch the step belongs to
    step: int  # optimizer steps done so far in the run
    # The step's micro-batches as the model got them (on the device): what a hook needs to
    # see which samples trained (`sample_id`), without the loop paying for it.
    batches: Sequence[dict[str, torch.Tensor]] = ()


StepHook = Callable[[StepInfo], None]


@dataclass
class LoopSpec:
    """What the driver hands every training worker."""

    config: dict[str, Any]  # Config.to_dict(), with run.tracking_uri and storage resolved
    num_train: int  # training samples (files) in the split, before undecodable ones
    run_dir: str  # this Ray Train run's directory on storage (local path or pyarrow URI)
    clock_name: str  # this fit's epoch clock (micl.data.clock; also counts restarts)
    mlflow_run_id: str | None = None  # None: no tracking store
    hooks: Sequence[StepHook] = ()  # called after every optimizer step, on every worker
    console_name: str | None = None  # the clock that relays to the driver (None: rank 0 prints)


# Ray Train gives train_loop_config to its controller too, which unpickles it with its other
# arguments: a spec object there makes the controller import the loop's module (torch, timm,
# MLflow: seconds of CPU before it starts any worker) and, when fine-tuning, hold the initial
# weights. Sealed as bytes, the spec is opened by the workers only.
SEALED_SPEC = "micl_spec"


def seal_spec(spec: Any) -> dict[str, bytes]:
    """A loop's spec as train_loop_config: only the workers unpickle it (`open_spec`)."""
    return {SEALED_SPEC: ray.cloudpickle.dumps(spec)}


def open_spec(loop_config: dict[str, bytes]) -> Any:
    return pickle.loads(loop_config[SEALED_SPEC])


class RayTrainHost:
    """Where the loop asks for its rank, device, data, checkpoint and reports: a Ray Train
    worker, or Ray Train's local mode (run.num_workers = 0: the loop in the driver)."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def shard(self, name: str) -> Any:  # a DataIterator, or the Dataset in local mode
        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, cfg: Config,
               run_dir: str) -> None:
        """ray.train.report (a barrier on every rank). Local mode keeps no checkpoint, so
        there it is persisted to the run here."""
        ckpt = None
        if checkpoint_dir is not None:
            ckpt = persist_checkpoint(checkpoint_dir, run_dir, cfg.run.keep_last) \
                if cfg.run.num_workers == 0 else ray.train.Checkpoint.from_directory(checkpoint_dir)
        ray.train.report(metrics, checkpoint=ckpt)


@dataclass
class SoloHost:
    """The loop alone in a process of its own, with one worker: a one-worker run's task
    (micl.driver.SoloFit) or a one-worker Tune trial's process (micl.tune, where Ray Train's
    API is closed anyway). No Ray Train controller and worker processes to start.
    Checkpoints persist to the run directory as in local mode, where a retried task or trial
    resumes from them; each epoch's metrics go to `report_to` (Tune's, or the task's list)."""

    datasets: dict[str, Any]  # name -> ray.data.Dataset: the stream and the kNN sets
    report_to: Callable[[dict[str, Any]], None]
    use_gpu: bool
    rank: int = 0
    world: int = 1

    @property
    def device(self) -> torch.device:
        # Ray gives the process its own GPU(s) as cuda:0 (CUDA_VISIBLE_DEVICES).
        return torch.device("cuda", 0) if self.use_gpu else torch.device("cpu")

    def checkpoint(self) -> None:
        return None  # resume() finds the run's latest on storage

    def shard(self, name: str) -> Any:
        return self.datasets[name]

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, cfg: Config,
               run_dir: str) -> None:
        if checkpoint_dir is not None:
            persist_checkpoint(checkpoint_dir, run_dir, cfg.run.keep_last)
        self.report_to(metrics)


Host = RayTrainHost | SoloHost


@dataclass
class Worker:
    host: Host  # Ray Train's worker, or a process the loop has to itself
    console: Console  # rank 0's lines and progress (the other ranks': warnings only)

    @property
    def rank(self) -> int:
        return self.host.rank

    @property
    def world(self) -> int:
        return self.host.world

    @property
    def device(self) -> torch.device:
        return self.host.device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.device.type == "cuda" else None  # fp32 on CPU


@dataclass
class TrainState:
    """The counters a checkpoint restores."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    skipped_steps: int = 0  # non-finite steps skipped (optim.nonfinite = skip)
    knn_init: float | None = None  # kNN of the random encoder
    restarts: int = 0  # restarts of this fit (not restored: counted per start)


def worker_context(cfg: Config, spec: LoopSpec, host: Host | None = None) -> Worker:
    import_plugins(cfg)  # methods defined outside micl register on import
    host = host or RayTrainHost()
    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    ray.data.DataContext.get_current().enable_progress_bars = False
    torch.manual_seed(cfg.run.seed)
    every_s = min(1.0, cfg.run.progress_every_s)
    console = relay_console(spec.console_name, every_s) if spec.console_name else \
        printing_console() if host.rank == 0 else silent_console()
    if spec.console_name and cfg.run.num_workers > 0:  # a worker process: Ray's channel is shut
        relay_warnings(console)
    return Worker(host, console)


# ----------------------------------------------------------------------------- optimisation


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as in the reference code (timm 0.3's add_weight_decay, used by MAE and
    MiCL): no decay on biases and 1-D weights (norms); every other tensor, the cls and mask
    tokens included, decays."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def base_lr(cfg: Config, world: int) -> float:
    """lr = blr * global batch / 256, the global batch counting workers and accumulation."""
    global_batch = cfg.data.batch_size * max(world, 1) * cfg.optim.grad_accum_steps
    return cfg.optim.blr * global_batch / 256


def build_optimizer(model: torch.nn.Module, cfg: Config, world: int, on_gpu: bool
                    ) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay),
                             lr=base_lr(cfg, world), betas=(cfg.optim.beta1, cfg.optim.beta2),
                             fused=on_gpu or None)


def steps_per_epoch(num_train: int, cfg: Config, world_size: int) -> int:
    """Optimizer steps per epoch: each worker gets num_train / world rows, drops the last
    partial batch (equal batch sizes keep the contrastive task fixed) and the micro-batches
    that do not fill a last accumulation group."""
    batches = (num_train // max(world_size, 1)) // cfg.data.batch_size
    return max(1, batches // cfg.optim.grad_accum_steps)


def to_device(batch: dict[str, torch.Tensor], cfg: Config, device: torch.device
              ) -> dict[str, torch.Tensor]:
    """Move a stream batch to the device; every `image*` column (each view of the method) is
    normalised there (the stream ships uint8: 4x less data than float32)."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    for k in out:
        if k.startswith("image"):
            out[k] = normalize(out[k], cfg.data.mean, cfg.data.std)
    return out


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over the micro-batches (detached)
    metrics: dict[str, torch.Tensor]  # the objective's metrics, means over the micro-batches
    images: int
    finite: bool  # False: the step was not applied (non-finite loss or gradient)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer,
               micro_batches: Sequence[dict[str, torch.Tensor]], clip: float | None = None,
               autocast_dtype: torch.dtype | None = None) -> StepResult:
    """One optimizer step over one or more micro-batches (gradient accumulation).

    Gradients are averaged over the micro-batches; DDP all-reduces only on the last one. The
    grad norm is taken from DDP's all-reduced gradients, so every rank reaches the same
    verdict on a non-finite step and they stay in lockstep (one host sync per step). The
    gradients are always cleared at the end: nothing carries into the next step or epoch.
    """
    n = len(micro_batches)
    losses: list[torch.Tensor] = []
    metric_sums: dict[str, torch.Tensor] = {}
    images = 0
    for i, batch in enumerate(micro_batches):
        device = batch["image"].device
        no_sync = model.no_sync() if i < n - 1 and hasattr(model, "no_sync") \
            else contextlib.nullcontext()
        with torch.autocast(device.type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None), no_sync:
            loss, metrics = model(batch)
            (loss / n).backward()
        losses.append(loss.detach().float())
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0) + torch.as_tensor(v).detach().float()
        images += batch["image"].shape[0]
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf)
    loss = torch.stack(losses).mean()
    finite = bool(torch.isfinite(grad_norm) & torch.isfinite(loss))  # the step's one host sync
    if finite:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return StepResult(loss, {k: v / n for k, v in metric_sums.items()}, images, finite)


def grouped(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive groups of `size`; a last incomplete group is dropped (it would otherwise
    leave unapplied gradients behind, or take a step on fewer samples than the lr assumes)."""
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


# ----------------------------------------------------------------------------- resume, save, report


def resume(model: torch.nn.Module, opt: torch.optim.Optimizer, spec: LoopSpec, w: Worker
           ) -> TrainState:
    """Restore model, optimizer, counters and RNG from the fit's latest checkpoint, if any."""
    restarts = [ray.get(find_clock(spec.clock_name).count_start.remote()) if w.rank == 0 else 0]
    if w.world > 1:
        dist.broadcast_object_list(restarts, src=0)
    state = TrainState(restarts=restarts[0])
    checkpoint = w.host.checkpoint()
    if checkpoint is None:
        # What Ray Train does not know of, storage may hold: a checkpoint reported less than
        # Ray Train's 2 s poll before a worker died, and every checkpoint of a fit in local
        # mode (persist_checkpoint), which a later fit with workers resumes from as well.
        checkpoint = latest_checkpoint_on_storage(spec.run_dir)
    if checkpoint is not None:
        saved = load_checkpoint_state(checkpoint)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state.epoch, state.step = saved["epoch"], saved["step"]
        state.skipped_steps = saved.get("skipped_steps", 0)
        state.knn_init = saved.get("knn_top1_init")
        if "torch_rng" in saved:
            torch.set_rng_state(saved["torch_rng"])
    if state.restarts and w.rank == 0:
        w.console.line(f"[micl] restart {state.restarts}: resuming from epoch {state.epoch}, "
                       f"step {state.step}")
    return state


def checkpoint_state(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config,
                     spec: LoopSpec, state: TrainState) -> dict[str, Any]:
    return {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
            "epoch": state.epoch, "step": state.step, "skipped_steps": state.skipped_steps,
            "config": cfg.to_dict(), "torch_rng": torch.get_rng_state(),
            "mlflow_run_id": spec.mlflow_run_id, "knn_top1_init": state.knn_init}


def report(metrics: dict[str, Any], cfg: Config, spec: LoopSpec, w: Worker,
           payload: dict[str, Any] | None) -> None:
    """Report on every rank (a barrier with workers); rank 0 attaches `payload` as the
    checkpoint's state file when given."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_dir = None
        if w.rank == 0 and payload is not None:
            save_state(Path(tmp) / STATE_FILE, payload)
            checkpoint_dir = tmp
        w.host.report(metrics, checkpoint_dir, cfg, spec.run_dir)


def save_and_report(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config,
                    spec: LoopSpec, state: TrainState, metrics: dict[str, Any], w: Worker,
                    logger: RunLogger | None) -> None:
    """Checkpoint (every run.checkpoint_every epochs and at the end), report, then log."""
    due = state.epoch % cfg.run.checkpoint_every == 0 or state.epoch == cfg.optim.epochs
    payload = checkpoint_state(model, opt, cfg, spec, state) if due and w.rank == 0 else None
    report(metrics, cfg, spec, w, payload)
    # Logged once the epoch's checkpoint is safe: a crash between the two can lose an
    # epoch's MLflow row but never log an epoch twice after the resume.
    if logger:
        logger.metrics({k: v for k, v in metrics.items() if k != "knn_top1_init"},
                       step=state.epoch)


def stop_on_nonfinite(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config,
                      spec: LoopSpec, state: TrainState, w: Worker) -> None:
    """Save the state from before the bad step (train_step did not apply it), report, stop."""
    payload = checkpoint_state(model, opt, cfg, spec, state) if w.rank == 0 else None
    if payload is not None:
        payload["nonfinite_at_step"] = state.step
    report({"epoch": state.epoch, "step": state.step, "nonfinite": 1}, cfg, spec, w, payload)
    raise FloatingPointError(
        f"non-finite loss or gradient at step {state.step + 1} (epoch {state.epoch + 1}): "
        "stopped; the checkpoint from before that step was saved. Lower optim.blr, set "
        "optim.clip_grad, or set optim.nonfinite=skip to skip such steps")


def run_logger(spec: LoopSpec, cfg: Config, w: Worker) -> RunLogger | None:
    if w.rank != 0 or not spec.mlflow_run_id:
        return None
    return RunLogger(tracking_uri(cfg), spec.mlflow_run_id,
                     warn=lambda message: w.console.line(f"[micl] warning: {message}"))


def system_metrics(logger: RunLogger | None, cfg: Config) -> contextlib.AbstractContextManager:
    """MLflow system metrics for the block, from rank 0 (which holds the logger)."""
    every_s = cfg.run.system_metrics_every_s
    return logger.system_metrics(every_s) if logger and every_s else contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile's and DDP's wrappers (what a checkpoint saves:
    its state_dict keys carry no `_orig_mod.` or `module.` prefix)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) \
        else model


def wrap_model(model: torch.nn.Module, w: Worker, compile_model: bool = False
               ) -> torch.nn.Module:
    """On the device, in DDP with several workers, then torch.compile'd when asked (DDP
    first: compiling the DDP module lets dynamo split the graph at its gradient buckets)."""
    model = ray.train.torch.prepare_model(model) if w.world > 1 else model.to(w.device)
    return torch.compile(model) if compile_model else model


# ----------------------------------------------------------------------------- one epoch


@dataclass
class EpochSums:
    """This worker's sums over the applied steps of an epoch (all-reduced by close_epoch). The
    loss and metric sums stay tensors on the device until `reduce`: no host sync per step."""

    loss: torch.Tensor | float = 0.0
    steps: int = 0
    images: int = 0
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    seconds: float = 0.0
    lr: float = 0.0
    # this worker's own (not all-reduced): waits for the epoch's first batch, for the later ones
    data_start: float = 0.0
    data_wait: float = 0.0
    data_batches: int = 0

    def add(self, result: StepResult) -> None:
        self.loss = self.loss + result.loss
        self.steps += 1
        self.images += result.images
        for k, v in result.metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v

    def reduce(self, device: torch.device) -> EpochSums:
        """Sums over all workers (every worker has the same metric names)."""
        names = sorted(self.metrics)
        values = [self.loss, self.steps, self.images, *(self.metrics[k] for k in names)]
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                         for v in values])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        loss, steps, images, *rest = t.tolist()
        return EpochSums(loss, int(steps), int(images), dict(zip(names, rest, strict=True)),
                         self.seconds, self.lr)

    def means(self) -> dict[str, float]:
        """Epoch means per applied step: the loss and each of the objective's metrics."""
        n = self.steps or math.nan  # no applied step (all skipped): NaN, not a fake 0
        return {"loss": self.loss / n, **{k: v / n for k, v in self.metrics.items()}}


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config,
                spec: LoopSpec, state: TrainState, w: Worker, logger: RunLogger | None
                ) -> EpochSums:
    """One pass over this worker's shard; state.step counts applied optimizer steps."""
    ray.get(find_clock(spec.clock_name).set.remote(state.epoch, state.restarts))
    model.train()
    sums, t0 = EpochSums(), time.perf_counter()
    per_epoch = steps_per_epoch(spec.num_train, cfg, w.world)
    peak = base_lr(cfg, w.world)
    batches = timed(stream_batches(cfg, w, state, logger), sums)
    for micro in grouped(batches, cfg.optim.grad_accum_steps):
        sums.lr = lr_at(min(state.step / per_epoch, state.epoch + 1), peak,
                        cfg.optim.warmup_epochs, cfg.optim.epochs, cfg.optim.min_lr)
        for group in opt.param_groups:  # lr_scale: layer-wise decay (fine-tuning)
            group["lr"] = sums.lr * group.get("lr_scale", 1.0)
        result = train_step(model, opt, micro, cfg.optim.clip_grad, w.autocast_dtype)
        if not result.finite:
            if cfg.optim.nonfinite != "skip":
                stop_on_nonfinite(model, opt, cfg, spec, state, w)
            state.skipped_steps += 1
            continue
        sums.add(result)
        state.step += 1
        unwrap(model).after_step(state.step, per_epoch * cfg.optim.epochs)
        for hook in spec.hooks:
            hook(StepInfo(w.rank, state.epoch, state.step, micro))
        show_step(result.loss, sums, cfg, state, w, logger, per_epoch, t0)
    sums.seconds = time.perf_counter() - t0
    show_step(None, sums, cfg, state, w, None, per_epoch, t0)  # the bar reaches its end
    return sums


def timed(batches: Iterable[Any], sums: EpochSums) -> Iterator[Any]:
    """The batches, timing the waits for them: the first (the stream's start) in
    sums.data_start, the others summed in sums.data_wait. The step before has synced with the
    device (train_step's finiteness check), so a wait is time the device sat idle for want of
    data: near 0 when the stream keeps up."""
    t = time.perf_counter()
    for batch in batches:
        waited = time.perf_counter() - t
        if sums.data_batches == 0:
            sums.data_start = waited
        else:
            sums.data_wait += waited
        sums.data_batches += 1
        yield batch
        t = time.perf_counter()


def show_step(loss: torch.Tensor | None, sums: EpochSums, cfg: Config, state: TrainState,
              w: Worker, logger: RunLogger | None, per_epoch: int, t0: float) -> None:
    """Rank 0: live progress about once a second and, every run.log_every_steps steps, the
    step's loss, lr and images/s to MLflow (`step/*` at the optimizer step). Only then is the
    loss read off the device (a host sync)."""
    if w.rank != 0:
        return
    log_due = logger is not None and state.step % cfg.run.log_every_steps == 0
    show_due = loss is None or w.console.due()
    if not (log_due or show_due):
        return
    elapsed = time.perf_counter() - t0
    # Rate since the first batch arrived: the stream's start is paid once an epoch; counted
    # in, it made the time left early in an epoch several times too long (a Fashion-MNIST
    # fine-tuning epoch showed 3 min left with about 1 min to go).
    busy = max(elapsed - sums.data_start, 1e-9)
    rate = sums.images * w.world / busy  # every worker takes equal batches
    value = float(loss) if loss is not None else None
    if show_due:
        w.console.progress(Progress(f"epoch {state.epoch + 1}/{cfg.optim.epochs}", sums.steps,
                                    per_epoch, "steps", elapsed, value, rate,
                                    ramp_s=sums.data_start))
    if log_due:
        logger.metrics({"step/loss": value, "step/lr": sums.lr, "step/images_per_s": rate},
                       step=state.step)


def stream_batches(cfg: Config, w: Worker, state: TrainState, logger: RunLogger | None
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's batches of the training stream, on the device."""
    stream = w.host.shard("train").iter_torch_batches(
        batch_size=cfg.data.batch_size, drop_last=True, prefetch_batches=2,
        pin_memory=w.device.type == "cuda")
    rng = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + state.epoch * 1_009 + w.rank)
    for i, raw in enumerate(mix_batches(stream, cfg.data.shuffle_buffer, rng)):
        raw.pop("skipped", None)  # counted exactly by the clock instead
        if logger and i == 0 and state.epoch == 0:
            log_mask_picture(logger, raw, cfg)
        yield to_device(raw, cfg, w.device)


def mix_batches(batches: Iterable[dict[str, torch.Tensor]], window_rows: int,
                rng: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Equal-size batches ({column: [B, ...]}) -> the same rows in new batches of B, each
    drawn at random from a window of about `window_rows` consecutive rows of the stream.

    Why: a stream delivers rows in the order of its blocks, so neighbouring rows (a Parquet
    shard's, an in-memory set's) would form the same batches every epoch; for MiCL, the same
    negatives. Ray Data's own local shuffle buffer does this too, but moves 224-px images at
    0.09x the stream's rate; this costs about the one copy a step makes anyway (0.86x:
    benchmarks/batch_mixing.py)."""
    window: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        window.append(batch)
        if len(window) * len(next(iter(batch.values()))) >= window_rows:
            yield from _reshuffled(window, rng)
            window = []
    yield from _reshuffled(window, rng)  # the epoch's last, shorter window


def _reshuffled(window: list[dict[str, torch.Tensor]], rng: torch.Generator
                ) -> Iterator[dict[str, torch.Tensor]]:
    """The window's rows in new batches of the same size: each row copied once, straight
    into its new batch (grouped there by source batch: the order inside a batch is moot).
    Rows are drawn by their rank in sample_id, not by where they arrived: Ray Data's parallel
    tasks deliver blocks in a varying order, and the same rows then still make the same
    batches (a run whose window holds its whole epoch is reproducible)."""
    if len(window) < 2:  # nothing to mix with
        yield from window
        return
    size = len(next(iter(window[0].values())))
    picks = torch.randperm(size * len(window), generator=rng)  # ranks -> new batches
    if "sample_id" in window[0]:
        ids = torch.cat([b["sample_id"] for b in window])
        picks = ids.argsort(stable=True)[picks]  # rank -> the row's position in the window
    picks = picks.view(len(window), size)
    for pick in picks:  # pick: [size] row numbers of the window -> one new batch
        pick = pick.sort().values  # grouped by source batch
        counts = torch.bincount(pick // size, minlength=len(window)).tolist()
        rows = (pick % size).split(counts)
        out = {k: torch.empty((size, *v.shape[1:]), dtype=v.dtype) for k, v in window[0].items()}
        start = 0
        for source, take, n in zip(window, rows, counts, strict=True):
            for k, v in out.items():
                torch.index_select(source[k], 0, take, out=v[start:start + n])
            start += n
        yield out


def epoch_metrics(sums: EpochSums, cfg: Config, spec: LoopSpec, state: TrainState, w: Worker
                  ) -> dict[str, Any]:
    """All-reduce the epoch's sums, enforce data.max_bad_fraction, count the epoch done; the
    metrics every loop reports."""
    total = sums.reduce(w.device)
    skipped, examples = ray.get(find_clock(spec.clock_name).skipped.remote(state.epoch))
    if skipped > cfg.data.max_bad_fraction * spec.num_train:
        raise DataError(
            f"data error: {skipped} of {spec.num_train} files could not be decoded in epoch "
            f"{state.epoch + 1}, more than data.max_bad_fraction = {cfg.data.max_bad_fraction}"
            f"; e.g. {', '.join(examples[:5])}")
    if total.steps == 0 and state.skipped_steps == 0:
        raise RuntimeError("the training stream produced no full batch this epoch: "
                           f"data.batch_size = {cfg.data.batch_size} is larger than each "
                           "worker's share of the data")
    state.epoch += 1
    return {"epoch": state.epoch, "step": state.step, **total.means(), "lr": total.lr,
            # the images the epoch's applied steps trained on, over all workers: what a run
            # that lost a data node (or any run) can be checked against, its split's size
            # less the skipped files, in whole batches
            "images": total.images, "images_per_s": total.images / max(total.seconds, 1e-9),
            # rank 0's waits for data: for the first batch, then per later step (a data-bound
            # run shows the latter close to the step time)
            "data_start_s": sums.data_start,
            "data_wait_s": sums.data_wait / max(sums.data_batches - 1, 1), "skipped": skipped,
            "restarts": state.restarts, "skipped_steps": state.skipped_steps}


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """`[micl] epoch 2/6: loss 4.21, knn_top1 0.7644, lr 0.0009, 598 img/s` (counters only
    when not zero)."""
    quiet = {"epoch", "step", "images", "images_per_s", "knn_top1_init", "skipped", "restarts",
             "skipped_steps", "data_start_s", "data_wait_s"}
    parts = [f"{k} {v:.4g}" for k, v in metrics.items() if k not in quiet]
    parts.append(f"{metrics.get('images_per_s', 0):.0f} img/s")
    parts += [f"{k} {metrics[k]}" for k in ("skipped", "restarts", "skipped_steps")
              if metrics.get(k)]
    return f"[micl] epoch {metrics['epoch']}/{epochs}: " + ", ".join(parts)


def print_epoch(metrics: dict[str, Any], cfg: Config, w: Worker) -> None:
    if w.rank == 0:
        w.console.line(epoch_line(metrics, cfg.optim.epochs))


def close_epoch(sums: EpochSums, model: torch.nn.Module, cfg: Config, spec: LoopSpec,
                state: TrainState, w: Worker) -> dict[str, Any]:
    """The epoch's metrics, with kNN on rank 0 when due."""
    metrics = epoch_metrics(sums, cfg, spec, state, w)
    if w.rank == 0 and (state.epoch % cfg.run.eval_every == 0 or state.epoch == cfg.optim.epochs):
        metrics["knn_top1"] = evaluate_knn(unwrap(model).encoder, cfg, w)
    if state.knn_init is not None:
        metrics["knn_top1_init"] = state.knn_init
    print_epoch(metrics, cfg, w)
    return metrics


# ----------------------------------------------------------------------------- kNN and artifacts


ENCODER_MODEL = "micl_encoder"  # the logged model's name (the weights' folder is `encoder/`)
KNN_PHASES = {"knn_bank": "kNN bank", "knn_query": "kNN queries"}


def evaluate_knn(encoder: torch.nn.Module, cfg: Config, w: Worker) -> float:
    """Weighted kNN top-1 of the encoder's cls features: the `knn_bank` and `knn_query` sets."""
    def features(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        batches = w.console.track(w.host.shard(name).iter_torch_batches(
            batch_size=512, prefetch_batches=2), KNN_PHASES[name], lambda b: len(b["label"]))
        return extract_features(encoder, batches, cfg.data.mean, cfg.data.std, w.device,
                                w.autocast_dtype)

    return knn_top1(*features("knn_bank"), *features("knn_query"))


def initial_knn(model: torch.nn.Module, cfg: Config, w: Worker, logger: RunLogger | None
                ) -> float | None:
    """kNN of the random encoder (rank 0), the baseline every epoch is compared with."""
    if w.rank != 0:
        return None
    knn = evaluate_knn(unwrap(model).encoder, cfg, w)
    w.console.line(f"[micl] epoch 0 (random init): knn_top1 {knn:.4f}")
    if logger:
        logger.metrics({"knn_top1": knn, "epoch": 0}, step=0)
        logger.tags({"micl.knn_top1_init": f"{knn:.4f}"})  # a constant, not a flat curve
        logger.config(cfg)
    return knn


def log_encoder(logger: RunLogger, objective: Objective, cfg: Config, epoch: int) -> None:
    """The encoder as timm weights + its architecture under the run's `encoder/` (what
    `load_encoder` and timm read), and as an MLflow logged model linked to the last epoch's
    metrics (registered as run.register_model when set)."""
    with tempfile.TemporaryDirectory() as d:
        weights = export_encoder(objective.encoder, cfg.model, d)
        for path in sorted(weights.parent.iterdir()):
            logger.artifact(path, "encoder")
    # Not named "encoder": MLflow would merge a logged model of that name into the run's
    # `encoder/` artifacts, and resolve it through the default tracking URI, not the run's.
    logger.model(objective.encoder, ENCODER_MODEL, step=epoch,
                 register_as=cfg.run.register_model)


def log_mask_picture(logger: RunLogger, batch: dict[str, torch.Tensor], cfg: Config) -> None:
    masks = {k: v for k, v in batch.items()
             if not k.startswith("image") and k not in ("label", "sample_id", "path")}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "masked_views.png"
        masked_views_figure(batch["image"][:6], {k: v[:6] for k, v in masks.items()},
                            cfg.model.patch_size, path)
        logger.artifact(path)


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(loop_config: dict[str, bytes], host: Host | None = None) -> None:
    spec: LoopSpec = open_spec(loop_config)
    cfg = from_dict(spec.config)
    w = worker_context(cfg, spec, host)
    objective = build_objective(cfg)
    opt = build_optimizer(objective, cfg, w.world, w.device.type == "cuda")
    state = resume(objective, opt, spec, w)
    model = wrap_model(objective, w, cfg.run.compile)
    logger = run_logger(spec, cfg, w)
    with system_metrics(logger, cfg):
        if state.epoch == 0:
            state.knn_init = initial_knn(model, cfg, w, logger)
        while state.epoch < cfg.optim.epochs:
            sums = train_epoch(model, opt, cfg, spec, state, w, logger)
            metrics = close_epoch(sums, model, cfg, spec, state, w)
            save_and_report(model, opt, cfg, spec, state, metrics, w, logger)
        if logger:
            log_encoder(logger, objective, cfg, state.epoch)
            logger.flush()
