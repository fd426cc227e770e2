"""GPU throughput and model FLOPs utilisation (MFU) of MiCL pre-training steps.

Run (from the repository root, on a machine with a CUDA GPU; prints "no GPU: skipped" and exits
0 anywhere else):

    .venv/bin/python benchmarks/gpu.py                          # ViT-B/16, ViT-L/16 x r=0.9, 0.75
    .venv/bin/python benchmarks/gpu.py --batch-size 512 1024 1800 --compile
    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/gpu.py --e2e --num-images 20000
    .venv/bin/python benchmarks/gpu.py --check-flops            # no GPU needed: FLOP counter test
    .venv/bin/python benchmarks/gpu.py --allow-cpu --no-append  # code-path smoke test on CPU

Compute-bound mode (default): synthetic uint8 images and MiCL view indices already on the GPU;
one step = `micl.train.to_device` (normalize) -> `micl.train.train_step`, the training loop's own
step: forward of both views (bf16 autocast) -> MiCL loss -> backward -> grad-norm -> finiteness
check (one host sync per step, as in the loop) -> fused AdamW step (`build_optimizer`). Timed
with CUDA events over --steps steps after --warmup steps. Reported: images/s, achieved TFLOP/s,
MFU, peak memory. --compile hands train_step the torch.compile'd objective.

FLOPs are counted analytically for the tokens actually processed (a multiply-add = 2 FLOPs):
per view N = 1 + k tokens (k = patches per view = int(L (1 - r)) // 2); per block forward
24 N D^2 (qkv, projection, 4x MLP) + 4 N^2 D (QK^T and AV); forward+backward = 3x forward; plus
the patch embedding of the 2k kept patches (`MaskedViT.embed_visible`; until 2026-12-04 the
Conv2d ran on all L patches): 2 (2k) (p^2 C) D forward, and 2x that for forward+backward (the
weight gradient only: the images need no gradient). Norms, softmax, the loss and the optimizer
are not counted (MFU convention).
`--check-flops` compares this count with torch.utils.flop_counter on a small model.
Peak dense bf16 FLOP/s come from a table by GPU name (H100 SXM / H200 989 TF, H100 PCIe 756,
A100 312, ...), or --peak-tflops.

End-to-end mode (--e2e): the same step fed by this project's real stream (load_split +
train_stream on a generated JPEG ImageFolder or Parquet shards, on a local Ray cluster using
the machine's CPUs minus --train-cpus), consumed with iter_torch_batches(pin_memory=True) like
micl.train. Reports images/s, the fraction of the compute-bound rate it reaches, and the
stream's images/s per data CPU when the stream is the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of the device name; first
# match wins, so more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
]


def peak_tflops(name: str, override: float | None = None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


@dataclass(frozen=True)
class Setup:
    model: str  # micl.config.MODEL_SIZES key
    mask_ratio: float
    batch_size: int
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    method: str = "micl"  # "micl" or "mae" (the reference point)
    depth: int | None = None  # fewer blocks than the size's (CPU dry runs)

    @property
    def label(self) -> str:
        short = {"vit_base": "ViT-B", "vit_large": "ViT-L", "vit_huge": "ViT-H",
                 "vit_small": "ViT-S", "vit_tiny": "ViT-Ti", "vit_pico": "ViT-pico"}
        name = f"{short.get(self.model, self.model)}/{self.patch_size}"
        return name if self.method == "micl" else f"{self.method.upper()} {name}"

    def dims(self) -> tuple[int, int, int]:
        """(embed dim, depth, patches L)."""
        from micl.config import MODEL_SIZES

        dim, depth, _ = MODEL_SIZES[self.model]
        return dim, self.depth or depth, (self.img_size // self.patch_size) ** 2


def block_flops(tokens: int, dim: int) -> int:
    """Forward FLOPs of one ViT block on `tokens` tokens: qkv, projection and the 4x MLP
    (24 N D^2) plus QK^T and AV (4 N^2 D); a multiply-add = 2 FLOPs."""
    return 24 * tokens * dim**2 + 4 * tokens**2 * dim


def micl_flops_per_image(s: Setup) -> dict[str, float]:
    """Analytic training FLOPs per image of one MiCL step (see the module docstring)."""
    from micl.data.masking import patches_per_view

    dim, depth, patches = s.dims()
    tokens = 1 + patches_per_view(patches, s.mask_ratio)
    blocks_fwd = 2 * depth * block_flops(tokens, dim)  # two views
    embed_fwd = 2 * 2 * (tokens - 1) * (s.patch_size**2 * s.in_chans) * dim  # kept patches only
    return {"tokens_per_view": tokens, "forward": blocks_fwd + embed_fwd,
            "train": 3 * blocks_fwd + 2 * embed_fwd}


def mae_flops_per_image(s: Setup) -> dict[str, float]:
    """The same count for MAE: the encoder on 1 + n visible tokens (n = int(L (1 - r))), the
    decoder's input projection, its blocks on all 1 + L tokens, and its pixel head on the
    L - n masked ones (MAE's 512-wide, 8-block decoder: micl.objectives.mae's defaults)."""
    from micl.objectives.mae import MAEArgs

    dim, depth, patches = s.dims()
    dec = MAEArgs()
    visible = max(1, int(patches * (1 - s.mask_ratio)))
    pixels = s.patch_size**2 * s.in_chans
    net_fwd = (depth * block_flops(1 + visible, dim)
               + 2 * (1 + visible) * dim * dec.decoder_dim
               + dec.decoder_depth * block_flops(1 + patches, dec.decoder_dim)
               + 2 * (patches - visible) * dec.decoder_dim * pixels)
    embed_fwd = 2 * visible * pixels * dim  # the visible patches only
    return {"tokens_per_view": 1 + visible, "forward": net_fwd + embed_fwd,
            "train": 3 * net_fwd + 2 * embed_fwd}


def flops_per_image(s: Setup) -> dict[str, float]:
    return (mae_flops_per_image if s.method == "mae" else micl_flops_per_image)(s)


def build_config(s: Setup):
    from micl.config import Config

    cfg = Config()
    cfg.model.name, cfg.model.img_size, cfg.model.patch_size, cfg.model.in_chans = \
        s.model, s.img_size, s.patch_size, s.in_chans
    cfg.model.depth = s.depth
    cfg.method.name = s.method
    cfg.method.args["mask_ratio"] = s.mask_ratio
    cfg.data.batch_size = s.batch_size
    from micl.driver import check

    return check(cfg)  # generic fields, data source, method (fills in MiCL's defaults)


class Stepper:
    """One MiCL optimizer step as micl.train.train_loop_per_worker takes it: the same optimizer
    (`build_optimizer`, fused AdamW on GPU), `to_device` and `train_step` (bf16 autocast on GPU,
    optim.clip_grad, finiteness check)."""

    def __init__(self, s: Setup, device, compile_model: bool = False,
                 backend: str = "inductor") -> None:
        import torch

        from micl.objectives import build_objective
        from micl.train import build_optimizer

        self.cfg = build_config(s)
        self.device = device
        torch.manual_seed(0)
        self.model = build_objective(self.cfg).to(device)
        on_gpu = device.type == "cuda"
        self.opt = build_optimizer(self.model, self.cfg, world=1, on_gpu=on_gpu)
        self.autocast = torch.bfloat16 if on_gpu else None
        # The compiled module shares the objective's parameters: train_step clips and steps
        # them through it.
        self.forward = torch.compile(self.model, backend=backend) if compile_model \
            else self.model

    def __call__(self, raw: dict[str, Any]) -> Any:
        from micl.train import to_device, train_step

        batch = to_device(raw, self.cfg, self.device)
        result = train_step(self.forward, self.opt, [batch], self.cfg.optim.clip_grad,
                            self.autocast)
        if not result.finite:
            raise FloatingPointError("non-finite loss or gradient in the benchmark step")
        return result.loss


def synthetic_batch(s: Setup, device) -> dict[str, Any]:
    import numpy as np
    import torch

    from micl.objectives import stream_spec

    spec = stream_spec(build_config(s))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (s.batch_size, s.in_chans, s.img_size, s.img_size),
                           dtype=torch.uint8, generator=g)
    rng = np.random.default_rng(0)
    per_sample = [spec.draw_masks(rng) for _ in range(s.batch_size)]  # {name: int64 [k]} each
    masks = {k: np.stack([m[k] for m in per_sample]) for k in per_sample[0]}  # [B, k]
    batch = {"image": images, **{k: torch.as_tensor(v) for k, v in masks.items()}}
    return {k: v.to(device) for k, v in batch.items()}


def time_steps(step: Stepper, batch_fn, warmup: int, steps: int, device) -> float:
    """Seconds for `steps` steps after `warmup` (CUDA events on GPU, perf_counter on CPU)."""
    import torch

    for _ in range(warmup):
        step(batch_fn())
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step(batch_fn())
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    for _ in range(steps):
        step(batch_fn())
    return time.perf_counter() - t


def compute_bound(s: Setup, args, device, peak: float | None) -> list[object]:
    import torch

    flops = flops_per_image(s)
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step = Stepper(s, device, args.compile)
        batch = synthetic_batch(s, device)
        seconds = time_steps(step, lambda: batch, args.warmup, args.steps, device)
    except torch.OutOfMemoryError:
        return [s.label, s.mask_ratio, flops["tokens_per_view"], s.batch_size, "OOM", "", "",
                "", ""]
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
    ips = s.batch_size * args.steps / seconds
    tflops = ips * flops["train"] / 1e12
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return [s.label, s.mask_ratio, flops["tokens_per_view"], s.batch_size, ips,
            flops["train"] / 1e9, tflops, f"{100 * tflops / peak:.1f}%" if peak else "n/a",
            f"{mem:.1f}"]


def end_to_end(s: Setup, args, device, compute_ips: float | None) -> list[object]:
    """The step fed by the real stream; returns a table row."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from micl.data.clock import epoch_clock, new_clock_name
    from micl.data.sources import load_split
    from micl.data.stream import train_stream
    from micl.driver import check
    from micl.objectives import stream_spec

    folder = _common.make_jpeg_folder(args.data_root / f"jpeg-{args.num_images}", args.num_images)
    path = folder if args.e2e_format == "jpeg" else _common.make_parquet_shards(
        folder, args.data_root / f"parquet-{args.num_images}")
    data_cpus = max(1, (os.cpu_count() or 2) - args.train_cpus)
    if not ray.is_initialized():
        _common.start_ray(num_cpus=data_cpus, include_dashboard=False, log_to_driver=False,
                          runtime_env={"env_vars": {"PYTHONPATH": str(_common.ROOT)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = build_config(s)
    cfg.data.source = "imagefolder" if args.e2e_format == "jpeg" else "parquet"
    cfg.data.path = str(path)
    cfg.data.map_batch_size = args.map_batch_size
    cfg = check(cfg)  # again, for the file source
    clock_name = new_clock_name("gpu-bench")
    clock = epoch_clock(clock_name)
    ds = train_stream(load_split(cfg, "train"), cfg, clock_name, stream_spec(cfg))
    step = Stepper(s, device, args.compile)
    on_gpu = device.type == "cuda"
    n = seen = 0
    t0 = None
    for epoch in range(args.e2e_epochs):
        ray.get(clock.set.remote(epoch))
        for raw in ds.iter_torch_batches(batch_size=s.batch_size, drop_last=True,
                                         prefetch_batches=4, pin_memory=on_gpu):
            raw.pop("skipped", None)
            raw.pop("label", None)
            raw.pop("sample_id", None)
            step(raw)
            seen += 1
            if seen == args.warmup:  # steady state: from the end of the warm-up steps
                if on_gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            elif t0 is not None:
                n += s.batch_size
    if on_gpu:
        torch.cuda.synchronize()
    if t0 is None or n == 0:
        raise SystemExit(f"--e2e: only {seen} batches; use more --num-images or --e2e-epochs")
    ips = n / (time.perf_counter() - t0)
    frac = f"{ips / compute_ips:.2f}" if compute_ips else "n/a"
    return [s.label, s.mask_ratio, s.batch_size, f"{args.e2e_format} ({args.num_images})",
            data_cpus, ips, frac, ips / data_cpus]


def check_flops() -> int:
    """Compare the analytic count with torch.utils.flop_counter on CPU (small models)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from micl.train import to_device

    rows = []
    worst = 0.0
    for s in (Setup("vit_pico", 0.75, 4, 64, 8), Setup("vit_tiny", 0.9, 2, 224, 16),
              Setup("vit_small", 0.75, 2, 224, 16), Setup("vit_pico", 0.75, 4, 64, 8, method="mae"),
              Setup("vit_small", 0.75, 2, 224, 16, method="mae")):
        step = Stepper(s, torch.device("cpu"))
        batch = synthetic_batch(s, torch.device("cpu"))
        counter = FlopCounterMode(display=False)
        # The math backend: the counter has no formula for the CPU flash-attention kernel and
        # would leave out QK^T and AV (about 5% of an MAE step, its decoder sees all tokens).
        with counter, sdpa_kernel(SDPBackend.MATH):
            loss, _ = step.model(to_device(batch, step.cfg, torch.device("cpu")))
            loss.backward()
        measured = counter.get_total_flops() / s.batch_size
        analytic = flops_per_image(s)["train"]
        rel = analytic / measured - 1
        worst = max(worst, abs(rel))
        rows.append([s.label, s.img_size, s.mask_ratio, analytic / 1e6, measured / 1e6,
                     f"{100 * rel:+.2f}%"])
    print(_common.markdown_table(["model", "img", "r", "analytic MFLOP/img",
                                  "torch FlopCounterMode MFLOP/img", "difference"], rows))
    s = Setup("vit_large", 0.9, 1)
    f = flops_per_image(s)
    print(f"ViT-L/16 r=0.9: {f['tokens_per_view']} tokens per view, "
          f"{f['train'] / 1e9:.2f} GFLOP per image per training step")
    ok = worst < 0.005  # the count is exact up to the terms it leaves out on purpose
    print("FLOP counter check:", "OK" if ok else "MISMATCH", f"(worst {100 * worst:.2f}%)")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_base", "vit_large"])
    p.add_argument("--mask-ratios", nargs="+", type=float, default=[0.9, 0.75])
    p.add_argument("--batch-size", nargs="+", type=int, default=[1024])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="torch.compile the objective")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the table")
    p.add_argument("--e2e", action="store_true", help="also run with the real Ray Data stream")
    p.add_argument("--e2e-format", choices=["jpeg", "parquet"], default="jpeg")
    p.add_argument("--e2e-epochs", type=int, default=1)
    p.add_argument("--num-images", type=int, default=20000, help="--e2e data set size")
    p.add_argument("--data-root", type=Path, default=Path("/tmp/micl-bench"))
    p.add_argument("--map-batch-size", type=int, default=128)
    p.add_argument("--train-cpus", type=int, default=2,
                   help="--e2e: CPUs left to the training process (the rest go to Ray Data)")
    p.add_argument("--check-flops", action="store_true",
                   help="compare the analytic FLOP count with torch's counter, then exit")
    p.add_argument("--allow-cpu", action="store_true",
                   help="smoke-test the code paths on CPU with a tiny model (not a result)")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()

    if args.check_flops:
        return check_flops()
    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif args.allow_cpu:
        device, name = torch.device("cpu"), "CPU (smoke test)"
        args.models, args.batch_size = ["vit_pico"], [8]
        args.warmup, args.steps = 1, 2
    else:
        print("no GPU: skipped (torch.cuda.is_available() is False); "
              "--check-flops tests the FLOP counter without one")
        return 0
    peak = peak_tflops(name, args.peak_tflops)
    machine = _common.machine()
    rows, best = [], {}
    for model in args.models:
        for r in args.mask_ratios:
            for bs in args.batch_size:
                s = Setup(model, r, bs) if device.type == "cuda" else Setup(model, r, bs, 64, 8)
                print(f"[bench] {s.label} r={r} batch {bs} ...", flush=True)
                row = compute_bound(s, args, device, peak)
                rows.append(row)
                print("   ", row, flush=True)
                if isinstance(row[4], float):
                    best[(model, r)] = max(best.get((model, r), (0, bs)), (row[4], bs))
    header = ["model", "r", "tokens/view", "batch", "img/s", "GFLOP/img (train)",
              "TFLOP/s", f"MFU (peak {peak or '?'} TF)", "peak mem GiB"]
    table = _common.markdown_table(header, rows)
    compiled = ", torch.compile" if args.compile else ""
    notes = [f"Device: {name}; bf16 autocast, fused AdamW{compiled}"
             f"; {args.warmup} warm-up + {args.steps} timed steps; synthetic input on the device.",
             "FLOPs: analytic, tokens actually processed (module docstring of benchmarks/gpu.py)."]
    e2e_rows = []
    if args.e2e:
        for (model, r), (ips, bs) in best.items():
            s = Setup(model, r, bs) if device.type == "cuda" else Setup(model, r, bs, 64, 8)
            print(f"[bench] end-to-end {s.label} r={r} batch {bs} ...", flush=True)
            e2e_rows.append(end_to_end(s, args, device, ips))
            print("   ", e2e_rows[-1], flush=True)
        table += "\n\nEnd to end (real stream):\n\n" + _common.markdown_table(
            ["model", "r", "batch", "data", "Ray Data CPUs", "img/s", "of compute-bound",
             "img/s per data CPU"], e2e_rows)
    if args.no_append or device.type != "cuda":
        print(table)
        print("\n".join(notes))
        return 0
    _common.append_result("GPU: MiCL images/s and MFU", table, notes, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
