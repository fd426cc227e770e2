"""The GPU check: every GPU-facing part of micl in one command, one summary table at the end.

    python benchmarks/gpu_check.py             # a CUDA machine: about 10 min on one H200
    python benchmarks/gpu_check.py --dry-run   # every part on CPU at tiny sizes (the test suite)

A GPU is lent to this project's sessions only now and then, for minutes, so this script is run
on CPU by the test suite (`--dry-run`, tests/test_gpu_check.py) and cannot rot in between.

Parts (`--parts`; each result is written to <out>/gpu_check.json as soon as it exists, so a run
cut short keeps what it measured, and `--budget-s` skips the parts that would not fit):
  step     compute-bound: the training loop's own step (`micl.train.train_step`: bf16 autocast,
           the float32 loss, grad-norm and finiteness check, fused AdamW) on synthetic input
           already on the GPU, for MiCL ViT-B/16 and ViT-L/16 at r = 0.9 and 0.75 and for MAE
           ViT-L/16 at 0.75 (the reference point), each at the largest power-of-two batch that
           fits (OOM-probed up to --max-batch): images/s, TFLOP/s by the analytic count of
           benchmarks/gpu.py (checked here against torch's FLOP counter), MFU, peak memory.
  compile  the same step torch.compile'd (`run.compile` does the same in the loop), for
           ViT-L/16 at r = 0.9: compile seconds and images/s beside the eager row.
  profile  where the eager ViT-L/16 r = 0.9 step's time goes (torch.profiler over 3 steps):
           the share of the wall time in matrix products, attention, norms, the optimizer,
           copies and gathers, elementwise and reduction kernels, and with the GPU idle; the
           top kernels go to <out>/profile.txt. What to speed up next, when MFU falls short.
  attention the same eager step under each of torch's attention kernels (flash, memory-
           efficient, cuDNN, math): MiCL's views are short (10 tokens at r = 0.9 for ViT-L/16,
           the cls token included), far below the 64-128-row tiles the fused kernels are
           built for, so which kernel wins there is measured, not assumed.
  e2e      a real pre-training (`run_pretraining`: Ray Data -> TorchTrainer on the GPU -> MLflow)
           of ViT-L/16 r = 0.9 from Parquet shards of 256-px images the script writes, for
           about a minute: training images/s against the compute-bound rate at the same batch,
           and the time each step waited on the data iterator (`data_wait_s`); when the stream
           is the bound, the CPU cores per GPU that would close the gap.
  extras   on the same GPU and data: a one-epoch fine-tuning run from the e2e encoder (Mixup,
           RandAugment, layer decay), the kNN evaluation of that encoder, and a two-trial Tune
           search at run.gpus_per_worker = 0.5 (both trials share the GPU).

Without --dry-run the table is appended to BENCHMARKS.md with the GPU's name and driver.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import gpu  # noqa: E402
from gpu import Setup  # noqa: E402

PARTS = ("step", "compile", "profile", "attention", "e2e", "extras")


@dataclass
class Plan:
    """Sizes of one check: `gpu_plan` for a CUDA device, `dry_plan` for CPU."""

    dry: bool
    device: Any  # torch.device
    step_setups: list[Setup]
    compile_setups: list[Setup]
    e2e_setup: Setup
    tune_ratios: tuple[float, ...] = (0.75, 0.9)  # the trials' method.mask_ratio, one each
    first_batch: int = 256  # the OOM probe doubles from here
    max_batch: int = 8192
    warmup: int = 3
    steps: int = 10
    e2e_images: int = 40000
    e2e_val: int = 2000
    e2e_px: int = 256  # stored image size (the stream crops model.img_size out of it)
    e2e_classes: int = 10
    e2e_seconds: float = 60.0
    # The dry run traces the step (dynamo + AOT autograd: where a model change breaks
    # compilation) but leaves inductor's C++ code generation, 20 s on 2 cores, to the GPU run.
    compile_backend: str = "inductor"
    # The dry run pre-trains and fine-tunes in Ray Train's local mode (the loop in this
    # process): a worker's start-up, about 25 s on 2 CPUs, is most of a tiny run. The Tune
    # trial keeps its worker (Tune needs one); one trial runs the same code as two.
    run_workers: int = 1
    # The batch of the compile, profile and attention parts when the step part did not run
    # (`--batch`); None: the e2e part's batch.
    fixed_batch: int | None = None
    overrides: list[str] = field(default_factory=list)  # for every run of e2e and extras


def gpu_plan(device, max_batch: int) -> Plan:
    micl = [Setup(m, r, 256) for m in ("vit_base", "vit_large") for r in (0.9, 0.75)]
    return Plan(False, device, [*micl, Setup("vit_large", 0.75, 256, method="mae")],
                [Setup("vit_large", 0.9, 256)], Setup("vit_large", 0.9, 1024), max_batch=max_batch,
                overrides=["run.use_gpu=true", "run.cpus_per_worker=2", "data.map_batch_size=128"])


def dry_plan(device) -> Plan:
    tiny = {"img_size": 32, "patch_size": 8, "depth": 1}
    return Plan(True, device,
                [Setup("vit_pico", 0.75, 8, **tiny), Setup("vit_pico", 0.75, 8, **tiny,
                                                           method="mae")],
                [Setup("vit_pico", 0.75, 8, **tiny)], Setup("vit_pico", 0.75, 32, **tiny),
                tune_ratios=(0.5,), first_batch=8, max_batch=16, warmup=1, steps=2,
                e2e_images=256, e2e_val=64, e2e_px=40, e2e_classes=4, e2e_seconds=0.0,
                compile_backend="aot_eager", run_workers=0,
                overrides=["run.cpus_per_worker=0.5", "run.torch_threads=1", "data.data_cpus=0.5",
                           "data.map_batch_size=32"])


class Report:
    """Rows of the summary table, saved to <out>/gpu_check.json after each one."""

    HEADER = ["part", "setup", "batch", "img/s", "TFLOP/s", "MFU", "peak GiB", "notes"]

    def __init__(self, out: Path, peak_tflops: float | None) -> None:
        self.path, self.peak, self.rows = out / "gpu_check.json", peak_tflops, []
        self.t0, self.elapsed_s = time.perf_counter(), []  # when each row was done: part costs

    def add(self, part: str, setup: str, batch: Any = "", ips: float | None = None,
            flops_per_image: float | None = None, peak_gib: float | None = None,
            notes: str = "") -> None:
        tflops = ips * flops_per_image / 1e12 if ips and flops_per_image else None
        mfu = f"{100 * tflops / self.peak:.1f}%" if tflops and self.peak else ""
        row = [part, setup, batch, "" if ips is None else round(ips, 1),
               "" if tflops is None else round(tflops, 1), mfu,
               "" if peak_gib is None else round(peak_gib, 1), notes]
        self.rows.append(row)
        self.elapsed_s.append(round(time.perf_counter() - self.t0, 1))
        self.path.write_text(json.dumps({"header": self.HEADER, "rows": self.rows,
                                         "elapsed_s": self.elapsed_s}, indent=1))
        print("[gpu-check]", " | ".join(str(v) for v in row), flush=True)

    def table(self) -> str:
        return _common.markdown_table(self.HEADER, self.rows)


# ----------------------------------------------------------------------------- part 1 and 2


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def largest_batch(step: gpu.Stepper, s: Setup, plan: Plan) -> int | None:
    """The largest power-of-two batch from plan.first_batch up to plan.max_batch whose step
    runs without running out of device memory (two steps: the optimizer state counts)."""
    import torch

    fits, b = None, plan.first_batch
    while b <= plan.max_batch:
        try:
            batch = gpu.synthetic_batch(replace(s, batch_size=b), plan.device)
            for _ in range(2):
                step(batch)
            fits = b
        except torch.OutOfMemoryError:
            step.opt.zero_grad(set_to_none=True)
            break
        finally:
            batch = None
            reset_peak_memory(plan.device)
        b *= 2
    return fits


def timed_step(s: Setup, plan: Plan, compile_model: bool) -> tuple[float, float | None, float]:
    """(images/s, peak GiB, seconds of the first step: compilation included) at s.batch_size."""
    reset_peak_memory(plan.device)
    step = gpu.Stepper(s, plan.device, compile_model, plan.compile_backend)
    batch = gpu.synthetic_batch(s, plan.device)
    t = time.perf_counter()
    step(batch)
    float(step(batch))  # a host sync: the first steps are done
    first = time.perf_counter() - t
    seconds = gpu.time_steps(step, lambda: batch, plan.warmup, plan.steps, plan.device)
    return s.batch_size * plan.steps / seconds, peak_memory_gib(plan.device), first


def part_step(plan: Plan, report: Report) -> dict[Setup, int]:
    """Compute-bound rows; returns the batch found for each setup."""
    import torch

    found = {}
    for s in plan.step_setups:
        torch.manual_seed(0)
        b = largest_batch(gpu.Stepper(s, plan.device), s, plan)
        flops = gpu.flops_per_image(s)
        label = f"{s.label} r={s.mask_ratio}"
        if b is None:
            report.add("step", label, f"OOM at {plan.first_batch}")
            continue
        found[s] = b
        ips, peak, _ = timed_step(replace(s, batch_size=b), plan, compile_model=False)
        capped = " (the probe's cap)" if b == plan.max_batch else ""
        report.add("step", label, f"{b}{capped}", ips, flops["train"], peak,
                   f"{flops['train'] / 1e9:.2f} GFLOP/img, {flops['tokens_per_view']} tokens/view"
                   ", eager")
    return found


def batch_of(plan: Plan, found: dict[Setup, int], s: Setup) -> int:
    """The step part's batch for s, else --batch, else the e2e part's."""
    return found.get(s) or plan.fixed_batch or plan.e2e_setup.batch_size


def part_compile(plan: Plan, report: Report, found: dict[Setup, int]) -> None:
    for s in plan.compile_setups:
        b = batch_of(plan, found, s)
        ips, peak, first = timed_step(replace(s, batch_size=b), plan, compile_model=True)
        report.add("compile", f"{s.label} r={s.mask_ratio}", b, ips,
                   gpu.flops_per_image(s)["train"], peak,
                   f"torch.compile ({plan.compile_backend}); first two steps {first:.0f} s "
                   "(compilation)")


def check_flop_count(report: Report) -> None:
    """The analytic count against torch's FLOP counter (CPU, small models): MFU rests on it."""
    ok = gpu.check_flops() == 0
    report.add("flops", "analytic vs torch FlopCounterMode", notes="OK" if ok else "MISMATCH")
    if not ok:
        raise SystemExit("the analytic FLOP count disagrees with torch's counter")


