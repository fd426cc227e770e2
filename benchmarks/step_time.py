"""Milliseconds per training step of a config's model on this CPU: forward, backward and AdamW
on random input, no Ray, no data. A quick gauge of a machine (or of a setting) before timing
a whole run.

    python benchmarks/step_time.py                                   # the demo's model
    python benchmarks/step_time.py --config configs/fashion_mnist_quality.yaml --batch 256
    # the same step without AVX-512 kernels (torch's own, MKL's and oneDNN's):
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
        python benchmarks/step_time.py
    bash benchmarks/slow_machine.sh 0.85 python benchmarks/step_time.py   # under a CPU quota
    python benchmarks/step_time.py --bf16   # under CPU bf16 autocast (fast where AMX is)

Prints the ISA torch dispatches to, so that a row says which kernels it timed.
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import torch

from micl.config import load_config
from micl.models import MaskedViT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fashion_mnist_demo.yaml")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--bf16", action="store_true", help="forward under torch.autocast('cpu', "
                   "bfloat16): what AMX-BF16 (lscpu: amx_bf16) speeds up")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    model = MaskedViT.from_config(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(a.batch, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=a.bf16):
            out = model(x)
        loss = out.float().pow(2).mean()  # any scalar of the encoder's output will do
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: allocator, oneDNN primitive caches
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    ms = (time.perf_counter() - t0) / a.steps * 1000
    print(f"{_common.cpu_model()}, torch kernels {torch.backends.cpu.get_cpu_capability()}, "
          f"{a.threads} threads{', bf16 autocast' if a.bf16 else ''}: {ms:.0f} ms a step of "
          f"{a.batch} ({a.config})")


if __name__ == "__main__":
    main()
