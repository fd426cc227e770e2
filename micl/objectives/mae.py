"""MAE baseline: reconstruct the pixels of the masked patches from the visible ones.

The encoder sees only the visible patches (int(L * (1 - r)), method.mask_ratio, MAE's 0.75); a
light decoder (method.decoder_dim / decoder_depth / decoder_heads, default MAE's 512 / 8 / 16)
with its own fixed sin-cos position embedding and a learnable mask token predicts every masked
patch; the loss is the MSE on the masked patches only, against pixels normalised per patch
(method.norm_pix_loss, MAE's best setting). The target is the image as the model sees it (after
data.mean / data.std), which per-patch normalisation makes irrelevant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from micl.config import Config
from micl.data.masking import VisibleMaskedMasks
from micl.data.stream import StreamSpec
from micl.models.decoder import reconstruction_loss
from micl.objectives.base import Objective, register
from micl.objectives.checks import DecoderArgs, check_decoder, check_ratio


@dataclass
class MAEArgs(DecoderArgs):
    mask_ratio: float = 0.75  # MAE's best (its Fig. 5)
    norm_pix_loss: bool = True  # per-patch normalised targets: MAE's best (its code: off)

    def check(self, cfg: Config) -> None:
        check_decoder(self)
        check_ratio(self, "mask_ratio", cfg)


@register("mae")
class MAE(Objective):
    Args = MAEArgs

    def __init__(self, cfg: Config, args: MAEArgs) -> None:
        super().__init__(cfg, args)
        m = cfg.model
        self.decoder = args.build_decoder(m, self.encoder.embed_dim, m.patch_size**2 * m.in_chans)

    @classmethod
    def stream_spec(cls, cfg: Config, args: MAEArgs) -> StreamSpec:
        return StreamSpec(masks=(VisibleMaskedMasks(cfg.model.num_patches, args.mask_ratio),))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        images, visible, masked = batch["image"], batch["visible"], batch["masked"]
        tokens = self.encoder.forward_features(images, visible)  # [B, 1 + n, D]
        pred = self.decoder(tokens, visible, masked)  # [B, L - n, p * p * C]
        loss = reconstruction_loss(pred, images, masked, self.cfg.model.patch_size,
                                   self.args.norm_pix_loss, kind="mse")
        return loss, {"loss_rec": loss.detach()}
