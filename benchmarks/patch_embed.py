"""The patch projection of a masked step, two ways, alternated in one process: the Conv2d over
every patch of the image and then a gather of the kept tokens (the encoder until 2026-12-04,
and MAE's reference code), against `MaskedViT.embed_visible`: gather the kept patches' pixels,
then project only those with the Conv2d's weight as a Linear. Forward and the weight's
gradient, as in training (the images need no gradient).

    python benchmarks/patch_embed.py                         # ViT-L/16, r = 0.9, batch 64, CPU
    python benchmarks/patch_embed.py --device cuda --batch 4096 --dtype bfloat16

A GPU profile of the ViT-L/16 r = 0.9 step put the convolution at 10% of the step
(BENCHMARKS.md, "Where the ViT-L/16 r = 0.9 step's time goes"); this measures what keeping only
the views' patches saves, without a GPU.
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import torch

from micl.data.masking import patches_per_view
from micl.models.vit import MaskedViT, gather_tokens


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--dim", type=int, default=1024, help="1024: ViT-L")
    p.add_argument("--mask-ratio", type=float, default=0.9)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=5, help="alternations of the two ways")
    a = p.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    enc = MaskedViT(a.img, a.patch, 3, a.dim, 1, 16).to(device, dtype)
    weight = enc.patch_embed.proj.weight
    x = torch.randn(a.batch, 3, a.img, a.img, device=device, dtype=dtype)
    k = patches_per_view(enc.num_patches, a.mask_ratio)  # MiCL's: 9 of 196 at r = 0.9
    views = [torch.randint(0, enc.num_patches, (a.batch, k), device=device)
             for _ in range(a.views)]

    def all_then_gather() -> None:
        tokens = enc.embed_patches(x)
        torch.autograd.grad(sum(gather_tokens(tokens, v).sum() for v in views), weight)

    def kept_only() -> None:
        torch.autograd.grad(sum(enc.embed_visible(x, v).sum() for v in views), weight)

    conv, kept = [], []
    for _ in range(a.rounds):
        conv.append(timed(all_then_gather, 3, device))
        kept.append(timed(kept_only, 3, device))
    c, s = min(conv), min(kept)
    _common.append_result(
        "Patch projection: all patches then gather vs the kept patches only",
        _common.markdown_table(
            ["way", "ms per step (best of rounds)", "vs Conv2d over all"],
            [["Conv2d over all patches, then gather", f"{1e3 * c:.1f}", "1.00"],
             ["gather the kept patches, then Linear", f"{1e3 * s:.1f}", f"{s / c:.2f}"]]),
        [f"{a.img}/{a.patch} images, width {a.dim}, {a.views} views of {k} patches "
         f"(r = {a.mask_ratio}), batch {a.batch}, {a.dtype} on {device}; "
         f"{a.rounds} alternating rounds of 3 steps"])


if __name__ == "__main__":
    main()
