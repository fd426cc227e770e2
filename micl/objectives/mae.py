"""MAE baseline: reconstruct the pixels of the masked patches from the visible ones.

The encoder sees only the visible patches (int(L * (1 - r)), method.mask_ratio; MAE uses
r = 0.75); a light decoder (method.decoder_dim / decoder_depth / decoder_heads, default MAE's
512 / 8 / 16) with its own fixed sin-cos position embedding and a learnable mask token
predicts every masked patch; the loss is the MSE on the masked patches only, against pixels
normalised per patch (method.norm_pix_loss, MAE's best setting). The target is the image as the
model sees it (after data.mean / data.std), which per-patch normalisation makes irrelevant.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from micl.config import Config
from micl.data.masking import sample_mae_mask
from micl.models.decoder import MaskedDecoder, reconstruction_loss
from micl.objectives import checks
from micl.objectives.base import Objective, register


def mae_masks(cfg: Config, batch_size: int, rng: np.random.Generator, mask_ratio: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """visible [B, n] and masked [B, L - n] patch indices (n = max(1, int(L * (1 - r))))."""
    return sample_mae_mask(batch_size, cfg.model.num_patches, mask_ratio, rng)


@register("mae")
class MAE(Objective):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m, me = cfg.model, cfg.method
        grid = m.img_size // m.patch_size
        self.decoder = MaskedDecoder(grid, self.encoder.embed_dim, me.decoder_dim,
                                     me.decoder_depth, me.decoder_heads,
                                     m.patch_size**2 * m.in_chans, m.mlp_ratio)

    @classmethod
    def validate(cls, cfg: Config) -> None:
        checks.decoder(cfg)
        checks.ratio(cfg, "mask_ratio")

    @staticmethod
    def draw_masks(cfg: Config, batch_size: int, rng: np.random.Generator
                   ) -> dict[str, np.ndarray]:
        visible, masked = mae_masks(cfg, batch_size, rng, cfg.method.mask_ratio)
        return {"visible": visible, "masked": masked}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        images, visible, masked = batch["image"], batch["visible"], batch["masked"]
        tokens = self.encoder.forward_features(images, visible)  # [B, 1 + n, D]
        pred = self.decoder(tokens, visible, masked)  # [B, L - n, p * p * C]
        loss = reconstruction_loss(pred, images, masked, self.cfg.model.patch_size,
                                   self.cfg.method.norm_pix_loss, kind="mse")
        return loss, {"loss_rec": loss.detach()}
