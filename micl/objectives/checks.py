"""Pieces the methods' `Args` share: the decoder fields and the checks (errors name the field,
as in config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from micl.config import Config, ModelConfig
from micl.models.decoder import MaskedDecoder
from micl.objectives.base import MethodArgs, method_error


@dataclass
class DecoderArgs(MethodArgs):
    """An MAE-style light decoder (MAE, MACRL) or predictor (MimCo); MAE's 512 / 8 / 16."""

    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16

    def build_decoder(self, model: ModelConfig, in_dim: int, out_dim: int) -> MaskedDecoder:
        return MaskedDecoder(model.grid, in_dim, self.decoder_dim, self.decoder_depth,
                             self.decoder_heads, out_dim, model.mlp_ratio)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_ratio(args: Any, name: str, cfg: Config) -> None:
    """args.<name> in (0, 1), leaving at least one visible and one masked patch (MAE masks:
    max(1, int(L * (1 - r))) visible)."""
    value = getattr(args, name)
    if not _number(value) or not 0 < value < 1:
        raise method_error(name, value, "must be in (0, 1)")
    if max(1, int(cfg.model.num_patches * (1 - value))) >= cfg.model.num_patches:
        raise method_error(name, value, f"masks none of the {cfg.model.num_patches} patches")


def check_positive(args: Any, name: str, integer: bool = False) -> None:
    value = getattr(args, name)
    if not _number(value) or (integer and not isinstance(value, int)) or not value > 0:
        raise method_error(name, value, "must be an integer > 0" if integer else "must be > 0")


def check_choice(args: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(args, name)
    if value not in choices:
        raise method_error(name, value, f"choose one of {list(choices)}")


def check_weights(args: Any, *names: str) -> None:
    """Loss weights: each >= 0, not all 0."""
    for name in names:
        value = getattr(args, name)
        if not _number(value) or value < 0:
            raise method_error(name, value, "must be >= 0")
    if all(getattr(args, n) == 0 for n in names):
        raise method_error(names[0], 0, f"{' and '.join(f'method.{n}' for n in names)} are all 0")


def check_decoder(args: Any) -> None:
    """decoder_dim / depth / heads: positive integers; dim divisible by heads and by 4 (its
    2-D sin-cos position embedding)."""
    for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
        check_positive(args, name, integer=True)
    if args.decoder_dim % args.decoder_heads:
        raise method_error("decoder_dim", args.decoder_dim,
                           f"not divisible by method.decoder_heads = {args.decoder_heads}")
    if args.decoder_dim % 4:
        raise method_error("decoder_dim", args.decoder_dim,
                           "must be divisible by 4 (2-D sin-cos position embedding)")


def check_contrastive(args: Any) -> None:
    """temperature > 0 (not NaN) and negatives local / global."""
    check_positive(args, "temperature")
    check_choice(args, "negatives", ("local", "global"))
