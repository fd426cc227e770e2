"""The fine-tuning model: a timm VisionTransformer with a new head, started from our encoder.

    net = create_classifier(cfg.model, num_classes=10, global_pool="avg", drop_path=0.1)
    load_encoder_weights(net, timm_state_dict(encoder), head_init_std=2e-5)

With `global_pool="avg"` (MAE's fine-tuning default) timm averages the patch tokens and puts a
new `fc_norm` before the head instead of the encoder's final `norm`, so that norm's weights are
not used; with "token" the cls output goes through the pre-trained `norm` to the head. The
position embedding becomes a learnable parameter started from the fixed sin-cos table, as in
MAE. Because `net` is timm's own class, the exported classifier is just its state dict, which
`timm.create_model(name, num_classes=N, global_pool=..., **kwargs)` loads strictly.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from micl.config import ModelConfig
from micl.models.export import TIMM_NAMES, timm_kwargs


def classifier_kwargs(m: ModelConfig, num_classes: int, global_pool: str) -> dict[str, Any]:
    """timm.create_model keyword arguments of the classifier (what its export records)."""
    return {**timm_kwargs(m), "num_classes": num_classes, "global_pool": global_pool}


def create_classifier(m: ModelConfig, num_classes: int, global_pool: str = "avg",
                      drop_path: float = 0.0) -> VisionTransformer:
    return timm.create_model(TIMM_NAMES[m.name], pretrained=False, drop_path_rate=drop_path,
                             **classifier_kwargs(m, num_classes, global_pool))


def load_encoder_weights(net: VisionTransformer, encoder_state: dict[str, torch.Tensor],
                         head_init_std: float = 2e-5) -> None:
    """Load a timm-layout encoder state (`models.export.timm_state_dict`) into `net`; the head
    (and fc_norm with average pooling) stay new, the head initialised trunc-normal(std)."""
    own = net.state_dict()
    unused = {"norm.weight", "norm.bias"} if isinstance(net.norm, torch.nn.Identity) else set()
    state = {k: v for k, v in encoder_state.items() if k not in unused}
    wrong = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    if wrong:
        k = wrong[0]
        raise ValueError(f"encoder weights do not fit the model: {k} is {tuple(state[k].shape)} "
                         f"in the encoder, {tuple(own[k].shape)} in model")
    missing, unexpected = net.load_state_dict(state, strict=False)
    new = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    if unexpected or set(missing) - new:
        raise ValueError(f"encoder weights do not fit the model: missing "
                         f"{sorted(set(missing) - new)}, unexpected {sorted(unexpected)}")
    torch.nn.init.trunc_normal_(net.head.weight, std=head_init_std)
    torch.nn.init.zeros_(net.head.bias)
