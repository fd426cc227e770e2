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
    python benchmarks/supervised_probe.py --init <a run's encoder/ directory> --device cuda \
        --threads 1 --layer-decay 0.9 --crop rrc --epochs 64 [--data <IDX directory>]
    # -> from the 32-epoch MAE encoder, on an H200 shared by eight such runs: 0.9316 at epoch
    #    55 (BENCHMARKS.md, "A fine-tuning recipe sweep on a GPU")

With an exported encoder (`encoder_timm.pth` + `timm_model.json`) the script imports neither Ray
nor MLflow, so it runs on a GPU machine that has only torch and timm.

The supervised counterpart of benchmarks/recipe.py: one setting (patch size, width, depth,
learning rate, epochs, or with --init a fine-tuning recipe: layer decay, crop, resolution)
tried in minutes, with the pipeline's classifier (`micl.models.create_classifier`: average
pooling + fc_norm, and `load_encoder_weights` for --init), AdamW over timm's layer-decay
parameter groups (no weight decay on biases, norms, pos_embed, cls token), warmup + cosine
schedule (`micl.schedule.lr_at`) and label smoothing 0.1; optionally drop path, timm's random
erasing and Mixup/CutMix. What differs from
`pipelines/finetune.py`, so compare settings with each other and not with pipeline runs: the
whole split sits in memory, and the augmentation is either a random 28-px crop of the image
padded by 2 px (--crop pad) or fmnist.py's batched bilinear RandomResizedCrop (--crop rrc),
each with a flip, instead of the stream's per-image bicubic RandomResizedCrop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
import torch.nn.functional as F
from fmnist import MEAN, STD, load, random_resized_crops
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.layers import resample_abs_pos_embed
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay

from micl.config import ModelConfig
from micl.models.classifier import create_classifier, load_encoder_weights
from micl.models.export import TIMM_JSON, TIMM_WEIGHTS, model_from_timm_json, timm_state_dict
from micl.schedule import lr_at


def load_normalised(split: str, directory: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images [N, 1, 28, 28] and labels [N] (fmnist.py's loader)."""
    x, y = load(split, directory)
    return (x - MEAN) / STD, y


def pretrained_encoder(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(architecture, timm-layout encoder state) from an exported encoder directory (a run's
    `encoder/` artifact: read here with torch alone) or a pre-training checkpoint directory
    (read by micl.artifacts, which needs Ray)."""
    directory = Path(path)
    if (directory / TIMM_WEIGHTS).is_file():
        meta = json.loads((directory / TIMM_JSON).read_text())
        return model_from_timm_json(meta), torch.load(directory / TIMM_WEIGHTS,
                                                      map_location="cpu", weights_only=True)
    from micl.artifacts import load_encoder  # Ray: only for a training checkpoint

    pretrained = load_encoder(checkpoint=directory)
    return pretrained.model, timm_state_dict(pretrained.encoder)


def build_net(args: argparse.Namespace) -> torch.nn.Module:
    """The pipeline's classifier, new or with a pre-trained encoder's weights (--init)."""
    if not args.init:
        model = ModelConfig(img_size=28 * args.upsample, patch_size=args.patch, in_chans=1,
                            embed_dim=args.width, depth=args.depth, num_heads=args.heads)
        return create_classifier(model, num_classes=10, drop_path=args.drop_path)
    model, state = pretrained_encoder(args.init)
    model = dataclasses.replace(model, img_size=28 * args.upsample)
    net = create_classifier(model, num_classes=10, drop_path=args.drop_path)
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
    dev = x.device
    top, left = torch.randint(0, 2 * pad + 1, (2, B), device=dev)
    rows = (top[:, None] + torch.arange(H, device=dev))[:, :, None]  # [B, H, 1]
    cols = (left[:, None] + torch.arange(W, device=dev))[:, None, :]  # [B, 1, W]
    out = padded[:, 0][torch.arange(B, device=dev)[:, None, None], rows, cols][:, None]
    flip = torch.rand(B, device=dev) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


@torch.no_grad()
def top1(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    hits = sum((net(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item()
               for i in range(0, len(x), 1000))
    net.train()
    return hits / len(x)


def parse_args() -> argparse.Namespace:
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
    p.add_argument("--init", default="", help="an exported encoder directory (a run's "
                   "encoder/ artifact) or a pre-training checkpoint directory (then "
                   "--patch/--width/--depth/--heads come from it)")
    p.add_argument("--layer-decay", type=float, default=1.0, help="timm's layer-wise lr decay")
    p.add_argument("--crop", choices=["pad", "rrc"], default="pad",
                   help="pad: 2-px pad, 28-px crop, flip; rrc: RandomResizedCrop + flip")
    p.add_argument("--upsample", type=int, default=1, help="train on images enlarged this many "
                   "times (more, smaller patches; with --init, pos_embed interpolated)")
    p.add_argument("--crop-scale-min", type=float, default=0.6, help="rrc's smallest area")
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.0, help="timm Mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="timm CutMix alpha (0: off)")
    p.add_argument("--reprob", type=float, default=0.0, help="timm random erasing probability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="directory of the IDX files (default: "
                   "Debian's dataset-fashion-mnist)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p.parse_args()


def make_criterion(args: argparse.Namespace, device: torch.device):
    """(net, images, labels) -> loss, after random erasing and Mixup/CutMix as asked (timm's)."""
    erase = RandomErasing(args.reprob, mode="pixel", device=device) if args.reprob else None
    mix = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, num_classes=10,
                label_smoothing=args.label_smoothing) if args.mixup or args.cutmix else None
    soft = SoftTargetCrossEntropy()

    def criterion(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if erase is not None:
            x = erase(x)
        if mix is not None:
            x, target = mix(x, y)
            return soft(net(x), target)
        return F.cross_entropy(net(x), y, label_smoothing=args.label_smoothing)

    return criterion


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (x, y), (x_test, y_test) = (load_normalised(s, args.data) for s in ("train", "test"))
    x, y, y_test = x.to(device), y.to(device), y_test.to(device)
    x_test = upsample(x_test.to(device), args)
    net, g = build_net(args).to(device), torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(param_groups_layer_decay(
        net, args.weight_decay, net.no_weight_decay(), layer_decay=args.layer_decay),
        lr=args.lr)
    criterion = make_criterion(args, device)
    steps = len(x) // args.batch  # the last partial batch is dropped (Mixup needs even ones)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), device=device)
        for s in range(steps):
            batch = order[s * args.batch:(s + 1) * args.batch]
            lr = lr_at(epoch + s / steps, args.lr, args.warmup_epochs, args.epochs, min_lr=1e-6)
            for group in opt.param_groups:
                group["lr"] = group["lr_scale"] * lr
            loss = criterion(net, augment(x[batch], args, g), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: train loss {loss.item():.3f}, test top-1 "
              f"{top1(net, x_test, y_test):.4f}, {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
