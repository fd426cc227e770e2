"""Fashion-MNIST held in memory for the plain-PyTorch benchmarks (recipe.py,
supervised_probe.py): the split as tensors and a batched RandomResizedCrop. Needs torch and the
IDX files only (no Ray, no MLflow), so supervised_probe.py also runs on a GPU machine that has
neither."""

from __future__ import annotations

import math

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
import torch.nn.functional as F

from micl.data.idx import read_fashion_mnist

MEAN, STD = 0.286, 0.353  # Fashion-MNIST, as in configs/fashion_mnist_quality.yaml


def load(split: str, directory: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1], [N, 1, 28, 28], and labels [N] (directory None: Debian's package)."""
    images, labels = read_fashion_mnist(directory, split)
    return (torch.from_numpy(images).unsqueeze(1).float().div(255),
            torch.from_numpy(labels.astype("int64")))


def random_resized_crops(x: torch.Tensor, scale_min: float, g: torch.Generator) -> torch.Tensor:
    """x: [B, C, H, W] in [0, 1] -> one random crop (area in [scale_min, 1], ratio in
    [3/4, 4/3]) per image, flipped with p = 0.5, resized back to H x W (bilinear) and
    normalised: [B, C, H, W]. The crop parameters come from g (a CPU generator)."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(scale_min, 1.0, generator=g)
    ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g).exp()
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)  # centre, in [-1, 1] image units
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return (F.grid_sample(x, grid, align_corners=False) - MEAN) / STD
