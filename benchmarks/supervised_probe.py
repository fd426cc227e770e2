"""How far a ViT classifier gets on Fashion-MNIST in a plain PyTorch loop: no Ray, no MLflow.

Run (from the repository root; an epoch takes about 1.6 min at patch 4 / width 64 on an idle
2-core CPU with AVX-512, evaluation included, and about 1.3 min at patch 7 / width 128):

    .venv/bin/python benchmarks/supervised_probe.py --patch 4 --width 64 --epochs 10
    # -> test top-1 0.6419 after epoch 1 ... 0.8391 after epoch 10 (BENCHMARKS.md, issue 16;
    #    measured before biases and norms were left out of the weight decay)
    .venv/bin/python benchmarks/supervised_probe.py --init <pre-training checkpoint dir> \
        --epochs 4 --crop pad --layer-decay 0.9
    # -> from the 16-epoch MAE encoder: 0.8846 after epoch 4 (BENCHMARKS.md, "Fine-tuning
    #    recipe probes")

The supervised counterpart of benchmarks/recipe.py: one setting (patch size, width, depth,
learning rate, epochs, or with --init a fine-tuning recipe: layer decay, crop, resolution)
tried in minutes, with the pipeline's classifier (`micl.models.create_classifier`: average
pooling + fc_norm, and `load_encoder_weights` for --init), AdamW over timm's layer-decay
parameter groups (no weight decay on biases, norms, pos_embed, cls token), warmup + cosine
schedule (`micl.train.lr_at`) and label smoothing 0.1. What differs from
`pipelines/finetune.py`, so compare settings with each other and not with pipeline runs: the
whole split sits in memory, and the augmentation is either a random 28-px crop of the image
padded by 2 px (--crop pad) or recipe.py's batched bilinear RandomResizedCrop (--crop rrc),
each with a flip, instead of the stream's per-image bicubic RandomResizedCrop.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
import torch.nn.functional as F
from recipe import MEAN, STD, load, random_resized_crops
from timm.layers import resample_abs_pos_embed
from timm.optim import param_groups_layer_decay

from micl.artifacts import load_encoder
from micl.config import ModelConfig
from micl.models.classifier import create_classifier, load_encoder_weights
from micl.models.export import timm_state_dict
from micl.train import lr_at


def load_normalised(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images [N, 1, 28, 28] and labels [N] (recipe.py's loader)."""
    x, y = load(split)
    return (x - MEAN) / STD, y


def build_net(args: argparse.Namespace) -> torch.nn.Module:
    """The pipeline's classifier, new or with a pre-trained encoder's weights (--init)."""
    if not args.init:
        model = ModelConfig(img_size=28 * args.upsample, patch_size=args.patch, in_chans=1,
                            embed_dim=args.width, depth=args.depth, num_heads=args.heads)
        return create_classifier(model, num_classes=10)
    pretrained = load_encoder(checkpoint=args.init)
    model = dataclasses.replace(pretrained.model, img_size=28 * args.upsample)
    net = create_classifier(model, num_classes=10)
    state = timm_state_dict(pretrained.encoder)
    grid = model.img_size // model.patch_size
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [grid, grid],
                                                num_prefix_tokens=1)
    load_encoder_weights(net, state)
    return net


def augment(x: torch.Tensor, args: argparse.Namespace, g: torch.Generator) -> torch.Tensor:
    """x: [B, 1, 28, 28] normalised -> the training view of --crop."""
    if args.crop == "pad":
        x = pad_crop_flip(x)
    else:
        x = random_resized_crops(x * STD + MEAN, args.crop_scale_min, g)  # takes [0, 1] pixels
    return upsample(x, args)


def upsample(x: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """x: [B, 1, 28, 28] -> [B, 1, 28u, 28u] (bicubic), the input of an --upsample u model."""
    if args.upsample == 1:
        return x
    return F.interpolate(x, scale_factor=args.upsample, mode="bicubic", align_corners=False)


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
    p.add_argument("--init", default="", help="a pre-training checkpoint or exported encoder "
                   "directory (then --patch/--width/--depth/--heads come from it)")
    p.add_argument("--layer-decay", type=float, default=1.0, help="timm's layer-wise lr decay")
    p.add_argument("--crop", choices=["pad", "rrc"], default="pad",
                   help="pad: 2-px pad, 28-px crop, flip; rrc: RandomResizedCrop + flip")
    p.add_argument("--upsample", type=int, default=1, help="train on images enlarged this many "
                   "times (more, smaller patches; with --init, pos_embed interpolated)")
    p.add_argument("--crop-scale-min", type=float, default=0.6, help="rrc's smallest area")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (x, y), (x_test, y_test) = load_normalised("train"), load_normalised("test")
    x_test = upsample(x_test, args)
    net, g = build_net(args), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(param_groups_layer_decay(
        net, args.weight_decay, net.no_weight_decay(), layer_decay=args.layer_decay),
        lr=args.lr)
    steps = len(x) // args.batch
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x))
        for s in range(steps):
            batch = order[s * args.batch:(s + 1) * args.batch]
            lr = lr_at(epoch + s / steps, args.lr, args.warmup_epochs, args.epochs, min_lr=1e-6)
            for group in opt.param_groups:
                group["lr"] = group["lr_scale"] * lr
            loss = F.cross_entropy(net(augment(x[batch], args, g)), y[batch],
                                   label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: train loss {loss.item():.3f}, test top-1 "
              f"{top1(net, x_test, y_test):.4f}, {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
