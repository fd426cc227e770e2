"""Fast recipe exploration for small images: MiCL in a plain PyTorch loop, no Ray, no MLflow.

Run (from the repository root; about 1.3 min per epoch at patch 7, 2.5 min at patch 4 on an
idle 2-core CPU, plus ~20 s of evaluation):

    .venv/bin/python benchmarks/recipe.py --epochs 1 --patch 7 --mask-ratio 0.25 --temperature 0.025
    # -> kNN top-1 (60k bank / 10k queries) cls 0.7921 (README "A real search", BENCHMARKS.md)

Why it exists: a pipeline run pays Ray start-up and streaming for every setting, and a Tune
trial needs a full config; this loop tries one idea (patch size, width, crop scale, one crop
vs two) in a minute or two with the same encoder (`MaskedViT`), the same loss (`micl_loss`)
and the same kNN (`knn_top1`) as the pipeline. What differs, so that settings are compared
with each other and not with pipeline runs: the whole split sits in memory, and the crop is a
batched bilinear `affine_grid` (scale and ratio drawn as in RandomResizedCrop, plus a flip)
instead of the stream's per-image bicubic crop. The optimizer step is the pipeline's own
(`micl.train.train_step`, on a small module that returns the MiCL loss of a batch). Settings
that win here go to a Tune search (`tune_spaces/`) and to `benchmarks/quality.py`, which use
the real pipeline.

Prints the kNN top-1 of the cls token, of mean-pooled patch tokens and of both concatenated.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
import torch.nn.functional as F
from fmnist import MEAN, STD, load, random_resized_crops

from micl.data.masking import patches_per_view
from micl.evaluate import knn_top1
from micl.models import MaskedViT
from micl.models.vit import gather_tokens
from micl.objectives.losses import micl_loss
from micl.schedule import lr_at
from micl.train import param_groups, train_step


class RecipeMiCL(torch.nn.Module):
    """`batch -> (MiCL loss, {})` for train_step: `image` is the (normalised) crop both views
    come from, or with `image2` the crop of the second view; `view1`, `view2` are the two
    disjoint sets of visible patch indices [B, k]."""

    def __init__(self, encoder: MaskedViT, kappa: float, temperature: float) -> None:
        super().__init__()
        self.encoder, self.kappa, self.temperature = encoder, kappa, temperature

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        enc, v1, v2 = self.encoder, batch["view1"], batch["view2"]
        if "image2" in batch:  # two crops: embed each, keep its view's patches, encode together
            t1, t2 = enc.embed_patches(batch["image"]), enc.embed_patches(batch["image2"])
            z1, z2 = enc.forward_tokens(torch.cat([gather_tokens(t1, v1),
                                                   gather_tokens(t2, v2)]))[:, 0].chunk(2)
        else:
            z1, z2 = enc.forward_views(batch["image"], [v1, v2])
        return micl_loss(z1, z2, self.kappa, self.temperature), {}


@torch.no_grad()
def knn_cls_mean_both(encoder: MaskedViT, train: tuple, test: tuple) -> tuple[float, ...]:
    """kNN top-1 of the cls token, the mean patch token and both, on whole images."""
    encoder.eval()

    def features(x: torch.Tensor) -> list[torch.Tensor]:
        tokens = torch.cat([encoder.forward_features((x[i : i + 1000] - MEAN) / STD)
                            for i in range(0, len(x), 1000)])  # [N, 1 + L, D]
        cls, mean = F.normalize(tokens[:, 0], dim=-1), F.normalize(tokens[:, 1:].mean(1), dim=-1)
        return [cls, mean, torch.cat([cls, mean], 1) / math.sqrt(2)]

    bank, query = features(train[0]), features(test[0])
    encoder.train()
    return tuple(knn_top1(b, train[1], q, test[1]) for b, q in zip(bank, query, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW lr (not scaled by batch)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.3)
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--kappa", type=float, default=1 / 64)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--crop-scale-min", type=float, default=0.2)
    p.add_argument("--two-crops", action="store_true", help="a separate crop for each view")
    p.add_argument("--eval-every", type=float, default=0, help="epochs between kNN (0: end)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    train, test = load("train"), load("test")
    encoder = MaskedViT(28, a.patch, 1, a.embed_dim, a.depth, a.heads)
    k = patches_per_view(encoder.num_patches, a.mask_ratio)
    model = RecipeMiCL(encoder, a.kappa, a.temperature)
    opt = torch.optim.AdamW(param_groups(model, a.weight_decay), lr=a.lr, betas=(0.9, 0.95))
    steps_per_epoch = len(train[0]) // a.batch_size
    total = int(a.epochs * steps_per_epoch)
    eval_steps = int(a.eval_every * steps_per_epoch)
    print(f"[recipe] {encoder.num_patches} patches, {k} per view, {total} steps", flush=True)

    g = torch.Generator().manual_seed(0)
    step, eval_seconds, start = 0, 0.0, time.perf_counter()
    while step < total:
        order = torch.randperm(len(train[0]), generator=g)
        for i in range(min(steps_per_epoch, total - step)):
            for group in opt.param_groups:
                group["lr"] = lr_at(step / steps_per_epoch, a.lr, a.warmup_epochs, a.epochs)
            x = train[0][order[i * a.batch_size : (i + 1) * a.batch_size]]
            perm = torch.rand(len(x), encoder.num_patches, generator=g).argsort(1)  # [B, L]
            batch = {"image": random_resized_crops(x, a.crop_scale_min, g),
                     "view1": perm[:, :k], "view2": perm[:, k : 2 * k]}  # disjoint visible sets
            if a.two_crops:
                batch["image2"] = random_resized_crops(x, a.crop_scale_min, g)
            result = train_step(model, opt, [batch])
            if not result.finite:
                raise SystemExit(f"[recipe] non-finite loss or gradient at step {step + 1}: "
                                 "lower --lr")
            step += 1
            if step % 50 == 0:
                rate = step * a.batch_size / (time.perf_counter() - start - eval_seconds)
                print(f"[recipe] step {step} loss {result.loss.item():.3f} {rate:.0f} img/s",
                      flush=True)
            if eval_steps and step % eval_steps == 0 and step < total:
                t = time.perf_counter()
                knn = knn_cls_mean_both(encoder, train, test)
                eval_seconds += time.perf_counter() - t
                print(f"[recipe] epoch {step / steps_per_epoch:.2f} kNN cls {knn[0]:.4f} "
                      f"mean {knn[1]:.4f} both {knn[2]:.4f}", flush=True)
    minutes = (time.perf_counter() - start - eval_seconds) / 60
    knn = knn_cls_mean_both(encoder, train, test)
    print(f"[recipe] {vars(a)}\n[recipe] trained {minutes:.1f} min; kNN top-1 (60k bank / 10k "
          f"queries) cls {knn[0]:.4f} mean {knn[1]:.4f} both {knn[2]:.4f}", flush=True)


if __name__ == "__main__":
    main()