# Kernel (GPU) or operator (CPU dry run) names -> what they do; first match wins.
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("matmul", ("gemm", "matmul", "cutlass", "xmma", "nvjet", "aten::mm", "aten::addmm",
                "aten::bmm", "aten::linear")),
    ("norm", ("layer_norm", "layernorm", "norm_")),
    ("copy/gather", ("copy", "gather", "index", "cat", "scatter")),
    ("elementwise", ("elementwise", "gelu", "aten::mul", "aten::add", "aten::div", "aten::sub")),
    ("reduction", ("reduce", "aten::sum", "aten::mean")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def part_profile(plan: Plan, report: Report, out: Path, found: dict[Setup, int]) -> None:
    """Shares of the eager step's wall time by kernel kind, and idle (GPU) time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    s = plan.compile_setups[0]
    s = replace(s, batch_size=batch_of(plan, found, s))
    step, batch = gpu.Stepper(s, plan.device), gpu.synthetic_batch(s, plan.device)
    cuda = plan.device.type == "cuda"
    for _ in range(plan.warmup):
        step(batch)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(3):
            step(batch)
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t) * 1e6
    events = prof.key_averages()
    # GPU: the kernels' own time; CPU: the aten operators' self time (no double counting).
    timed = [(e.key, e.self_device_time_total) for e in events
             if e.device_type == torch.autograd.DeviceType.CUDA] if cuda else \
        [(e.key, e.self_cpu_time_total) for e in events if e.key.startswith("aten::")]
    share: dict[str, float] = {}
    for name, us in timed:
        kind = kernel_kind(name)
        share[kind] = share.get(kind, 0.0) + us / wall_us
    if cuda:
        share["GPU idle"] = max(0.0, 1.0 - sum(share.values()))
    (out / "profile.txt").write_text(events.table(
        sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25))
    report.add("profile", f"{s.label} r={s.mask_ratio}, eager", s.batch_size, notes=", ".join(
        f"{kind} {100 * v:.0f}%" for kind, v in sorted(share.items(), key=lambda kv: -kv[1]))
        + f" of {wall_us / 3e3:.0f} ms per step")


def part_attention(plan: Plan, report: Report, found: dict[Setup, int]) -> None:
    """The eager ViT-L/16 r = 0.9 step's images/s under each SDPA kernel; a kernel that cannot
    run these shapes on this device is a row saying so."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = plan.compile_setups[0]
    s = replace(s, batch_size=batch_of(plan, found, s))
    step, batch = gpu.Stepper(s, plan.device), gpu.synthetic_batch(s, plan.device)
    flops = gpu.flops_per_image(s)["train"]
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        label = f"{s.label} r={s.mask_ratio}, eager, {backend.name.lower()}"
        reset_peak_memory(plan.device)
        try:
            with sdpa_kernel(backend):
                seconds = gpu.time_steps(step, lambda: batch, plan.warmup, plan.steps,
                                         plan.device)
        except RuntimeError as e:  # "No available kernel": this backend cannot take the shapes
            step.opt.zero_grad(set_to_none=True)
            reason = str(e).split(". ")[0][:120]
            report.add("attention", label, s.batch_size, notes=f"not run: {reason}")
            continue
        report.add("attention", label, s.batch_size, s.batch_size * plan.steps / seconds, flops,
                   peak_memory_gib(plan.device))


# ----------------------------------------------------------------------------- part 3 and 4


def run_config(plan: Plan, data: Path, out: Path, *overrides: str):
    """A pre-training config on the written shards, the model of plan.e2e_setup."""
    from micl.config import Config, with_overrides

    s = plan.e2e_setup
    return with_overrides(Config(), [
        f"model.name={s.model}", f"model.img_size={s.img_size}", f"model.patch_size={s.patch_size}",
        f"model.in_chans={s.in_chans}", f"model.depth={s.depth}" if s.depth else "model.depth=null",
        "data.source=parquet", f"data.path={data}", f"data.batch_size={s.batch_size}",
        f"data.knn_bank_size={min(2000, plan.e2e_images)}",
        f"data.knn_query_size={min(1000, plan.e2e_val)}",
        f"method.name={s.method}", f"method.mask_ratio={s.mask_ratio}", "optim.warmup_epochs=0",
        "run.num_workers=1", "run.system_metrics_every_s=5", f"run.storage_path={out / 'runs'}",
        f"run.tracking_uri=sqlite:///{out / 'mlflow.db'}", *plan.overrides, *overrides])


def data_cpus(plan: Plan, cfg) -> float:
    """CPUs left to Ray Data once the training workers have theirs."""
    import ray

    total = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else os.cpu_count()
    return max(1.0, total - cfg.run.num_workers * cfg.run.cpus_per_worker)


def part_e2e(plan: Plan, report: Report, out: Path) -> tuple[str, Path]:
    """Returns the run's MLflow id and the data directory (the extras reuse both)."""
    from micl.driver import run_pretraining

    s = plan.e2e_setup
    data = _common.write_synthetic_parquet(out / "data", plan.e2e_images, plan.e2e_val,
                                           plan.e2e_px, plan.e2e_classes)
    compute_ips, _, _ = timed_step(s, plan, compile_model=False)
    epochs = max(1, min(4, math.ceil(plan.e2e_seconds * compute_ips / plan.e2e_images)))
    cfg = run_config(plan, data, out, f"optim.epochs={epochs}", f"run.eval_every={epochs}",
                     f"run.checkpoint_every={epochs}", f"run.num_workers={plan.run_workers}")
    t = time.perf_counter()
    result = run_pretraining(cfg)
    m, seconds = result.metrics, time.perf_counter() - t
    ips, wait, start = m["images_per_s"], m["data_wait_s"], m["data_start_s"]
    images = m["step"] // epochs * s.batch_size  # in the last epoch
    steady = images / max(images / ips - start, 1e-9)  # after the stream's first batch
    step_s = s.batch_size / steady
    bound = "data" if wait > 0.1 * step_s else "compute"
    cpus = data_cpus(plan, cfg)
    close = f"; about {math.ceil(compute_ips / (steady / cpus))} data CPU cores per GPU " \
        "would keep up" if bound == "data" else ""
    report.add("e2e", f"{s.label} r={s.mask_ratio} from Parquet ({plan.e2e_images} imgs)",
               s.batch_size, steady, gpu.flops_per_image(s)["train"], None,
               f"last of {epochs} epochs, after its first batch ({start:.1f} s; {ips:.0f} img/s "
               f"with it): {steady / compute_ips:.2f} of compute-bound ({compute_ips:.0f} img/s);"
               f" data wait {1e3 * wait:.1f} ms per {1e3 * step_s:.0f} ms step: {bound}-bound "
               f"with {cpus:g} data CPUs{close}; kNN {m.get('knn_top1', float('nan')):.3f}; "
               f"{seconds:.0f} s wall")
    return result.mlflow_run_id, data


def part_tune(plan: Plan, report: Report, out: Path, data: Path) -> None:
    from micl.tune import run_search
    from micl.tune_space import parse_space

    gpus = ["run.gpus_per_worker=0.5"] if not plan.dry else []
    base = run_config(plan, data, out, "optim.epochs=1", "run.eval_every=1", "run.num_workers=1",
                      f"data.limit_train={min(8192, plan.e2e_images // 2)}", *gpus)
    space = parse_space({"params": {"method.mask_ratio": {"grid": list(plan.tune_ratios)}},
                         "scheduler": "fifo"}, base)
    t = time.perf_counter()
    result = run_search(base, space, name=f"gpu-check-search-{time.strftime('%H%M%S')}")
    done = [tr for tr in result.trials if tr["error"] is None]
    n = len(plan.tune_ratios)
    report.add("extras", f"Tune: {n} trials" + (", 0.5 GPU each" if gpus else ""), "", None,
               notes=f"{len(done)}/{n} trials finished, knn_top1 "
               + ", ".join(f"{tr['knn_top1']:.3f}" for tr in done if tr["knn_top1"] is not None)
               + f"; {time.perf_counter() - t:.0f} s wall")
    if len(done) != n:
        raise RuntimeError(f"Tune trials failed: {[tr['error'] for tr in result.trials]}")


def part_finetune_and_knn(plan: Plan, report: Report, out: Path, data: Path, run_id: str
                          ) -> None:
    from micl.driver import evaluate_run
    from micl.finetune import run_finetuning

    s = plan.e2e_setup
    batch = 16 if plan.dry else 256
    cfg = run_config(plan, data, out, "optim.epochs=1", f"finetune.init={run_id}",
                     f"data.batch_size={batch}", "finetune.drop_path=0.1",
                     f"data.limit_train={min(8192, plan.e2e_images)}",
                     f"run.num_workers={plan.run_workers}")
    t = time.perf_counter()
    m = run_finetuning(cfg).metrics
    report.add("extras", f"fine-tune {s.label}, 1 epoch", batch, m.get("images_per_s"), None,
               None, f"val top-1 {m['val_top1']:.3f}; Mixup/CutMix, RandAugment, layer decay; "
               f"{time.perf_counter() - t:.0f} s wall")
    t = time.perf_counter()
    knn = evaluate_run(run_id=run_id, protocols=("knn",),
                       tracking_uri=f"sqlite:///{out / 'mlflow.db'}").metrics["knn_top1"]
    report.add("extras", "kNN evaluation of the e2e encoder", "", None, notes=f"knn_top1 "
               f"{knn:.3f}; {time.perf_counter() - t:.0f} s wall")


# ----------------------------------------------------------------------------- main


def gpu_description() -> tuple[str, float | None]:
    """('NVIDIA H200, driver 570.x, CUDA 12.x, torch 2.x', peak bf16 TFLOP/s) or a CPU line."""
    import torch

    if not torch.cuda.is_available():
        return f"CPU dry run ({_common.cpu_model()}), torch {torch.__version__}", None
    name = torch.cuda.get_device_name(0)
    driver = "unknown"
    if shutil.which("nvidia-smi"):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True
                                ).stdout.strip().splitlines()[0]
    return (f"{name}, driver {driver}, CUDA {torch.version.cuda}, torch {torch.__version__}",
            gpu.peak_tflops(name))


