"""MACRL: masked contrastive representation learning with two asymmetric branches.

Two views of each image come from the stream: `image` (weak: crop + flip) masked at
method.mask_ratio, and `image_strong` (its own crop + flip, then colour jitter, grayscale and
blur; micl.data.augment) masked at method.strong_mask_ratio (strictly higher: the asymmetry that
defines the method; defaults 0.75 and 0.9). Both go through the same
encoder (visible patches only). Then:

- contrastive: the pooled encoder feature of each branch, its cls output (MoCo v3), goes
  through a projector (MoCo v3: 3-layer MLP, method.proj_hidden_dim = 4096 hidden, BN + ReLU,
  last BN without affine, method.proj_dim = 256 out; its BatchNorm is synchronised across
  workers on GPU, per worker on CPU where SyncBatchNorm does not run); a symmetric InfoNCE
  at method.temperature (MoCo v3's 0.2) pairs the two branches of an image against the other
  images of the batch (method.negatives: local / global, as MiCL). The paper's memory bank
  is replaced by in-batch negatives (MoCo v3), no momentum encoder;
- reconstruction: an MAE-style decoder per branch predicts the branch's own masked patches
  (each branch reconstructs the view it saw; the two crops differ, so there is no common
  target); L1 on per-patch normalised pixels (method.norm_pix_loss), averaged over the two
  branches. method.share_decoder (default true) uses one decoder for both branches (same task,
  half the parameters); false gives each branch its own.

loss = method.lambda_c * contrastive + method.lambda_r * reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from micl.config import Config
from micl.data.masking import VisibleMaskedMasks
from micl.data.stream import StreamSpec
from micl.models.decoder import MaskedDecoder, reconstruction_loss
from micl.objectives.base import Objective, method_error, register
from micl.objectives.checks import (
    DecoderArgs,
    check_contrastive,
    check_decoder,
    check_positive,
    check_ratio,
    check_weights,
)
from micl.objectives.losses import info_nce


@dataclass
class MACRLArgs(DecoderArgs):
    mask_ratio: float = 0.75  # the weak branch: MAE's ratio
    strong_mask_ratio: float = 0.9  # the strong branch: more heavily masked
    temperature: float = 0.2  # MoCo v3
    negatives: str = "local"
    norm_pix_loss: bool = True
    lambda_c: float = 1.0  # contrastive loss weight
    lambda_r: float = 1.0  # reconstruction loss weight
    proj_dim: int = 256  # MoCo v3's projector: 3-layer MLP, 4096 hidden, 256 out
    proj_hidden_dim: int = 4096
    share_decoder: bool = True  # one decoder for both branches (False: one each)

    def check(self, cfg: Config) -> None:
        check_decoder(self)
        check_ratio(self, "mask_ratio", cfg)
        check_ratio(self, "strong_mask_ratio", cfg)
        if self.strong_mask_ratio <= self.mask_ratio:
            raise method_error(
                "strong_mask_ratio", self.strong_mask_ratio, f"must be > method.mask_ratio = "
                f"{self.mask_ratio} (the strong branch is the more heavily masked one)")
        check_contrastive(self)
        check_positive(self, "proj_dim", integer=True)
        check_positive(self, "proj_hidden_dim", integer=True)
        check_weights(self, "lambda_c", "lambda_r")


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v3's projection MLP: (Linear, BN, ReLU) x 2, Linear, BN without affine."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(True),
        nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(True),
        nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False))


@register("macrl")
class MACRL(Objective):
    Args = MACRLArgs

    def __init__(self, cfg: Config, args: MACRLArgs) -> None:
        super().__init__(cfg, args)
        m, dim = cfg.model, self.encoder.embed_dim
        out = m.patch_size**2 * m.in_chans
        self.decoders = nn.ModuleList(
            args.build_decoder(m, dim, out) for _ in range(1 if args.share_decoder else 2))
        proj = projector(dim, args.proj_hidden_dim, args.proj_dim)
        if cfg.run.use_gpu and torch.distributed.is_available() \
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            proj = nn.SyncBatchNorm.convert_sync_batchnorm(proj)  # MoCo v3; CUDA only
        self.projector = proj

    @classmethod
    def stream_spec(cls, cfg: Config, args: MACRLArgs) -> StreamSpec:
        L = cfg.model.num_patches
        return StreamSpec(views={"image": "weak", "image_strong": "strong"},
                          masks=(VisibleMaskedMasks(L, args.mask_ratio),
                                 VisibleMaskedMasks(L, args.strong_mask_ratio, "strong_")))

    def _branch(self, images: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor,
                decoder: MaskedDecoder) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls output [B, D], reconstruction loss) of one branch."""
        tokens = self.encoder.forward_features(images, visible)  # [B, 1 + n, D]
        pred = decoder(tokens, visible, masked)  # [B, L - n, p * p * C]
        rec = reconstruction_loss(pred, images, masked, self.cfg.model.patch_size,
                                  self.args.norm_pix_loss, kind="l1")
        return tokens[:, 0], rec

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        a = self.args
        cls_w, rec_w = self._branch(batch["image"], batch["visible"], batch["masked"],
                                    self.decoders[0])
        cls_s, rec_s = self._branch(batch["image_strong"], batch["strong_visible"],
                                    batch["strong_masked"], self.decoders[-1])
        # One projector call per branch: each BN normalises over one view (MoCo v3).
        z_w, z_s = self.projector(cls_w), self.projector(cls_s)  # [B, proj_dim] each
        contrastive = info_nce(z_w, z_s, a.temperature, a.negatives)
        reconstruction = 0.5 * (rec_w + rec_s)
        loss = a.lambda_c * contrastive + a.lambda_r * reconstruction
        return loss, {"loss_contrastive": contrastive.detach(),
                      "loss_rec": reconstruction.detach()}
