"""MimCo stage 2: masked image modelling against a frozen contrastive teacher.

Stage 1 is any encoder of this pipeline, naturally a MiCL run: method.teacher_run_id (an
MLflow run id, looked up in this run's tracking store: its exported encoder + params) or
method.teacher_checkpoint (a Ray Train checkpoint dir / state.pt, or an encoder_timm.pth with
its timm_model.json). The teacher's architecture comes from that source, so it may differ from
the student's in width and depth; it must have the same patch grid (positions must match) and
channels, and it sees the student's normalised image, resized if its img_size differs.

The student encodes the visible patches (MAE masks, method.mask_ratio). Two losses:

- patch level: a light predictor (an MAE-style decoder, method.decoder_*, with mask tokens,
  output width = the teacher's) predicts each masked patch; InfoNCE at method.temperature
  between the prediction and the teacher's patch token at the same position of the FULL image,
  with the teacher tokens of the other masked patches as negatives: of the whole worker batch
  (method.patch_negatives = "batch", (B*m)^2 logits) or of the same image ("image", B*m^2:
  for large batches and images);
- image level: the student's cls output (through a Linear to the teacher's width when the
  widths differ) vs the teacher's cls output of the full image, the other images' teacher
  features as negatives (method.negatives: local / global).

Both are one-directional (student queries, teacher keys: the teacher has nothing to learn);
loss = method.patch_loss_weight * patch + method.image_loss_weight * image. Teacher outputs
are the tokens after its final LayerNorm.

The teacher is frozen: eval mode always, requires_grad False (so never in the optimizer, and
DDP ignores it), run under no_grad, and left out of state_dict(): checkpoints hold the student
only; a resumed run reloads the teacher from its source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from micl.config import Config
from micl.models.decoder import MaskedDecoder
from micl.models.pretrained import PretrainedEncoder, load_encoder
from micl.models.vit import gather_tokens
from micl.objectives import checks
from micl.objectives.base import Objective, register
from micl.objectives.macrl import info_nce
from micl.objectives.mae import mae_masks

PATCH_NEGATIVES = ("batch", "image")
TEACHER = "teacher."


def patch_info_nce(pred: torch.Tensor, target: torch.Tensor, temperature: float,
                   negatives: str = "batch") -> torch.Tensor:
    """pred, target: [B, m, D]; pred[b, i] is the positive of target[b, i]. Negatives: every
    other target token of the batch ("batch") or of the same image ("image")."""
    p, t = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    b, m, _ = p.shape
    if negatives == "image":
        logits = p @ t.transpose(1, 2) / temperature  # [B, m, m]
        labels = torch.arange(m, device=p.device).repeat(b)
        return F.cross_entropy(logits.reshape(b * m, m), labels)
    p, t = p.reshape(b * m, -1), t.reshape(b * m, -1)
    labels = torch.arange(b * m, device=p.device)
    return F.cross_entropy(p @ t.T / temperature, labels)  # [B*m, B*m]


def load_teacher(cfg: Config) -> PretrainedEncoder:
    from micl.tracking import tracking_uri

    me = cfg.method
    if me.teacher_run_id:
        return load_encoder(run_id=me.teacher_run_id, tracking_uri=tracking_uri(cfg))
    return load_encoder(checkpoint=me.teacher_checkpoint)


def _drop_teacher_from_state(module: nn.Module, state: dict, prefix: str, _meta: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + TEACHER)]:
        del state[key]


def _teacher_not_missing(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys  # DDP: "module."
                                    if not (k.startswith(TEACHER) or f".{TEACHER}" in k)]


@register("mimco")
class MimCo(Objective):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m, me = cfg.model, cfg.method
        loaded = load_teacher(cfg)
        t = loaded.model
        source = ("teacher_run_id", me.teacher_run_id) if me.teacher_run_id else \
            ("teacher_checkpoint", me.teacher_checkpoint)
        grid = m.img_size // m.patch_size
        if t.img_size // t.patch_size != grid or t.in_chans != m.in_chans:
            raise checks.method_error(
                *source, f"the teacher has a {t.img_size // t.patch_size}^2 patch grid and "
                f"{t.in_chans} channels, the student {grid}^2 and {m.in_chans}: they must match")
        self.teacher_img_size = t.img_size
        self.teacher = loaded.encoder.requires_grad_(False).eval()
        t_dim, s_dim = self.teacher.embed_dim, self.encoder.embed_dim
        self.predictor = MaskedDecoder(grid, s_dim, me.decoder_dim, me.decoder_depth,
                                       me.decoder_heads, t_dim, m.mlp_ratio)
        self.image_proj = nn.Linear(s_dim, t_dim) if s_dim != t_dim else nn.Identity()
        self.register_state_dict_post_hook(_drop_teacher_from_state)
        self.register_load_state_dict_post_hook(_teacher_not_missing)

    @classmethod
    def validate(cls, cfg: Config) -> None:
        me = cfg.method
        checks.decoder(cfg)
        checks.ratio(cfg, "mask_ratio")
        if bool(me.teacher_run_id) == bool(me.teacher_checkpoint):
            raise checks.method_error(
                "teacher_run_id", me.teacher_run_id, "set exactly one of method.teacher_run_id "
                "(an MLflow run id) and method.teacher_checkpoint (a checkpoint path)")
        if me.teacher_run_id and not isinstance(me.teacher_run_id, str):
            raise checks.method_error("teacher_run_id", me.teacher_run_id,
                                      "must be a string (quote it)")
        ckpt = me.teacher_checkpoint
        if ckpt and not Path(str(ckpt)).exists():
            raise checks.method_error("teacher_checkpoint", ckpt, "no such file or directory")
        if me.patch_negatives not in PATCH_NEGATIVES:
            raise checks.method_error("patch_negatives", me.patch_negatives,
                                      f"choose one of {list(PATCH_NEGATIVES)}")
        checks.weights(cfg, "patch_loss_weight", "image_loss_weight")

    @staticmethod
    def draw_masks(cfg: Config, batch_size: int, rng: np.random.Generator
                   ) -> dict[str, np.ndarray]:
        visible, masked = mae_masks(cfg, batch_size, rng, cfg.method.mask_ratio)
        return {"visible": visible, "masked": masked}

    def train(self, mode: bool = True) -> MimCo:
        super().train(mode)
        self.teacher.eval()  # always: the targets must not depend on the mode
        return self

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's normed tokens of the full image: [B, 1 + L, D_t], cls first."""
        if images.shape[-1] != self.teacher_img_size:
            images = F.interpolate(images, size=self.teacher_img_size, mode="bicubic",
                                   align_corners=False)
        return self.teacher.forward_features(images)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        me = self.cfg.method
        images, visible, masked = batch["image"], batch["visible"], batch["masked"]
        target = self.teacher_features(images)  # [B, 1 + L, D_t]
        tokens = self.encoder.forward_features(images, visible)  # [B, 1 + n, D_s]
        pred = self.predictor(tokens, visible, masked)  # [B, m, D_t]
        patch = patch_info_nce(pred, gather_tokens(target[:, 1:], masked), me.temperature,
                               me.patch_negatives)
        image = info_nce(self.image_proj(tokens[:, 0]), target[:, 0], me.temperature,
                         me.negatives, symmetric=False)
        loss = me.patch_loss_weight * patch + me.image_loss_weight * image
        return loss, {"loss_patch": patch.detach(), "loss_image": image.detach()}
