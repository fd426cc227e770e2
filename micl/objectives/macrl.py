"""MACRL: masked contrastive representation learning with two asymmetric branches.

Two views of each image come from the stream: `image` (weak: crop + flip) masked at
method.mask_ratio, and `image_strong` (its own crop + flip, then colour jitter, grayscale and
blur; micl.data.augment) masked at method.strong_mask_ratio (higher). Both go through the same
encoder (visible patches only). Then:

- contrastive: the pooled encoder feature of each branch, its cls output (MoCo v3), goes
  through a projector (MoCo v3: 3-layer MLP, method.proj_hidden_dim = 4096 hidden, BN + ReLU,
  last BN without affine, method.proj_dim = 256 out; its BatchNorm is synchronised across
  workers on GPU, per worker on CPU where SyncBatchNorm does not run); a symmetric InfoNCE
  at method.temperature pairs the two branches of an image against the other images of the
  batch (method.negatives: local / global, as MiCL). The paper's memory bank is replaced by
  in-batch negatives (MoCo v3), no momentum encoder;
- reconstruction: an MAE-style decoder per branch predicts the branch's own masked patches
  (each branch reconstructs the view it saw; the two crops differ, so there is no common
  target); L1 on per-patch normalised pixels (method.norm_pix_loss), averaged over the two
  branches. method.share_decoder (default true) uses one decoder for both branches (same task,
  half the parameters); false gives each branch its own.

loss = method.lambda_c * contrastive + method.lambda_r * reconstruction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from micl.config import Config
from micl.models.decoder import MaskedDecoder, reconstruction_loss
from micl.objectives import checks
from micl.objectives.base import Objective, register
from micl.objectives.mae import mae_masks
from micl.objectives.micl import gather_with_grad


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, negatives: str = "local",
             symmetric: bool = True) -> torch.Tensor:
    """InfoNCE over cosine similarities: row i of q [B, D] is the positive of row i of k
    [B, D], the other rows are negatives (of this worker's batch, or of the global batch with
    negatives="global"). symmetric averages the q->k and k->q directions."""
    q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
    if negatives == "global":
        k_all, offset = gather_with_grad(k)
        q_all = gather_with_grad(q)[0] if symmetric else q
    else:
        k_all, q_all, offset = k, q, 0
    labels = torch.arange(q.shape[0], device=q.device) + offset
    loss = F.cross_entropy(q @ k_all.T / temperature, labels)  # [B, W*B] logits
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(k @ q_all.T / temperature, labels))
    return loss


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v3's projection MLP: (Linear, BN, ReLU) x 2, Linear, BN without affine."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(True),
        nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(True),
        nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False))


@register("macrl")
class MACRL(Objective):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m, me = cfg.model, cfg.method
        grid, dim = m.img_size // m.patch_size, self.encoder.embed_dim

        def decoder() -> MaskedDecoder:
            return MaskedDecoder(grid, dim, me.decoder_dim, me.decoder_depth, me.decoder_heads,
                                 m.patch_size**2 * m.in_chans, m.mlp_ratio)

        self.decoders = nn.ModuleList([decoder()] if me.share_decoder else [decoder(), decoder()])
        proj = projector(dim, me.proj_hidden_dim, me.proj_dim)
        if cfg.run.use_gpu and torch.distributed.is_available() \
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            proj = nn.SyncBatchNorm.convert_sync_batchnorm(proj)  # MoCo v3; CUDA only
        self.projector = proj

    @classmethod
    def image_views(cls, cfg: Config) -> dict[str, str]:
        return {"image": "weak", "image_strong": "strong"}

    @classmethod
    def validate(cls, cfg: Config) -> None:
        me = cfg.method
        checks.decoder(cfg)
        checks.ratio(cfg, "mask_ratio")
        checks.ratio(cfg, "strong_mask_ratio")
        if me.strong_mask_ratio < me.mask_ratio:
            raise checks.method_error(
                "strong_mask_ratio", me.strong_mask_ratio, f"must be >= method.mask_ratio = "
                f"{me.mask_ratio} (the strong branch is the more heavily masked one)")
        checks.positive(cfg, "proj_dim", integer=True)
        checks.positive(cfg, "proj_hidden_dim", integer=True)
        checks.weights(cfg, "lambda_c", "lambda_r")

    @staticmethod
    def draw_masks(cfg: Config, batch_size: int, rng: np.random.Generator
                   ) -> dict[str, np.ndarray]:
        visible, masked = mae_masks(cfg, batch_size, rng, cfg.method.mask_ratio)
        s_visible, s_masked = mae_masks(cfg, batch_size, rng, cfg.method.strong_mask_ratio)
        return {"visible": visible, "masked": masked,
                "strong_visible": s_visible, "strong_masked": s_masked}

    def _branch(self, images: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor,
                decoder: MaskedDecoder) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls output [B, D], reconstruction loss) of one branch."""
        tokens = self.encoder.forward_features(images, visible)  # [B, 1 + n, D]
        pred = decoder(tokens, visible, masked)  # [B, L - n, p * p * C]
        rec = reconstruction_loss(pred, images, masked, self.cfg.model.patch_size,
                                  self.cfg.method.norm_pix_loss, kind="l1")
        return tokens[:, 0], rec

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        me = self.cfg.method
        cls_w, rec_w = self._branch(batch["image"], batch["visible"], batch["masked"],
                                    self.decoders[0])
        cls_s, rec_s = self._branch(batch["image_strong"], batch["strong_visible"],
                                    batch["strong_masked"], self.decoders[-1])
        # One projector call per branch: each BN normalises over one view (MoCo v3).
        z_w, z_s = self.projector(cls_w), self.projector(cls_s)  # [B, proj_dim] each
        contrastive = info_nce(z_w, z_s, me.temperature, me.negatives)
        reconstruction = 0.5 * (rec_w + rec_s)
        loss = me.lambda_c * contrastive + me.lambda_r * reconstruction
        return loss, {"loss_contrastive": contrastive.detach(),
                      "loss_rec": reconstruction.detach()}
