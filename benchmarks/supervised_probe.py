"""How far a ViT classifier gets on Fashion-MNIST in a plain PyTorch loop: no Ray, no MLflow.

Run (from the repository root; an epoch takes about 1.6 min at patch 4 / width 64 on an idle
2-core CPU with AVX-512, evaluation included, and about 1.4 min at patch 7 / width 128):

    .venv/bin/python benchmarks/supervised_probe.py --patch 4 --width 64 --epochs 10
    # -> test top-1 0.6419 after epoch 1 ... 0.8391 after epoch 10 (BENCHMARKS.md, issue 16)

The supervised counterpart of benchmarks/recipe.py: one setting (patch size, width, depth,
learning rate, epochs) tried from scratch in minutes, with the pipeline's classifier
(`micl.models.create_classifier`: average pooling + fc_norm), AdamW and warmup + cosine
schedule (`micl.train.lr_at`), label smoothing 0.1 and no layer decay. What differs from
`pipelines/finetune.py`, so compare settings with each other and not with pipeline runs: the
whole split sits in memory, and the augmentation is a random 28-px crop of the image padded by
2 px, plus a flip, instead of the stream's RandomResizedCrop.
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
import torch.nn.functional as F
from recipe import MEAN, STD, load

from micl.config import ModelConfig
from micl.models.classifier import create_classifier
from micl.train import lr_at


def load_normalised(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images [N, 1, 28, 28] and labels [N] (recipe.py's loader)."""
    x, y = load(split)
    return (x - MEAN) / STD, y


def pad_crop_flip(x: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """x: [B, 1, H, W] -> a random H x W window of x padded by `pad` (background value), each
    image flipped left-right with probability 1/2."""
    B, _, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=-MEAN / STD)  # -MEAN/STD: a black pixel
    top, left = torch.randint(0, 2 * pad + 1, (2, B))
    rows = (top[:, None] + torch.arange(H))[:, :, None]  # [B, H, 1]
    cols = (left[:, None] + torch.arange(W))[:, None, :]  # [B, 1, W]
    out = padded[:, 0][torch.arange(B)[:, None, None], rows, cols][:, None]  # [B, 1, H, W]
    flip = torch.rand(B) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


@torch.no_grad()
def top1(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    hits = sum((net(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item()
               for i in range(0, len(x), 1000))
    net.train()
    return hits / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr at --batch")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (x, y), (x_test, y_test) = load_normalised("train"), load_normalised("test")
    model = ModelConfig(img_size=28, patch_size=args.patch, in_chans=1, embed_dim=args.width,
                        depth=args.depth, num_heads=args.heads)
    net = create_classifier(model, num_classes=10)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = len(x) // args.batch
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x))
        for s in range(steps):
            batch = order[s * args.batch:(s + 1) * args.batch]
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch + s / steps, args.lr, args.warmup_epochs, args.epochs,
                                    min_lr=1e-6)
            loss = F.cross_entropy(net(pad_crop_flip(x[batch])), y[batch], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: train loss {loss.item():.3f}, test top-1 "
              f"{top1(net, x_test, y_test):.4f}, {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
