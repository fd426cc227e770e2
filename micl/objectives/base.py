"""The small interface every pre-training method implements, and the registry."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from micl.config import Config
from micl.models import MaskedViT

OBJECTIVES: dict[str, type[Objective]] = {}


def register(name: str):
    """Class decorator: `@register("micl")` makes `method.name: micl` select the class."""

    def add(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return add


class Objective(nn.Module):
    """A method = an encoder (`self.encoder`, a MaskedViT, the thing that is kept and exported)
    plus whatever heads it trains, a loss, and the masks it needs from the data stream.

    - `draw_masks(cfg, batch_size, rng)` runs in the Ray Data stream (numpy in, numpy out) and
      returns named int64 index arrays [B, k] that travel with the images;
    - `forward(batch)` takes the batch on the training device (`image` normalised float
      [B, C, H, W] plus those index arrays as tensors) and returns (loss, metrics).
    """

    name = "base"

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = MaskedViT.from_config(cfg.model)

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """Method-specific config checks; raise ConfigError naming the field."""

    @classmethod
    def image_views(cls, cfg: Config) -> dict[str, str]:
        """The image columns the stream must produce: column -> augmentation ("weak": crop +
        flip; "strong": its own crop + flip + colour jitter, grayscale, blur). Every column
        whose name starts with "image" is normalised on the training device."""
        return {"image": "weak"}

    @staticmethod
    def draw_masks(cfg: Config, batch_size: int, rng: np.random.Generator
                   ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError


def build_objective(cfg: Config) -> Objective:
    return OBJECTIVES[cfg.method.name](cfg)