def run_parts(plan: Plan, report: Report, out: Path, parts: list[str], budget_s: float
              ) -> list[str]:
    """Run the parts in order; a failing part is a row, not the end. Returns the failures."""
    # Measured on one H200 (BENCHMARKS.md, "GPU"): step 210 s with compile (its 42 s of
    # compilation included), e2e 135 s, Tune 113 s, fine-tune and kNN about 90 s.
    need_s = {"step": 160, "compile": 60, "profile": 30, "attention": 40, "e2e": 140,
              "extras": 210}
    t0, failed, found, e2e = time.perf_counter(), [], {}, None
    if "step" in parts:
        check_flop_count(report)
    for part in parts:
        if not plan.dry and time.perf_counter() - t0 + need_s[part] > budget_s:
            report.add(part, "skipped", notes=f"would not fit in --budget-s {budget_s:g}")
            continue
        try:
            if part == "step":
                found = part_step(plan, report)
            elif part == "compile":
                part_compile(plan, report, found)
            elif part == "profile":
                part_profile(plan, report, out, found)
            elif part == "attention":
                part_attention(plan, report, found)
            elif part == "e2e":
                e2e = part_e2e(plan, report, out)
            elif e2e is None:
                report.add("extras", "skipped", notes="needs the e2e part's run")
            else:
                part_finetune_and_knn(plan, report, out, e2e[1], e2e[0])
                part_tune(plan, report, out, e2e[1])
        except Exception as e:  # noqa: BLE001 - one part's failure is reported, the rest run
            report.add(part, "FAILED", notes=f"{type(e).__name__}: {str(e)[:300]}")
            failed.append(part)
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="every part on CPU at tiny sizes; nothing is appended to BENCHMARKS.md")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--out", type=Path, default=Path("/tmp/micl-gpu-check"))
    p.add_argument("--budget-s", type=float, default=600, help="skip parts that would not fit")
    # 8192: ViT-B/16 at r = 0.9 peaks at 68 GiB there on an H200; twice that would not fit.
    p.add_argument("--max-batch", type=int, default=8192, help="cap of the batch-size probe")
    p.add_argument("--batch", type=int, default=None, help="the batch of the compile, profile "
                   "and attention parts when the step part does not run (default: 1024)")
    args = p.parse_args(argv)
    import torch

    if args.dry_run:
        plan = dry_plan(torch.device("cpu"))
    elif torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        plan = gpu_plan(torch.device("cuda"), args.max_batch)
    else:
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); "
              "--dry-run runs every part on CPU at tiny sizes", file=sys.stderr)
        return 2
    plan = replace(plan, fixed_batch=args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = _common.machine()
    described, peak = gpu_description()
    report = Report(args.out, peak)
    t0 = time.perf_counter()
    failed = run_parts(plan, report, args.out, args.parts, args.budget_s)
    notes = [f"Device: {described}; peak bf16 {peak or '?'} TFLOP/s (MFU's denominator).",
             f"Total {time.perf_counter() - t0:.0f} s; rows also in {report.path}.",
             *([f"FAILED parts: {', '.join(failed)}"] if failed else [])]
    if plan.dry:
        print(report.table(), *notes, sep="\n")
    else:
        _common.append_result("GPU check (issue 19)", report.table(), notes, machine)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
