"""MiCL: masked image contrastive learning with a t-vMF similarity.

Two disjoint random subsets of the visible patches of one image are two views; the shared ViT
encodes each (cls output after the final norm, no projector, no EMA teacher), and a symmetric
cross-entropy over the batch's t-vMF similarity matrix pulls the two views of an image together.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from micl.config import Config, ConfigError
from micl.data.masking import patches_per_view, sample_view_indices
from micl.objectives.base import Objective, register


def tvmf_similarity(cos: torch.Tensor, kappa: float, temperature: float) -> torch.Tensor:
    """t-vMF logits: 0.5 * (1 + c) / (1 + kappa * (1 - c)) / tau. kappa -> 0 gives
    (1 + c) / (2 tau), i.e. cosine logits at temperature 2 tau plus a constant."""
    return 0.5 * (1 + cos) / (1 + kappa * (1 - cos)) / temperature


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the summed gradient of its own slice, so
    the loss computed against gathered embeddings trains the owners of those embeddings too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # x: [B, D] -> [W*B, D]
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss contributes to every slice
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, D] -> ([W*B, D], offset of this rank's rows); identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def micl_loss(z1: torch.Tensor, z2: torch.Tensor, kappa: float, temperature: float,
              negatives: str = "local") -> torch.Tensor:
    """Symmetric cross-entropy over t-vMF similarities of the two views' embeddings.

    z1, z2: [B, D] (any scale; L2-normalised here). `negatives="local"` contrasts within this
    process's batch (the reference code); "global" against the whole global batch. In the global
    case the mean of the per-rank losses equals the single-process loss on the global batch, and
    with DDP's gradient averaging so do the gradients (checked in tests/test_objective_micl.py).
    """
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    if negatives == "global":
        z1_all, offset = gather_with_grad(z1)
        z2_all, _ = gather_with_grad(z2)
    else:
        z1_all, z2_all, offset = z1, z2, 0
    labels = torch.arange(z1.shape[0], device=z1.device) + offset
    s12 = tvmf_similarity(z1 @ z2_all.T, kappa, temperature)  # [B, W*B]: view 1 vs all view 2
    s21 = tvmf_similarity(z2 @ z1_all.T, kappa, temperature)  # [B, W*B]: view 2 vs all view 1
    return 0.5 * (F.cross_entropy(s12, labels) + F.cross_entropy(s21, labels))


@register("micl")
class MiCL(Objective):
    @classmethod
    def validate(cls, cfg: Config) -> None:
        k = patches_per_view(cfg.model.num_patches, cfg.method.mask_ratio)
        if k < 1:
            raise ConfigError(
                f"config error: method.mask_ratio = {cfg.method.mask_ratio!r}: leaves {k} patches "
                f"per view of the {cfg.model.num_patches} patches (need at least 1)")

    @staticmethod
    def draw_masks(cfg: Config, batch_size: int, rng: np.random.Generator
                   ) -> dict[str, np.ndarray]:
        v1, v2 = sample_view_indices(batch_size, cfg.model.num_patches, cfg.method.mask_ratio, rng)
        return {"view1": v1, "view2": v2}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        m = self.cfg.method
        z1, z2 = self.encoder.forward_views(batch["image"], [batch["view1"], batch["view2"]])
        return micl_loss(z1, z2, m.kappa, m.temperature, m.negatives), {}
