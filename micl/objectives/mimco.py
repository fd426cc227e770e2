"""MimCo stage 2: masked image modelling against a frozen contrastive teacher.

Stage 1 is any encoder of this pipeline, naturally a MiCL run: method.teacher_run_id (an
MLflow run id, looked up in this run's tracking store: its exported encoder + params) or
method.teacher_checkpoint (a Ray Train checkpoint dir / state.pt, or an encoder_timm.pth with
its timm_model.json). The teacher's architecture comes from that source, so it may differ from
the student's in width and depth; it must have the same patch grid (positions must match) and
channels, and it sees the student's normalised image, resized if its img_size differs.

The student encodes the visible patches (MAE masks, method.mask_ratio, MAE's 0.75). Two losses:

- patch level: a light predictor (an MAE-style decoder, method.decoder_*, with mask tokens,
  output width = the teacher's) predicts each masked patch; InfoNCE at method.temperature
  (MoCo v3's 0.2)
  between the prediction and the teacher's patch token at the same position of the FULL image,
  with the teacher tokens of the other masked patches as negatives: of the whole worker batch
  (method.patch_negatives = "batch", (B*m)^2 logits: 5.6 GB of fp32 logits per worker at
  ImageNet scale) or of the same image ("image", B*m^2: the default);
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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from micl.artifacts import PretrainedEncoder, load_encoder
from micl.config import Config, ConfigError
from micl.data.masking import VisibleMaskedMasks
from micl.data.stream import StreamSpec
from micl.models.vit import gather_tokens
from micl.objectives.base import Objective, method_error, register
from micl.objectives.checks import (
    DecoderArgs,
    check_choice,
    check_contrastive,
    check_decoder,
    check_ratio,
    check_weights,
)
from micl.objectives.losses import info_nce, patch_info_nce
from micl.tracking import tracking_uri

TEACHER = "teacher."


@dataclass
class MimCoArgs(DecoderArgs):
    teacher_run_id: str | None = None  # MLflow run id of the frozen teacher ...
    teacher_checkpoint: str | None = None  # ... or a state.pt / checkpoint dir / encoder_timm.pth
    mask_ratio: float = 0.75  # MAE's convention (the paper's ratio is not stated)
    temperature: float = 0.2  # MoCo v3
    negatives: str = "local"  # image-level negatives: this worker's batch or the global one
    patch_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    patch_negatives: str = "image"  # "image": same image (B m^2 logits); "batch": (B m)^2

    def check(self, cfg: Config) -> None:
        check_decoder(self)
        check_ratio(self, "mask_ratio", cfg)
        check_contrastive(self)
        if bool(self.teacher_run_id) == bool(self.teacher_checkpoint):
            raise method_error(
                "teacher_run_id", self.teacher_run_id, "set exactly one of method.teacher_run_id"
                " (an MLflow run id) and method.teacher_checkpoint (a checkpoint path)")
        if self.teacher_run_id and not isinstance(self.teacher_run_id, str):
            raise method_error("teacher_run_id", self.teacher_run_id, "must be a string (quote it)")
        ckpt = self.teacher_checkpoint
        if ckpt and not Path(str(ckpt)).exists():
            raise method_error("teacher_checkpoint", ckpt, "no such file or directory")
        check_choice(self, "patch_negatives", ("batch", "image"))
        check_weights(self, "patch_loss_weight", "image_loss_weight")

    def source(self) -> tuple[str, str]:
        """(field, value) naming where the teacher comes from, for error messages."""
        if self.teacher_run_id:
            return "teacher_run_id", self.teacher_run_id
        return "teacher_checkpoint", str(self.teacher_checkpoint)


def load_teacher(cfg: Config, args: MimCoArgs) -> PretrainedEncoder:
    """The teacher from its source; a student whose patch grid or channels differ is refused."""
    if args.teacher_run_id:
        loaded = load_encoder(run_id=args.teacher_run_id, tracking_uri=tracking_uri(cfg))
    else:
        loaded = load_encoder(checkpoint=args.teacher_checkpoint)
    t, m = loaded.model, cfg.model
    if t.grid != m.grid or t.in_chans != m.in_chans:
        raise method_error(*args.source(), f"the teacher has a {t.grid}^2 patch grid and "
                           f"{t.in_chans} channels, the student {m.grid}^2 and {m.in_chans}: "
                           "they must match")
    return loaded


def _drop_teacher_from_state(module: nn.Module, state: dict, prefix: str, _meta: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + TEACHER)]:
        del state[key]


def _teacher_not_missing(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys  # DDP: "module."
                                    if not (k.startswith(TEACHER) or f".{TEACHER}" in k)]


@register("mimco")
class MimCo(Objective):
    Args = MimCoArgs

    def __init__(self, cfg: Config, args: MimCoArgs) -> None:
        super().__init__(cfg, args)
        loaded = load_teacher(cfg, args)
        self.teacher_img_size = loaded.model.img_size
        self.teacher = loaded.encoder.requires_grad_(False).eval()
        t_dim, s_dim = self.teacher.embed_dim, self.encoder.embed_dim
        self.predictor = args.build_decoder(cfg.model, s_dim, t_dim)
        self.image_proj = nn.Linear(s_dim, t_dim) if s_dim != t_dim else nn.Identity()
        self.register_state_dict_post_hook(_drop_teacher_from_state)
        self.register_load_state_dict_post_hook(_teacher_not_missing)

    @classmethod
    def preflight(cls, cfg: Config, args: MimCoArgs) -> None:
        """Load the teacher once on the driver: a wrong run id or grid fails before Ray."""
        try:
            load_teacher(cfg, args)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken file: say which field points at it
            raise method_error(*args.source(), f"cannot load the teacher: {e}") from None

    @classmethod
    def stream_spec(cls, cfg: Config, args: MimCoArgs) -> StreamSpec:
        return StreamSpec(masks=(VisibleMaskedMasks(cfg.model.num_patches, args.mask_ratio),))

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
        a = self.args
        images, visible, masked = batch["image"], batch["visible"], batch["masked"]
        target = self.teacher_features(images)  # [B, 1 + L, D_t]
        tokens = self.encoder.forward_features(images, visible)  # [B, 1 + n, D_s]
        pred = self.predictor(tokens, visible, masked)  # [B, m, D_t]
        patch = patch_info_nce(pred, gather_tokens(target[:, 1:], masked), a.temperature,
                               a.patch_negatives)
        image = info_nce(self.image_proj(tokens[:, 0]), target[:, 0], a.temperature,
                         a.negatives, symmetric=False)
        loss = a.patch_loss_weight * patch + a.image_loss_weight * image
        return loss, {"loss_patch": patch.detach(), "loss_image": image.detach()}
