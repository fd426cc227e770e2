"""Export the encoder as a timm VisionTransformer state dict.

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                              **timm_kwargs(cfg.model))
    model.load_state_dict(torch.load("encoder_timm.pth"))   # strict

Parameter names already match timm's; the one difference is the position embedding: ours is a
fixed sin-cos table over the L patches, timm's a [1, 1 + L, D] parameter that includes the cls
position. The export prepends a zero row for the cls token (as MAE does), which makes the two
models compute the same cls features (tests/test_export.py).

Every method keeps its encoder as `objective.encoder` (a MaskedViT), so this covers them all
(MiCL, MAE, MACRL, and the MimCo student); decoders, projectors, predictors and a MimCo
teacher are training machinery and are not exported. `encoder_from_timm` below and
`micl.artifacts.load_encoder` read these files back.
"""

from __future__ import annotations

from typing import Any

import torch

from micl.config import ModelConfig
from micl.models.vit import MaskedViT

TIMM_WEIGHTS, TIMM_JSON = "encoder_timm.pth", "timm_model.json"  # an exported encoder's files
TIMM_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
              "vit_base": "vit_base_patch16_224", "vit_large": "vit_large_patch16_224",
              "vit_huge": "vit_huge_patch14_224", "vit_pico": "vit_tiny_patch16_224"}


def timm_kwargs(m: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for timm.create_model that give our architecture."""
    dim, depth, heads = m.dims()
    return {"img_size": m.img_size, "patch_size": m.patch_size, "in_chans": m.in_chans,
            "embed_dim": dim, "depth": depth, "num_heads": heads, "mlp_ratio": m.mlp_ratio,
            "global_pool": "token", "class_token": True, "qkv_bias": True}


def timm_state_dict(encoder: MaskedViT) -> dict[str, torch.Tensor]:
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    pos = state["pos_embed"]  # [1, L, D]
    state["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)  # [1, 1 + L, D]
    return state


def encoder_from_timm(state: dict[str, torch.Tensor], model: ModelConfig) -> MaskedViT:
    """Inverse of timm_state_dict: drop the zero cls row of the position embedding."""
    state = dict(state)
    state["pos_embed"] = state["pos_embed"][:, 1:]  # [1, 1 + L, D] -> [1, L, D]
    encoder = MaskedViT.from_config(model)
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def model_from_timm_json(meta: dict[str, Any]) -> ModelConfig:
    """ModelConfig from the `timm_model.json` the training loop writes."""
    names = {v: k for k, v in reversed(list(TIMM_NAMES.items()))}  # first of ours wins
    return ModelConfig(name=names.get(meta.get("model_name"), "vit_tiny"),
                       img_size=int(meta["img_size"]), patch_size=int(meta["patch_size"]),
                       in_chans=int(meta["in_chans"]), embed_dim=int(meta["embed_dim"]),
                       depth=int(meta["depth"]), num_heads=int(meta["num_heads"]),
                       mlp_ratio=float(meta.get("mlp_ratio", 4.0)))


def load_timm_encoder(m: ModelConfig, state: dict[str, torch.Tensor]):
    """A timm VisionTransformer with our weights (no classifier head)."""
    import timm

    model = timm.create_model(TIMM_NAMES[m.name], pretrained=False, num_classes=0,
                              **timm_kwargs(m))
    model.load_state_dict(state, strict=True)
    return model
