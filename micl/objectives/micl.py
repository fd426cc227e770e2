"""MiCL: masked image contrastive learning with a t-vMF similarity.

Two disjoint random subsets of the visible patches of one image are two views; the shared ViT
encodes each (cls output after the final norm, no projector, no EMA teacher), and a symmetric
cross-entropy over the batch's t-vMF similarity matrix pulls the two views of an image together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from micl.config import Config
from micl.data.masking import ViewPairMasks, patches_per_view
from micl.data.stream import StreamSpec
from micl.objectives.base import MethodArgs, Objective, method_error, register
from micl.objectives.checks import check_contrastive
from micl.objectives.losses import micl_loss


@dataclass
class MiCLArgs(MethodArgs):
    mask_ratio: float = 0.9  # the paper's ImageNet setting: 2 views of 9 patches at 224/16
    temperature: float = 0.07
    kappa: float = 1 / 64  # t-vMF concentration; 0 gives plain cosine logits at 2 T
    negatives: str = "local"  # "local": this worker's batch (the reference); "global": all

    def check(self, cfg: Config) -> None:
        r = self.mask_ratio
        if not isinstance(r, int | float) or isinstance(r, bool) or not 0 < r < 1:
            raise method_error("mask_ratio", r, "must be in (0, 1)")
        k = patches_per_view(cfg.model.num_patches, r)
        if k < 1:
            raise method_error("mask_ratio", r, f"leaves {k} patches per view of the "
                               f"{cfg.model.num_patches} patches (need at least 1)")
        check_contrastive(self)
        if not isinstance(self.kappa, int | float) or self.kappa < 0:
            raise method_error("kappa", self.kappa, "must be >= 0")


@register("micl")
class MiCL(Objective):
    Args = MiCLArgs

    @classmethod
    def stream_spec(cls, cfg: Config, args: MiCLArgs) -> StreamSpec:
        return StreamSpec(masks=(ViewPairMasks(cfg.model.num_patches, args.mask_ratio),))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        a = self.args
        z1, z2 = self.encoder.forward_views(batch["image"], [batch["view1"], batch["view2"]])
        return micl_loss(z1, z2, a.kappa, a.temperature, a.negatives), {}
